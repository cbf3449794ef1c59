"""The report's one table of every cell against the "always on" goal (report.goal_lines)."""
from __future__ import annotations

from typing import Any

from radar_vllm.bench.configs import KIND_EAGLE3, KIND_NONE, KIND_RADAR, NO_SPEC, RADAR_CHAIN, RADAR_TREE
from radar_vllm.bench.report import goal_lines


def cell(config: str, kind: str, ratio: float, mode: str = "batched", temperature: float = 0.0,
         **extra: Any) -> dict[str, Any]:
    return {"config": config, "kind": kind, "workload": "mtbench", "temperature": temperature, "mode": mode,
            "tokens_per_s": {"median": 100.0 * ratio}, "vs_no_spec": {"value": ratio, "low": ratio, "high": ratio},
            **extra}


def level(config: str, concurrency: int, rate: float, p99: float = 100.0, failed: int = 0) -> dict[str, Any]:
    return {"config": config, "concurrency": concurrency, "output_throughput": rate,
            "tpot_ms": {"median": p99 / 2, "p99": p99}, "failed": failed}


def row_of(lines: list[str], label: str) -> list[str]:
    row = next(line for line in lines if line.startswith(f"| {label}"))
    return [part.strip() for part in row.strip("|").split("|")]


def test_offline_cells_are_judged_against_the_best_of_no_speculation_and_every_valid_stock_row() -> None:
    document = {"cells": [
        cell(NO_SPEC, KIND_NONE, 1.0),
        cell("eagle3-k1", KIND_EAGLE3, 0.8),
        cell("eagle3-dynamic", KIND_EAGLE3, 0.9),
        cell(RADAR_CHAIN, KIND_RADAR, 0.97),
        cell(RADAR_TREE, KIND_RADAR, 0.99),
        cell(NO_SPEC, KIND_NONE, 1.0, mode="batch1"),
        cell("eagle3-k2", KIND_EAGLE3, 1.10, mode="batch1"),
        cell("eagle3-k3", KIND_EAGLE3, 1.30, mode="batch1", sampling_broken=True),  # not a baseline
        cell("eagle3-k4", KIND_EAGLE3, 1.40, mode="batch1", plugin_disabled=True),  # vLLM as shipped: neither
        cell(RADAR_CHAIN, KIND_RADAR, 1.09, mode="batch1"),  # >= 0.98 x 1.10 but not above a leading stock row
        cell(RADAR_TREE, KIND_RADAR, 1.12, mode="batch1"),
        cell(NO_SPEC, KIND_NONE, 1.0, temperature=1.0),
        cell(RADAR_CHAIN, KIND_RADAR, 1.2, temperature=1.0, sampling_broken=True),
    ]}
    lines = goal_lines(document)
    batched = row_of(lines, "mtbench, T=0, batched")
    assert batched[1:4] == ["100.0 tok/s", "0.80x (k1)", "0.90x"]
    assert batched[4].endswith(" not met") and batched[5].endswith(" met") and not batched[5].endswith("not met")
    batch1 = row_of(lines, "mtbench, T=0, batch1")
    assert batch1[2] == "1.10x (k2)" and batch1[3] == "–"
    assert batch1[4].endswith(" not met")
    assert batch1[5].startswith("1.12x") and not batch1[5].endswith("not met")
    sampled = row_of(lines, "mtbench, T=1, batched")
    assert sampled[4] == "sampling BROKEN" and sampled[5] == "–"


def test_served_cells_need_no_failures_and_the_p99_tpot_bound_at_64_streams() -> None:
    document = {"cells": [], "online": [
        level(NO_SPEC, 16, 100.0), level(NO_SPEC, 16, 104.0), level(NO_SPEC, 16, 96.0),
        level(RADAR_CHAIN, 16, 99.0), level(RADAR_CHAIN, 16, 95.0), level(RADAR_CHAIN, 16, 101.0),
        level(RADAR_TREE, 16, 120.0, failed=1),
        level("eagle3-dynamic", 16, 80.0),
        level(NO_SPEC, 64, 100.0, p99=500.0),
        level(RADAR_CHAIN, 64, 105.0, p99=600.0),  # faster, but p99 TPOT 1.2x
        level(RADAR_TREE, 64, 100.0, p99=540.0),
        {"config": RADAR_TREE, "concurrency": 4, "error": "server did not start"},
    ]}
    lines = goal_lines(document)
    at16 = row_of(lines, "served, 16 streams (3 runs)")
    assert at16[1] == "100.0 tok/s" and at16[3] == "0.80x"
    assert at16[4] == "0.99x met"  # medians 99 / 100
    assert at16[5] == "1.20x, 1 failed not met"
    at64 = row_of(lines, "served, 64 streams")
    assert at64[4] == "1.05x, p99 TPOT 1.20x not met"
    assert at64[5] == "1.00x, p99 TPOT 1.08x met"
    assert not any(line.startswith("| served, 4 streams") for line in lines)  # no no-spec level there


def test_no_cells_no_table() -> None:
    assert goal_lines({"cells": [], "online": []}) == []
