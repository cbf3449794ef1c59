"""RADAR round statistics from what vLLM's scheduler already counts (pure Python, no vLLM import).

With trailing padding removed from the drafts (:func:`strip_padding`, done by
:class:`radar_vllm.vllm.scheduler.RadarScheduler`), vLLM's per-step ``SpecDecodingStats`` hold
everything RADAR reports:

- ``num_draft_tokens_per_pos[i]`` = requests whose draft reached depth ``i + 1``, so the number
  stopping exactly at depth ``d`` is ``per_pos[d - 1] - per_pos[d]`` (the stop-depth histogram);
- ``num_accepted_tokens_per_pos[i]`` = requests that accepted at least ``i + 1`` tokens, which
  gives the acceptance-length histogram the same way (acceptance length = accepted + 1, the bonus
  token included);
- the draft-model calls of the step's round = its deepest draft (one call per depth in chain mode).

Example: drafts of depths [1, 3, 3], K = 4 -> per_pos = [3, 2, 2, 0] -> stop depths {1: 1, 3: 2},
draft calls = 3.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

PADDING_TOKEN = -1  # a draft slot after the request's stop; vLLM always rejects it


def strip_padding(draft_token_ids: Sequence[int]) -> list[int]:
    """The drafts before the first padding slot: ``[5, 9, -1, -1] -> [5, 9]``."""
    drafts = list(draft_token_ids)
    try:
        return drafts[: drafts.index(PADDING_TOKEN)]
    except ValueError:
        return drafts


def histogram_from_survival(num_at_least: Sequence[int], total: int | None = None) -> dict[int, int]:
    """``{value: count}`` from survival counts ``num_at_least[i]`` = #items with value >= i + 1.

    With ``total`` (the number of items), items with value 0 are counted too.
    """
    counts: dict[int, int] = {}
    survival = list(num_at_least) + [0]
    if total is not None and total - survival[0] > 0:
        counts[0] = total - survival[0]
    for index in range(len(survival) - 1):
        exact = survival[index] - survival[index + 1]
        if exact < 0:
            raise ValueError(f"survival counts must not increase, got {list(num_at_least)}")
        if exact:
            counts[index + 1] = exact
    return counts


@dataclass
class RoundSummary:
    """RADAR view of one engine step's verified drafts."""

    stop_depths: dict[int, int] = field(default_factory=dict)  # depth -> requests
    acceptance_lengths: dict[int, int] = field(default_factory=dict)  # length (bonus incl.) -> requests
    draft_calls: int = 0  # draft-model calls of the round (its deepest draft)

    @property
    def num_requests(self) -> int:
        return sum(self.stop_depths.values())


def summarize_step(
    num_drafts: int,
    num_draft_tokens_per_pos: Sequence[int],
    num_accepted_tokens_per_pos: Sequence[int],
) -> RoundSummary:
    """RADAR statistics of one step from vLLM's spec-decoding counters (see the module doc)."""
    stop_depths = histogram_from_survival(num_draft_tokens_per_pos)
    accepted = histogram_from_survival(num_accepted_tokens_per_pos, total=num_drafts)
    return RoundSummary(
        stop_depths=stop_depths,
        acceptance_lengths={num + 1: count for num, count in accepted.items()},
        draft_calls=max(stop_depths, default=0),
    )


@dataclass
class RadarTotals:
    """Running totals for the periodic log line."""

    rounds: int = 0
    draft_calls: int = 0
    requests: int = 0
    depth_sum: int = 0
    accepted_length_sum: int = 0
    stop_depths: dict[int, int] = field(default_factory=dict)

    def add(self, summary: RoundSummary) -> None:
        if summary.num_requests == 0:
            return
        self.rounds += 1
        self.draft_calls += summary.draft_calls
        self.requests += summary.num_requests
        self.depth_sum += sum(depth * count for depth, count in summary.stop_depths.items())
        self.accepted_length_sum += sum(length * count for length, count in summary.acceptance_lengths.items())
        for depth, count in summary.stop_depths.items():
            self.stop_depths[depth] = self.stop_depths.get(depth, 0) + count

    @property
    def draft_calls_per_round(self) -> float:
        return self.draft_calls / self.rounds if self.rounds else float("nan")

    @property
    def mean_stop_depth(self) -> float:
        return self.depth_sum / self.requests if self.requests else float("nan")

    @property
    def mean_acceptance_length(self) -> float:
        return self.accepted_length_sum / self.requests if self.requests else float("nan")
