"""Benchmark metric arithmetic against hand-computed examples (no engine, no models)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from radar_vllm.bench.measures import (
    Spread,
    compare_outputs,
    first_difference,
    histogram_from_cumulative,
    mean_acceptance_length,
    per_round,
    percentile,
    speedup,
    summarize,
    target_passes_per_token,
)
from radar_vllm.bench.snapshots import (
    ACCEPTED_PER_POSITION,
    ITERATION_TOKENS,
    NUM_ACCEPTED_TOKENS,
    NUM_DRAFTS,
    RADAR_DRAFT_CALLS,
    RADAR_ROUNDS,
    RADAR_STOP_DEPTH,
    Histogram,
    MetricSnapshot,
    merge_snapshots,
    snapshot_delta,
    snapshot_from_metrics,
    snapshot_from_prometheus_text,
)


# ------------------------------------------------------------------------------ spread
def test_summarize_even_count_interpolates_median_and_quartiles() -> None:
    spread = summarize([4.0, 1.0, 3.0, 2.0])
    # sorted 1 2 3 4: median (2+3)/2; q1 at position 0.75 -> 1.75; q3 at 2.25 -> 3.25
    assert spread == Spread(median=2.5, minimum=1.0, maximum=4.0, q1=1.75, q3=3.25, count=4)


def test_summarize_odd_count_and_single_value() -> None:
    assert summarize([5.0, 1.0, 3.0]).median == 3.0
    single = summarize([7.0])
    assert (single.median, single.minimum, single.maximum, single.q1, single.q3) == (7.0,) * 5


def test_summarize_rejects_empty_and_non_finite() -> None:
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    with pytest.raises(ValueError, match="finite"):
        summarize([1.0, math.nan])


def test_percentile_p90() -> None:
    # 10 values 1..10: position 0.9 * 9 = 8.1 -> 9 + 0.1 * (10 - 9)
    assert percentile(list(range(1, 11)), 0.9) == pytest.approx(9.1)
    with pytest.raises(ValueError, match="fraction"):
        percentile([1.0], 1.5)


# ------------------------------------------------------------------------------ ratios
def test_speedup_is_ratio_of_medians_with_extreme_range() -> None:
    candidate = summarize([140.0, 150.0, 160.0])
    baseline = summarize([90.0, 100.0, 110.0])
    ratio = speedup(candidate, baseline)
    assert ratio.value == pytest.approx(1.5)
    assert ratio.low == pytest.approx(140.0 / 110.0)
    assert ratio.high == pytest.approx(160.0 / 90.0)
    with pytest.raises(ValueError, match="baseline must be positive"):
        speedup(candidate, summarize([0.0, 1.0]))


def test_acceptance_length_from_counters() -> None:
    # 10 verified drafts, 7 accepted draft tokens: 17 tokens emitted in 10 verifications
    assert mean_acceptance_length(10, 7) == pytest.approx(1.7)
    assert mean_acceptance_length(0, 0) is None
    with pytest.raises(ValueError, match="num_drafts"):
        mean_acceptance_length(-1, 0)


def test_per_round_and_target_passes() -> None:
    assert per_round(27, 10) == pytest.approx(2.7)
    assert per_round(5, 0) is None
    # 12 engine steps (1 prefill + 11 verifications) for 30 output tokens
    assert target_passes_per_token(12, 30) == pytest.approx(0.4)
    assert target_passes_per_token(3, 0) is None


# ------------------------------------------------------------------------------ histograms
def test_histogram_from_cumulative_buckets() -> None:
    buckets = {"1.0": 2.0, "2.0": 5.0, "3.0": 5.0, "+Inf": 6.0}
    assert histogram_from_cumulative(buckets) == {"1": 2, "2": 3, ">3": 1}
    with pytest.raises(ValueError, match="must not decrease"):
        histogram_from_cumulative({"1.0": 3.0, "2.0": 2.0, "+Inf": 3.0})


# ------------------------------------------------------------------------------ matching
def test_compare_outputs_reports_each_mismatch_and_where() -> None:
    reference = [[1, 2, 3], [4, 5], [6]]
    candidate = [[1, 2, 3], [4, 6], [6, 7]]
    report = compare_outputs(reference, candidate)
    assert (report.num_prompts, report.num_matched) == (3, 1)
    assert report.mismatched == [1, 2]
    assert report.first_difference == [1, 1]  # a token differs at 1; a longer output differs at 1
    assert not report.all_match
    assert compare_outputs(reference, [list(r) for r in reference]).all_match
    with pytest.raises(ValueError, match="same prompts"):
        compare_outputs(reference, candidate[:2])


def test_first_difference() -> None:
    assert first_difference([1, 2], [1, 2]) is None
    assert first_difference([1, 2], [1]) == 1
    assert first_difference([9], [1, 2]) == 0


# ------------------------------------------------------------------------------ snapshots
def prometheus_text(drafts: float, accepted: float, per_position: tuple[float, float],
                    stop_le1: float, stop_le2: float, stop_sum: float) -> str:
    """A /metrics page as prometheus_client writes it (counters carry _total, plus _created gauges)."""
    return f"""\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{{engine="0",model_name="m"}} {drafts}
# HELP vllm:spec_decode_num_drafts_created Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{{engine="0",model_name="m"}} 1.7e+09
# HELP vllm:spec_decode_num_accepted_tokens_total Accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{{engine="0",model_name="m"}} {accepted}
# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",model_name="m",position="0"}} {per_position[0]}
vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",model_name="m",position="1"}} {per_position[1]}
# HELP vllm:radar_stop_depth Stop depth.
# TYPE vllm:radar_stop_depth histogram
vllm:radar_stop_depth_bucket{{engine="0",le="1.0",model_name="m"}} {stop_le1}
vllm:radar_stop_depth_bucket{{engine="0",le="2.0",model_name="m"}} {stop_le2}
vllm:radar_stop_depth_bucket{{engine="0",le="+Inf",model_name="m"}} {stop_le2}
vllm:radar_stop_depth_count{{engine="0",model_name="m"}} {stop_le2}
vllm:radar_stop_depth_sum{{engine="0",model_name="m"}} {stop_sum}
# HELP vllm:num_requests_running Running requests.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} 3.0
"""


def test_prometheus_text_snapshot_and_delta() -> None:
    before = snapshot_from_prometheus_text(prometheus_text(10.0, 4.0, (3.0, 1.0), 4.0, 10.0, 16.0))
    assert before.counters[NUM_DRAFTS] == 10.0
    assert before.vectors[ACCEPTED_PER_POSITION] == [3.0, 1.0]
    assert "vllm:num_requests_running" not in before.counters  # gauges are not kept
    after = snapshot_from_prometheus_text(prometheus_text(30.0, 19.0, (14.0, 5.0), 9.0, 30.0, 51.0))
    delta = snapshot_delta(after, before)
    # 20 drafts, 15 accepted tokens in the measured window
    assert delta.counters[NUM_DRAFTS] == 20.0
    assert delta.counters[NUM_ACCEPTED_TOKENS] == 15.0
    assert mean_acceptance_length(delta.counters[NUM_DRAFTS], delta.counters[NUM_ACCEPTED_TOKENS]) == pytest.approx(1.75)
    assert delta.vectors[ACCEPTED_PER_POSITION] == [11.0, 4.0]
    stop = delta.histograms[RADAR_STOP_DEPTH]
    assert (stop.count, stop.sum) == (20.0, 35.0)
    # 5 requests stopped at depth 1, 15 at depth 2: 5 + 30 = 35
    assert histogram_from_cumulative(stop.buckets) == {"1": 5, "2": 15}


class Counter(SimpleNamespace):
    pass


class Vector(SimpleNamespace):
    pass


class Gauge(SimpleNamespace):
    pass


class HistogramMetric(SimpleNamespace):
    pass


def test_snapshot_from_llm_metrics_sums_label_sets_and_skips_gauges() -> None:
    metrics = [
        Counter(name=NUM_DRAFTS, labels={"engine": "0"}, value=4),
        Counter(name=NUM_DRAFTS, labels={"engine": "1"}, value=6),
        Vector(name=ACCEPTED_PER_POSITION, labels={}, values=[2, 1]),
        Gauge(name="vllm:kv_cache_usage_perc", labels={}, value=0.5),
        HistogramMetric(name=ITERATION_TOKENS, labels={}, count=3, sum=40.0, buckets={"8.0": 1, "+Inf": 3}),
    ]
    snapshot = snapshot_from_metrics(metrics)
    assert snapshot.counters == {NUM_DRAFTS: 10.0}
    assert snapshot.vectors[ACCEPTED_PER_POSITION] == [2.0, 1.0]
    assert snapshot.histograms[ITERATION_TOKENS].count == 3.0
    round_trip = MetricSnapshot.from_dict(snapshot.to_dict())
    assert round_trip.to_dict() == snapshot.to_dict()


def test_merge_snapshots_adds_counters_vectors_and_buckets() -> None:
    first = MetricSnapshot(counters={RADAR_DRAFT_CALLS: 6.0}, vectors={ACCEPTED_PER_POSITION: [1.0]},
                           histograms={RADAR_STOP_DEPTH: Histogram(2.0, 3.0, {"1.0": 1.0, "+Inf": 2.0})})
    second = MetricSnapshot(counters={RADAR_DRAFT_CALLS: 4.0, RADAR_ROUNDS: 3.0},
                            vectors={ACCEPTED_PER_POSITION: [2.0, 1.0]},
                            histograms={RADAR_STOP_DEPTH: Histogram(1.0, 2.0, {"1.0": 0.0, "+Inf": 1.0})})
    merged = merge_snapshots([first, second])
    assert merged.counters == {RADAR_DRAFT_CALLS: 10.0, RADAR_ROUNDS: 3.0}
    assert merged.vectors[ACCEPTED_PER_POSITION] == [3.0, 1.0]
    assert merged.histograms[RADAR_STOP_DEPTH].buckets == {"1.0": 1.0, "+Inf": 3.0}
