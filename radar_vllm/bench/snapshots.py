"""vLLM's cumulative metrics, read before and after a measured run, and their difference.

Two sources give the same :class:`MetricSnapshot`:

- offline, ``LLM.get_metrics()`` (objects with ``name`` and ``value`` / ``values`` /
  ``buckets``+``count``+``sum``; read by attribute, so vLLM is not imported here);
- online, the server's ``/metrics`` Prometheus text.

Label sets (engine index, model name) are summed: a run's numbers are per engine fleet. Gauges
are not kept (a difference of gauges means nothing). Metric names below are vLLM 0.32's and
RADAR's (:mod:`radar_vllm.vllm.metrics`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

# vLLM spec-decode counters
NUM_DRAFTS = "vllm:spec_decode_num_drafts"
NUM_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
NUM_ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens"
ACCEPTED_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"
# engine steps (one target forward each) and output tokens
ITERATION_TOKENS = "vllm:iteration_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens"
# RADAR (names as exported by radar_vllm.vllm.metrics; repeated here because that module imports vLLM)
RADAR_DRAFT_CALLS = "vllm:radar_draft_calls"
RADAR_ROUNDS = "vllm:radar_rounds"
RADAR_STOP_DEPTH = "vllm:radar_stop_depth"
# tree mode: nodes verified per request and round
RADAR_TREE_SIZE = "vllm:radar_tree_size"

POSITION_LABEL = "position"
COUNTER_SUFFIX = "_total"


@dataclass
class Histogram:
    count: float = 0.0
    sum: float = 0.0
    buckets: dict[str, float] = field(default_factory=dict)  # cumulative counts per "le" bound

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sum": self.sum, "buckets": dict(self.buckets)}


@dataclass
class MetricSnapshot:
    """Counter values, per-position vectors and histograms, by metric name."""

    counters: dict[str, float] = field(default_factory=dict)
    vectors: dict[str, list[float]] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)

    def counter(self, name: str) -> float:
        return self.counters.get(name, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "vectors": {k: list(v) for k, v in self.vectors.items()},
            "histograms": {k: v.to_dict() for k, v in self.histograms.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MetricSnapshot":
        return cls(
            counters={k: float(v) for k, v in data.get("counters", {}).items()},
            vectors={k: [float(x) for x in v] for k, v in data.get("vectors", {}).items()},
            histograms={
                k: Histogram(count=float(v["count"]), sum=float(v["sum"]),
                             buckets={b: float(c) for b, c in v["buckets"].items()})
                for k, v in data.get("histograms", {}).items()
            },
        )


def _add_vector(target: dict[str, list[float]], name: str, values: Iterable[float]) -> None:
    values = [float(v) for v in values]
    existing = target.setdefault(name, [])
    if len(existing) < len(values):
        existing.extend([0.0] * (len(values) - len(existing)))
    for index, value in enumerate(values):
        existing[index] += value


def _add_histogram(target: dict[str, Histogram], name: str, count: float, total: float,
                   buckets: Mapping[str, float]) -> None:
    histogram = target.setdefault(name, Histogram())
    histogram.count += float(count)
    histogram.sum += float(total)
    for bound, value in buckets.items():
        histogram.buckets[bound] = histogram.buckets.get(bound, 0.0) + float(value)


def snapshot_from_metrics(metrics: Iterable[Any]) -> MetricSnapshot:
    """Snapshot of ``LLM.get_metrics()`` output (read by attribute; gauges skipped)."""
    snapshot = MetricSnapshot()
    for metric in metrics:
        name = metric.name
        if hasattr(metric, "values"):
            _add_vector(snapshot.vectors, name, metric.values)
        elif hasattr(metric, "buckets"):
            _add_histogram(snapshot.histograms, name, metric.count, metric.sum, metric.buckets)
        elif type(metric).__name__ == "Counter":
            snapshot.counters[name] = snapshot.counters.get(name, 0.0) + float(metric.value)
    return snapshot


def _normalize_bound(bound: str) -> str:
    """Prometheus text writes ``le="1.0"``; keep vLLM's reader's spelling (``"1.0"``, ``"+Inf"``)."""
    if bound in ("+Inf", "Inf", "inf"):
        return "+Inf"
    try:
        return repr(float(bound))
    except ValueError:
        return bound


def snapshot_from_prometheus_text(text: str) -> MetricSnapshot:
    """Snapshot of a ``/metrics`` page (counters, per-position vector, histograms; vllm:* only)."""
    from prometheus_client.parser import text_string_to_metric_families

    snapshot = MetricSnapshot()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("vllm:"):
            continue
        if family.type in ("counter", "unknown"):
            # "unknown": a "# TYPE name counter" line without the _total suffix the samples carry
            for sample in family.samples:
                if not sample.name.endswith(COUNTER_SUFFIX):
                    continue
                name = family.name if family.type == "counter" else sample.name[: -len(COUNTER_SUFFIX)]
                if POSITION_LABEL in sample.labels:
                    position = int(sample.labels[POSITION_LABEL])
                    values = [0.0] * (position + 1)
                    values[position] = sample.value
                    _add_vector(snapshot.vectors, name, values)
                else:
                    snapshot.counters[name] = snapshot.counters.get(name, 0.0) + sample.value
        elif family.type == "histogram":
            count = total = 0.0
            buckets: dict[str, float] = {}
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = _normalize_bound(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
                elif sample.name.endswith("_sum"):
                    total += sample.value
            _add_histogram(snapshot.histograms, family.name, count, total, buckets)
    return snapshot


def snapshot_delta(after: MetricSnapshot, before: MetricSnapshot) -> MetricSnapshot:
    """``after - before`` for every metric in ``after`` (missing in ``before`` counts as 0)."""
    delta = MetricSnapshot()
    for name, value in after.counters.items():
        delta.counters[name] = value - before.counters.get(name, 0.0)
    for name, values in after.vectors.items():
        previous = before.vectors.get(name, [])
        delta.vectors[name] = [v - (previous[i] if i < len(previous) else 0.0) for i, v in enumerate(values)]
    for name, histogram in after.histograms.items():
        previous = before.histograms.get(name, Histogram())
        delta.histograms[name] = Histogram(
            count=histogram.count - previous.count,
            sum=histogram.sum - previous.sum,
            buckets={b: c - previous.buckets.get(b, 0.0) for b, c in histogram.buckets.items()},
        )
    return delta


def merge_snapshots(snapshots: Iterable[MetricSnapshot]) -> MetricSnapshot:
    """Sum of several deltas (e.g. the repeats of one cell)."""
    merged = MetricSnapshot()
    for snapshot in snapshots:
        for name, value in snapshot.counters.items():
            merged.counters[name] = merged.counters.get(name, 0.0) + value
        for name, values in snapshot.vectors.items():
            _add_vector(merged.vectors, name, values)
        for name, histogram in snapshot.histograms.items():
            _add_histogram(merged.histograms, name, histogram.count, histogram.sum, histogram.buckets)
    return merged
