"""Several engine starts per row (``engine_starts``): the harness runs the rows in turn, once per
start (every other pass in reverse order), each start in a fresh worker (its own row directory), and a cell pools the runs of every
start; greedy outputs that differ between starts mark the cell inconsistent, and a start that fails
fails its row. Rows are stand-ins (no vLLM)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from radar_vllm.bench.configs import NO_SPEC
from radar_vllm.bench.offline import output_key
from radar_vllm.bench.settings import GREEDY, MODE_BATCHED, BenchSettings

SECONDS = {NO_SPEC: [1.0, 1.1, 0.9], "eagle3-k1": [0.8, 1.0, 1.2]}  # per engine start


def _metrics() -> dict[str, Any]:
    return {"counters": {}, "vectors": {}, "histograms": {}}


@pytest.mark.parametrize("differ_in_start", [None, 2])
def test_rows_run_in_turn_once_per_engine_start_and_cells_pool_every_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bench_models: tuple[Path, Path, Path],
        differ_in_start: int | None) -> None:
    from radar_vllm.bench import harness

    calls: list[tuple[str, str]] = []

    def fake_row(job: dict, row_dir: Path, env: dict, timeout_s: float, bar: Any, resume: bool = False,
                 units: int = 0) -> dict[str, Any]:
        name = job["config"]["name"]
        start = sum(called == name for called, _ in calls)
        calls.append((name, row_dir.name))
        ids = [[1, 2, 3]] if not (name == "eagle3-k1" and start == differ_in_start) else [[1, 2, 4]]
        run = {"workload": "mtbench", "temperature": GREEDY, "mode": MODE_BATCHED, "repeat": 0, "num_prompts": 1,
               "prompt_tokens": 10, "output_tokens": 100, "seconds": SECONDS[name][start], "metrics": _metrics()}
        key = output_key("mtbench", MODE_BATCHED)
        return {"runs": [run], "outputs": {key: ids}, "outputs_consistent": {key: True}, "sampled_outputs": [],
                "error": None, "radar_plugin_loaded": True, "engine_start_seconds": 5.0}

    monkeypatch.setattr(harness, "vllm_installed", lambda: True)
    monkeypatch.setattr(harness, "run_config_subprocess", fake_row)
    target, head, _ = tiny_bench_models
    settings = BenchSettings(target=str(target), head=str(head), backend="vllm", k_list=(1,), include_radar=False,
                             include_dynamic_sd=False, confidence_threshold=None, workloads=("mtbench",),
                             num_prompts=1, max_new_tokens=6, temperatures=(GREEDY,),
                             offline_modes=(MODE_BATCHED,), repeats=1, engine_starts=3, online_concurrency=(),
                             dtype="float32", output_dir=str(tmp_path), tag="s", plots=False)
    outputs = harness.run_benchmark(settings)
    document = json.loads(outputs.json_path.read_text())
    # the rows in turn, every other pass in reverse order (a drifting machine favours no row), a fresh
    # row directory per start
    assert calls == [(NO_SPEC, NO_SPEC), ("eagle3-k1", "eagle3-k1"), ("eagle3-k1", "eagle3-k1@2"),
                     (NO_SPEC, f"{NO_SPEC}@2"), (NO_SPEC, f"{NO_SPEC}@3"), ("eagle3-k1", "eagle3-k1@3")]
    cells = {cell["config"]: cell for cell in document["cells"]}
    for name, seconds in SECONDS.items():
        rates = sorted(100 / s for s in seconds)
        spread = cells[name]["tokens_per_s"]
        assert spread["median"] == pytest.approx(rates[1]) and spread["minimum"] == pytest.approx(rates[0])
        assert spread["maximum"] == pytest.approx(rates[2])
    runs = document["runs"]["eagle3-k1"]
    assert [run["engine_start"] for run in runs] == [0, 1, 2]
    assert cells["eagle3-k1"]["repeats_consistent"] is (differ_in_start is None)
    assert "3 engine starts x 1 repeat(s)" in outputs.markdown_path.read_text()


def test_a_later_engine_start_that_fails_fails_its_row() -> None:
    from radar_vllm.bench.harness import merge_engine_starts

    key = output_key("mtbench", MODE_BATCHED)
    first = {"runs": [{"seconds": 1.0}], "outputs": {key: [[1]]}, "outputs_consistent": {key: True}, "error": None}
    failed = merge_engine_starts(first, {"error": "worker exited with code 1", "log_tail": "boom"}, 1)
    assert failed["error"].startswith("engine start 2: worker exited") and failed["runs"] == first["runs"]
    merged = merge_engine_starts(first, {"runs": [{"seconds": 2.0}], "outputs": {key: [[1]]},
                                         "outputs_consistent": {key: True}, "error": None}, 1)
    assert [run["engine_start"] for run in merged["runs"]] == [0, 1] and merged["outputs_consistent"][key]
    assert first == {"runs": [{"seconds": 1.0}], "outputs": {key: [[1]]}, "outputs_consistent": {key: True},
                     "error": None}  # the first start's result is not changed
