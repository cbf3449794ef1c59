"""RADAR metrics, exported next to vLLM's spec-decode metrics.

How the numbers travel: the engine-core scheduler counts verified drafts per step in vLLM's
``SpecDecodingStats`` (draft tokens per position, accepted tokens per position), which reach the
front-end inside ``SchedulerStats``; vLLM's ``StatLoggerManager`` hands them to every stat logger.
:class:`RadarStatLogger` is one more such logger (added by :mod:`radar_vllm.vllm.hooks` for RADAR
engines): it turns the counters into RADAR's view (:mod:`radar_vllm.vllm.stats`) and records

- ``vllm:radar_draft_calls`` (counter): draft-model calls, summed over rounds;
- ``vllm:radar_rounds`` (counter): engine steps that verified drafts. Draft calls per round =
  ``radar_draft_calls / radar_rounds``;
- ``vllm:radar_stop_depth`` (histogram, buckets 1..max_depth): per request and round, the depth
  at which the policy stopped (= draft tokens it verified);
- ``vllm:radar_acceptance_length`` (histogram, buckets 1..max_depth+1): per request and round,
  accepted draft tokens + 1 (the bonus token);
- ``vllm:radar_tree_size`` (histogram, buckets 1..num_speculative_tokens): per request and round,
  draft tokens verified (tree nodes; in chain mode the stop depth);
- ``vllm:radar_skipped_rounds`` (counter): per request and step, decode rounds that ran without
  drafts (depth 0, chosen by the depth gate), counted with each step's stats.

Tree mode: the stop depth is not a draft length there. The tree runner sends it with the drafts,
RADAR's scheduler counts it per step in ``RadarSpecDecodingStats.stop_depth_counts`` (a subclass
of vLLM's ``SpecDecodingStats``, :mod:`radar_vllm.vllm.spec_stats`), and this logger reads it
from there. Across processes vLLM decodes
``SchedulerStats`` by its declared field types; :func:`radar_vllm.vllm.spec_stats.install_stats_transport`
declares the field as the subclass so the counts survive. Should they still be missing, tree
sizes and acceptance lengths are recorded and the stop depths and draft calls are not (one warning).

They live in the front-end's Prometheus registry, so they appear in ``/metrics`` of the
OpenAI-compatible server and in ``LLM.get_metrics()`` (with ``disable_log_stats=False``). vLLM's
own ``vllm:spec_decode_*`` counters stay as they are (mean acceptance length =
1 + accepted / drafts); with RADAR's scheduler they count only real (unpadded) drafts.
"""
from __future__ import annotations

import logging
from typing import Any

import prometheus_client
from prometheus_client import REGISTRY

from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from radar_vllm.core.config import MODE_TREE
from radar_vllm.vllm.engine_plan import engine_plan
from radar_vllm.vllm.stats import RadarTotals, RoundSummary, summarize_step

logger = logging.getLogger(__name__)

METRIC_DRAFT_CALLS = "vllm:radar_draft_calls"
METRIC_ROUNDS = "vllm:radar_rounds"
METRIC_STOP_DEPTH = "vllm:radar_stop_depth"
METRIC_ACCEPTANCE_LENGTH = "vllm:radar_acceptance_length"
METRIC_TREE_SIZE = "vllm:radar_tree_size"
METRIC_SKIPPED_ROUNDS = "vllm:radar_skipped_rounds"
RADAR_METRIC_NAMES = (METRIC_DRAFT_CALLS, METRIC_ROUNDS, METRIC_STOP_DEPTH, METRIC_ACCEPTANCE_LENGTH,
                      METRIC_TREE_SIZE, METRIC_SKIPPED_ROUNDS)


def _unregister_radar_metrics() -> None:
    """Drop collectors left by an earlier RADAR engine in this process (names must be unique)."""
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", None) in RADAR_METRIC_NAMES:
            REGISTRY.unregister(collector)


class RadarStatLogger(AggregateStatLoggerBase):
    """Records RADAR's round statistics in Prometheus and logs them with vLLM's periodic stats."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int]) -> None:
        self.engine_indexes = engine_indexes
        radar = engine_plan(vllm_config).radar
        self.max_depth = radar.config.max_depth
        self.tree_mode = radar.config.mode == MODE_TREE
        speculative_config = getattr(vllm_config, "speculative_config", None)
        max_nodes = int(getattr(speculative_config, "num_speculative_tokens", 0) or self.max_depth)
        model_name = vllm_config.model_config.served_model_name
        labelnames = ["model_name", "engine"]
        labels = {idx: [model_name, str(idx)] for idx in engine_indexes}
        _unregister_radar_metrics()
        draft_calls = prometheus_client.Counter(
            METRIC_DRAFT_CALLS, "RADAR draft-model calls (the deepest verified draft of each round).", labelnames
        )
        rounds = prometheus_client.Counter(METRIC_ROUNDS, "RADAR rounds (engine steps that verified drafts).", labelnames)
        stop_depth = prometheus_client.Histogram(
            METRIC_STOP_DEPTH,
            "RADAR stop depth per request and round (draft tokens verified).",
            labelnames,
            buckets=[float(d) for d in range(1, self.max_depth + 1)],
        )
        acceptance_length = prometheus_client.Histogram(
            METRIC_ACCEPTANCE_LENGTH,
            "Accepted draft tokens + 1 (bonus) per request and round, with RADAR.",
            labelnames,
            buckets=[float(n) for n in range(1, self.max_depth + 2)],
        )
        tree_size = prometheus_client.Histogram(
            METRIC_TREE_SIZE,
            "RADAR draft tokens verified per request and round (tree nodes; chain: the stop depth).",
            labelnames,
            buckets=[float(n) for n in range(1, max_nodes + 1)],
        )
        skipped = prometheus_client.Counter(
            METRIC_SKIPPED_ROUNDS, "RADAR decode rounds (request x step) run without drafts (depth 0).", labelnames
        )
        self.skipped_rounds = {idx: skipped.labels(*lv) for idx, lv in labels.items()}
        self.draft_calls = {idx: draft_calls.labels(*lv) for idx, lv in labels.items()}
        self.tree_size = {idx: tree_size.labels(*lv) for idx, lv in labels.items()}
        self.rounds = {idx: rounds.labels(*lv) for idx, lv in labels.items()}
        self.stop_depth = {idx: stop_depth.labels(*lv) for idx, lv in labels.items()}
        self.acceptance_length = {idx: acceptance_length.labels(*lv) for idx, lv in labels.items()}
        self.totals = RadarTotals()
        self._warned_missing = False
        self._warned_no_depths = False

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        stats = getattr(scheduler_stats, "spec_decoding_stats", None) if scheduler_stats is not None else None
        if stats is None:
            return
        skipped = int(getattr(stats, "skipped_rounds", 0) or 0)
        if skipped:
            self.skipped_rounds[engine_idx].inc(skipped)
            self.totals.skipped_rounds += skipped
        if not stats.num_drafts:
            return
        per_pos = getattr(stats, "num_draft_tokens_per_pos", None)
        if per_pos is None:
            if not self._warned_missing:
                self._warned_missing = True
                logger.warning("RADAR metrics need SpecDecodingStats.num_draft_tokens_per_pos; not recorded")
            return
        stop_depth_counts = getattr(stats, "stop_depth_counts", None) or None
        # (a step whose drafts are all one token long is a chain step: one draft call per request)
        if self.tree_mode and stop_depth_counts is None and len(per_pos) > 1 and per_pos[1] > 0:
            self._record_tree_without_depths(stats, per_pos, engine_idx)
            return
        summary = summarize_step(stats.num_drafts, per_pos, stats.num_accepted_tokens_per_pos, stop_depth_counts)
        if summary.num_requests == 0:
            return
        self.totals.add(summary)
        self.draft_calls[engine_idx].inc(summary.draft_calls)
        self.rounds[engine_idx].inc(1)
        for depth, count in summary.stop_depths.items():
            for _ in range(count):
                self.stop_depth[engine_idx].observe(depth)
        self._observe_sizes(summary, engine_idx)

    def _observe_sizes(self, summary: RoundSummary, engine_idx: int) -> None:
        for size, count in summary.tree_sizes.items():
            for _ in range(count):
                self.tree_size[engine_idx].observe(size)
        for length, count in summary.acceptance_lengths.items():
            for _ in range(count):
                self.acceptance_length[engine_idx].observe(length)

    def _record_tree_without_depths(self, stats: Any, per_pos: Any, engine_idx: int) -> None:
        """Tree mode without the scheduler's stop depths: tree sizes and acceptance lengths only."""
        if not self._warned_no_depths:
            self._warned_no_depths = True
            logger.warning("RADAR tree metrics: the step stats carry no stop depths (is RADAR's scheduler "
                           "selected?); %s and %s are not recorded", METRIC_STOP_DEPTH, METRIC_DRAFT_CALLS)
        summary = summarize_step(stats.num_drafts, per_pos, stats.num_accepted_tokens_per_pos)
        self._observe_sizes(summary, engine_idx)

    def log(self) -> None:
        totals = self.totals
        if totals.rounds == 0:
            if totals.skipped_rounds:  # (under load the gate may hold depth 0 for thousands of steps)
                logger.info("RADAR metrics: no drafting rounds, rounds without drafts: %d", totals.skipped_rounds)
                self.totals = RadarTotals()
            return
        histogram = ", ".join(f"{depth}: {totals.stop_depths[depth]}" for depth in sorted(totals.stop_depths))
        logger.info(
            "RADAR metrics: draft calls per round: %.2f, mean stop depth: %.2f, mean acceptance length: %.2f, "
            "mean tree size: %.2f, stop depths {%s}, rounds without drafts: %d",
            totals.draft_calls_per_round,
            totals.mean_stop_depth,
            totals.mean_acceptance_length,
            totals.mean_tree_size,
            histogram,
            totals.skipped_rounds,
        )
        self.totals = RadarTotals()

    def log_engine_initialized(self) -> None:
        logger.info("RADAR metrics enabled: %s", ", ".join(RADAR_METRIC_NAMES))
