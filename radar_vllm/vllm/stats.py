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

Tree mode: a request's draft is a flattened tree, so ``num_draft_tokens_per_pos`` gives the
tree-size histogram (nodes verified) and ``num_accepted_tokens_per_pos`` still the acceptance
lengths, but the stop depth (draft calls) is no longer a draft length. The worker reports it with
the drafts (:class:`RadarDraftTokenIds`), RADAR's scheduler counts it per step in
:class:`RadarSpecDecodingStats` (``stop_depth_counts[d]`` = requests whose round stopped after
``d`` draft calls), and :func:`summarize_step` takes those counts when they are present.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from radar_vllm.core.tree import PADDING_TOKEN  # a draft slot after the request's drafts; never verified


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
    tree_sizes: dict[int, int] = field(default_factory=dict)  # nodes verified -> requests (chain: = depth)

    @property
    def num_requests(self) -> int:
        return sum(self.stop_depths.values())


def summarize_step(
    num_drafts: int,
    num_draft_tokens_per_pos: Sequence[int],
    num_accepted_tokens_per_pos: Sequence[int],
    stop_depth_counts: Sequence[int] | None = None,
) -> RoundSummary:
    """RADAR statistics of one step from vLLM's spec-decoding counters (see the module doc).

    ``stop_depth_counts`` (tree mode): ``[max_depth + 1]`` requests per stop depth; without it the
    stop depth is the draft length (chain mode).
    """
    tree_sizes = histogram_from_survival(num_draft_tokens_per_pos)
    if stop_depth_counts is None:
        stop_depths = dict(tree_sizes)
    else:
        if any(count < 0 for count in stop_depth_counts):
            raise ValueError(f"stop_depth_counts must be non-negative, got {list(stop_depth_counts)}")
        stop_depths = {depth: int(count) for depth, count in enumerate(stop_depth_counts) if count}
    accepted = histogram_from_survival(num_accepted_tokens_per_pos, total=num_drafts)
    return RoundSummary(
        stop_depths=stop_depths,
        acceptance_lengths={num + 1: count for num, count in accepted.items()},
        draft_calls=max(stop_depths, default=0),
        tree_sizes=tree_sizes,
    )


@dataclass
class RadarDraftTokenIds:
    """vLLM's ``DraftTokenIds`` fields plus each request's stop depth (draft calls of its round).

    Duck-typed (no vLLM import here): the tree runner returns it from ``take_draft_token_ids``.
    """

    req_ids: list[str]  # [num_reqs]
    draft_token_ids: list[list[int]]  # num_reqs x num_draft_tokens
    stop_depths: list[int]  # [num_reqs]


def count_stop_depth(stop_depth_counts: list[int], depth: int) -> None:
    """Add one request that stopped after ``depth`` draft calls to ``[max_depth + 1]`` counts."""
    if not 0 <= depth < len(stop_depth_counts):
        raise ValueError(f"depth must be in [0, {len(stop_depth_counts) - 1}], got {depth}")
    stop_depth_counts[depth] += 1


@dataclass
class RadarTotals:
    """Running totals for the periodic log line."""

    rounds: int = 0
    draft_calls: int = 0
    requests: int = 0
    depth_sum: int = 0
    accepted_length_sum: int = 0
    tree_size_sum: int = 0
    stop_depths: dict[int, int] = field(default_factory=dict)
    skipped_rounds: int = 0  # decode rounds (request x step) without drafts

    def add(self, summary: RoundSummary) -> None:
        if summary.num_requests == 0:
            return
        self.rounds += 1
        self.draft_calls += summary.draft_calls
        self.requests += summary.num_requests
        self.depth_sum += sum(depth * count for depth, count in summary.stop_depths.items())
        self.accepted_length_sum += sum(length * count for length, count in summary.acceptance_lengths.items())
        self.tree_size_sum += sum(size * count for size, count in summary.tree_sizes.items())
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

    @property
    def mean_tree_size(self) -> float:
        return self.tree_size_sum / self.requests if self.requests else float("nan")
