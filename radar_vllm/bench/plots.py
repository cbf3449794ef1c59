"""Figures of a results document (matplotlib, Agg backend, PNG files).

- ``speedup``: tokens/s relative to no speculation per workload, for the best stock EAGLE-3 K and
  every RADAR-side row, one panel per (temperature, mode); bars show the median ratio, whiskers
  the range over repeats.
- ``acceptance``: mean acceptance length against draft calls per round: stock EAGLE-3 at each K
  (a line per workload) and the RADAR-side rows as points.
- ``concurrency``: online output tokens/s and TPOT against concurrency, a line per row.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from radar_vllm.bench.configs import KIND_EAGLE3, KIND_NONE

logger = logging.getLogger(__name__)

FIGURE_DPI = 120
BEST_EAGLE3_LABEL = "best EAGLE-3"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(document: Mapping[str, Any], path: Path) -> Path | None:
    cells = document["cells"]
    panels = sorted({(c["temperature"], c["mode"]) for c in cells})
    workloads = list(dict.fromkeys(c["workload"] for c in cells))
    rows = [c["name"] for c in document["configs"] if c["kind"] not in (KIND_NONE, KIND_EAGLE3)]
    series = [BEST_EAGLE3_LABEL] + rows
    if not panels or not workloads:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(max(6, 2 + 1.6 * len(workloads)) * len(panels), 4.5),
                                squeeze=False)
    width = 0.8 / max(len(series), 1)
    for axis, (temperature, mode) in zip(axes[0], panels):
        for s_index, name in enumerate(series):
            values, lows, highs, xs = [], [], [], []
            for w_index, workload in enumerate(workloads):
                group = [c for c in cells if c["workload"] == workload and c["temperature"] == temperature
                         and c["mode"] == mode]
                if name == BEST_EAGLE3_LABEL:
                    best = next((c["best_eagle3"] for c in group if c.get("best_eagle3")), None)
                    cell = next((c for c in group if c["config"] == best), None)
                else:
                    cell = next((c for c in group if c["config"] == name), None)
                if cell is None or not cell.get("vs_no_spec"):
                    continue
                ratio = cell["vs_no_spec"]
                xs.append(w_index + (s_index - (len(series) - 1) / 2) * width)
                values.append(ratio["value"])
                lows.append(ratio["value"] - ratio["low"])
                highs.append(ratio["high"] - ratio["value"])
            if xs:
                axis.bar(xs, values, width=width, label=name, yerr=[lows, highs], capsize=2)
        axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        axis.set_xticks(range(len(workloads)))
        axis.set_xticklabels(workloads, rotation=15)
        axis.set_ylabel("tokens/s vs no speculation")
        axis.set_title(f"T={temperature:g}, {mode}")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return path


def plot_acceptance(document: Mapping[str, Any], path: Path) -> Path | None:
    cells = [c for c in document["cells"] if c.get("acceptance_length") is not None
             and c.get("draft_calls_per_round") is not None]
    if not cells:
        return None
    # one (temperature, mode) to keep the figure readable: greedy + batch1 when present
    keys = sorted({(c["temperature"], c["mode"]) for c in cells})
    temperature, mode = keys[0]
    cells = [c for c in cells if c["temperature"] == temperature and c["mode"] == mode]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    workloads = list(dict.fromkeys(c["workload"] for c in cells))
    markers = "os^DvP*X"
    others = list(dict.fromkeys(c["config"] for c in cells if c["kind"] != KIND_EAGLE3))
    for w_index, workload in enumerate(workloads):
        color = f"C{w_index % 10}"
        eagles = sorted((c for c in cells if c["workload"] == workload and c["kind"] == KIND_EAGLE3),
                        key=lambda c: c["draft_calls_per_round"])
        if eagles:
            axis.plot([c["draft_calls_per_round"] for c in eagles], [c["acceptance_length"] for c in eagles],
                      color=color, marker=".", label=f"EAGLE-3 K=1.. ({workload})")
        for o_index, name in enumerate(others):
            cell = next((c for c in cells if c["workload"] == workload and c["config"] == name), None)
            if cell is not None:
                axis.scatter([cell["draft_calls_per_round"]], [cell["acceptance_length"]], color=color,
                             marker=markers[(o_index + 1) % len(markers)], s=60,
                             label=name if w_index == 0 else None, edgecolors="black")
    axis.set_xlabel("draft calls per round")
    axis.set_ylabel("mean acceptance length")
    axis.set_title(f"Acceptance length vs drafting cost (T={temperature:g}, {mode})")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return path


def plot_concurrency(document: Mapping[str, Any], path: Path) -> Path | None:
    levels = [level for level in document.get("online", []) if not level.get("error")]
    if not levels:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(level["config"] for level in levels):
        mine = sorted((level for level in levels if level["config"] == name and level.get("repeat", 0) == 0),
                      key=lambda level: level["concurrency"])
        xs = [level["concurrency"] for level in mine]
        axes[0].plot(xs, [level["output_throughput"] for level in mine], marker="o", label=name)
        axes[1].plot(xs, [level["tpot_ms"].get("median", float("nan")) for level in mine], marker="o", label=name)
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent requests")
    axes[0].set_ylabel("output tokens/s")
    axes[1].set_ylabel("TPOT median (ms)")
    axes[0].legend(fontsize=8)
    figure.suptitle("Online serving on loopback")
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return path


def write_plots(document: Mapping[str, Any], directory: Path, prefix: str) -> list[Path]:
    """Write every figure that has data; returns the written paths."""
    written = []
    for suffix, function in (("speedup", plot_speedup), ("acceptance", plot_acceptance),
                             ("concurrency", plot_concurrency)):
        path = directory / f"{prefix}-{suffix}.png"
        try:
            result = function(document, path)
        except Exception as error:  # a figure must never lose the results
            logger.warning("plot %s failed: %s", suffix, error)
            continue
        if result is not None:
            written.append(result)
    return written
