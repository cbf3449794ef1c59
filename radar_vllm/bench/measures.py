"""Metric arithmetic of the benchmark: pure Python, no engine, no I/O.

Conventions, so that every number in the tables means one thing:

- Throughput is a *ratio of sums*: output tokens of all prompts of a run divided by the run's
  wall-clock seconds (never the mean of per-prompt rates, which over-weights short answers).
- Repeats of one cell are summarized by :class:`Spread` (median, min/max, quartiles).
- A speedup is the ratio of two medians; its range divides the extremes
  (config minimum / baseline maximum .. config maximum / baseline minimum), so it holds every
  pairing of repeats.
- Mean acceptance length = 1 + accepted draft tokens / verified drafts (a "draft" is one request
  in one verification round; the 1 is the bonus token), from vLLM's counters summed over runs.
- Draft acceptance rate = accepted draft tokens / drafted tokens; first-draft acceptance =
  drafts whose first token was accepted (vLLM's per-position counter at position 1) / drafts.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

INF_BUCKET = "+Inf"


@dataclass(frozen=True)
class Spread:
    """Median and spread of the repeats of one measurement."""

    median: float
    minimum: float
    maximum: float
    q1: float  # first quartile (linear interpolation)
    q3: float  # third quartile
    count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear-interpolation quantile of already sorted values (numpy's default method)."""
    position = (len(sorted_values) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    weight = position - low
    return sorted_values[low] * (1.0 - weight) + sorted_values[high] * weight


def summarize(values: Sequence[float]) -> Spread:
    """Median, min, max and quartiles of ``values`` (ValueError when empty or not finite)."""
    if len(values) == 0:
        raise ValueError("values must hold at least one measurement, got an empty sequence")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"values must be finite, got {list(values)}")
    ordered = sorted(float(v) for v in values)
    return Spread(
        median=_quantile(ordered, 0.5),
        minimum=ordered[0],
        maximum=ordered[-1],
        q1=_quantile(ordered, 0.25),
        q3=_quantile(ordered, 0.75),
        count=len(ordered),
    )


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear-interpolation quantile, ``fraction`` in [0, 1] (``0.9`` -> p90)."""
    if len(values) == 0:
        raise ValueError("values must hold at least one measurement, got an empty sequence")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    return _quantile(sorted(float(v) for v in values), fraction)


@dataclass(frozen=True)
class Ratio:
    """A ratio of medians with its range over the repeats (see the module doc)."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def speedup(candidate: Spread, baseline: Spread) -> Ratio:
    """``candidate.median / baseline.median``, range ``[min / max, max / min]``."""
    if baseline.median <= 0 or baseline.minimum <= 0:
        raise ValueError(f"baseline must be positive, got median={baseline.median}, minimum={baseline.minimum}")
    return Ratio(
        value=candidate.median / baseline.median,
        low=candidate.minimum / baseline.maximum,
        high=candidate.maximum / baseline.minimum,
    )


def mean_acceptance_length(num_drafts: float, num_accepted_tokens: float) -> float | None:
    """``1 + accepted / drafts`` (tokens emitted per verification, bonus included); None without drafts."""
    if num_drafts < 0 or num_accepted_tokens < 0:
        raise ValueError(f"counters must be >= 0, got num_drafts={num_drafts}, num_accepted_tokens={num_accepted_tokens}")
    if num_drafts == 0:
        return None
    return 1.0 + num_accepted_tokens / num_drafts


def draft_acceptance_rate(num_draft_tokens: float, num_accepted_tokens: float) -> float | None:
    """Accepted / drafted tokens; None without drafted tokens."""
    if num_draft_tokens < 0 or num_accepted_tokens < 0:
        raise ValueError(f"counters must be >= 0, got num_draft_tokens={num_draft_tokens}, "
                         f"num_accepted_tokens={num_accepted_tokens}")
    return None if num_draft_tokens == 0 else num_accepted_tokens / num_draft_tokens


def first_draft_acceptance(accepted_per_position: Sequence[float] | None, num_drafts: float) -> float | None:
    """Accepted at draft position 1 / drafts; None without the per-position counts or drafts."""
    if not accepted_per_position or num_drafts <= 0:
        return None
    return accepted_per_position[0] / num_drafts


def per_round(total: float, rounds: float) -> float | None:
    """``total / rounds`` or None when no round happened (draft calls per round, ...)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    return None if rounds == 0 else total / rounds


def target_passes_per_token(num_target_passes: float, num_output_tokens: float) -> float | None:
    """Target forward passes (engine steps, prefill included) per output token."""
    if num_output_tokens < 0 or num_target_passes < 0:
        raise ValueError(
            f"counts must be >= 0, got num_target_passes={num_target_passes}, num_output_tokens={num_output_tokens}"
        )
    return None if num_output_tokens == 0 else num_target_passes / num_output_tokens


def histogram_from_cumulative(buckets: Mapping[str, float]) -> dict[str, int]:
    """Per-bucket counts from Prometheus' cumulative ``le`` buckets.

    Integer upper bounds are written without ``.0``; the ``+Inf`` bucket becomes ``">LAST"``.
    Example: ``{"1.0": 2, "2.0": 5, "+Inf": 6} -> {"1": 2, "2": 3, ">2": 1}`` (empty buckets
    are left out).
    """
    finite = sorted(((float(le), count) for le, count in buckets.items() if le != INF_BUCKET), key=lambda x: x[0])
    counts: dict[str, int] = {}
    previous = 0.0
    last_label = None
    for bound, cumulative in finite:
        exact = cumulative - previous
        if exact < 0:
            raise ValueError(f"cumulative buckets must not decrease, got {dict(buckets)}")
        label = str(int(bound)) if bound == int(bound) else repr(bound)
        if exact:
            counts[label] = int(round(exact))
        previous = cumulative
        last_label = label
    if INF_BUCKET in buckets:
        rest = buckets[INF_BUCKET] - previous
        if rest < 0:
            raise ValueError(f"cumulative buckets must not decrease, got {dict(buckets)}")
        if rest:
            counts[f">{last_label}" if last_label is not None else INF_BUCKET] = int(round(rest))
    return counts


@dataclass
class MatchReport:
    """Whether a configuration's greedy outputs equal the no-speculation outputs, prompt by prompt."""

    num_prompts: int
    num_matched: int
    mismatched: list[int] = field(default_factory=list)  # prompt indices that differ
    first_difference: list[int] = field(default_factory=list)  # per mismatch: first differing position

    @property
    def all_match(self) -> bool:
        return self.num_matched == self.num_prompts

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), all_match=self.all_match)


def first_difference(reference: Sequence[int], candidate: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts), None when equal."""
    for index, (a, b) in enumerate(zip(reference, candidate)):
        if int(a) != int(b):
            return index
    if len(reference) != len(candidate):
        return min(len(reference), len(candidate))
    return None


def compare_outputs(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> MatchReport:
    """Token-id comparison of two output lists in prompt order (ValueError if counts differ)."""
    if len(reference) != len(candidate):
        raise ValueError(
            f"reference has {len(reference)} outputs but candidate has {len(candidate)}: "
            f"both must come from the same prompts"
        )
    report = MatchReport(num_prompts=len(reference), num_matched=0)
    for index, (ref, cand) in enumerate(zip(reference, candidate)):
        position = first_difference(ref, cand)
        if position is None:
            report.num_matched += 1
        else:
            report.mismatched.append(index)
            report.first_difference.append(position)
    return report
