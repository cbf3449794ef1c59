"""The ``main`` preset (the main job, ``bash benchmarks/run_main.sh``): its rows and size, its
file name on the shipped assets, and the one summary table it prints. No vLLM, a few seconds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import bench_rows, bench_settings
from radar_vllm.bench.configs import KIND_EAGLE3, KIND_NONE, KIND_RADAR, NO_SPEC, RADAR_CHAIN, RADAR_TREE, BenchConfig
from radar_vllm.bench.estimate import estimate_run, planned_online_rows, planned_rows, planned_workloads
from radar_vllm.bench.reference_backend import cumulative_histogram
from radar_vllm.bench.report import build_document, render_summary
from radar_vllm.bench.settings import GREEDY, MODE_BATCHED, BenchSettings
from radar_vllm.bench.snapshots import NUM_ACCEPTED_TOKENS, NUM_DRAFTS, RADAR_DRAFT_CALLS, RADAR_ROUNDS, \
    RADAR_STOP_DEPTH, MetricSnapshot
from radar_vllm.bench.workloads import MTBENCH

MAIN_ROWS = [NO_SPEC, "eagle3-k1", "eagle3-k2", "eagle3-k3", "eagle3-dynamic", RADAR_CHAIN, RADAR_TREE]
# the cost model's estimate; on a 2-core CPU without AVX-512 the run takes about 2-3x as long
MAIN_ESTIMATE_MINUTES = (10.0, 35.0)


def main_settings(**overrides: Any) -> BenchSettings:
    return bench_settings("main", **overrides)


def test_main_preset_rows_and_size(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    settings = main_settings()
    assert planned_rows(settings) == MAIN_ROWS
    assert [c.name for c in bench_rows(settings, tiny_bench_models)] == MAIN_ROWS
    # greedy only (every output compared with no speculation), one batch of MT-Bench first turns
    assert planned_workloads(settings) == [MTBENCH] and settings.temperatures == (GREEDY,)
    assert settings.modes_for(tree=False) == settings.modes_for(tree=True) == (MODE_BATCHED,)
    assert (settings.num_prompts, settings.max_new_tokens, settings.dtype) == (16, 128, "float32")
    assert (settings.repeats_for(tree=False), settings.repeats_for(tree=True), settings.engine_starts) == (1, 1, 3)
    assert settings.online_concurrency == () and planned_online_rows(settings, MAIN_ROWS) == []
    minutes = estimate_run(settings).total_s / 60.0
    assert MAIN_ESTIMATE_MINUTES[0] <= minutes <= MAIN_ESTIMATE_MINUTES[1], minutes


def test_cli_main_preset_and_its_file_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from radar_vllm.cli import build_parser
    from radar_vllm.commands import bench

    monkeypatch.setattr(bench, "default_assets", lambda: ("smollm2", "radar"))
    parser = build_parser()
    settings = bench.settings_from_args(parser.parse_args(["bench", "--preset", "main", "--backend", "vllm"]))
    assert settings.tag == "main_smollm2" and (settings.target, settings.radar_checkpoint) == ("smollm2", "radar")
    assert settings.k_list == (1, 2, 3) and settings.dtype == "float32"
    wider = bench.settings_from_args(parser.parse_args(["bench", "--preset", "main", "--backend", "vllm",
                                                       "--k", "1,2,3,4,5,6,7"]))
    assert wider.k_list == tuple(range(1, 8)) and wider.num_prompts == 16  # explicit beats the preset
    other = bench.settings_from_args(parser.parse_args(["bench", "--preset", "main", "--backend", "vllm",
                                                        "--target", "m", "--radar-checkpoint", "r"]))
    assert other.tag == "bench-main"


def _main_document() -> dict[str, Any]:
    """No speculation, stock EAGLE-3 at K = 1 and 2, RADAR chain and tree on 4 greedy batched
    prompts; K = 2 is the fastest stock row, the tree's second output differs from no speculation's."""
    def row(seconds: float, drafts: float = 0.0, accepted: float = 0.0, calls: float = 0.0,
            stops: list[int] | None = None) -> MetricSnapshot:
        metrics = MetricSnapshot(counters={NUM_DRAFTS: drafts, NUM_ACCEPTED_TOKENS: accepted} if drafts else {})
        if stops:
            metrics.counters.update({RADAR_DRAFT_CALLS: calls, RADAR_ROUNDS: float(len(stops))})
            metrics.histograms[RADAR_STOP_DEPTH] = cumulative_histogram(stops, [1, 2, 3, 4])
        return metrics

    configs = [BenchConfig(name=NO_SPEC, kind=KIND_NONE),
               BenchConfig(name="eagle3-k1", kind=KIND_EAGLE3, num_speculative_tokens=1, draft_model="h"),
               BenchConfig(name="eagle3-k2", kind=KIND_EAGLE3, num_speculative_tokens=2, draft_model="h"),
               BenchConfig(name=RADAR_CHAIN, kind=KIND_RADAR, num_speculative_tokens=4, draft_model="r"),
               BenchConfig(name=RADAR_TREE, kind=KIND_RADAR, mode="tree", num_speculative_tokens=11, draft_model="r")]
    metrics = {NO_SPEC: (2.0, row(2.0)), "eagle3-k1": (1.6, row(1.6, 40, 10)), "eagle3-k2": (1.25, row(1.25, 40, 20)),
               RADAR_CHAIN: (1.0, row(1.0, 30, 30, 6, [1, 1, 2, 2])), RADAR_TREE: (4.0, row(4.0, 20, 30, 4, [2, 2]))}
    key = f"{MTBENCH}|{MODE_BATCHED}"
    results = {}
    for name, (seconds, snapshot) in metrics.items():
        outputs = [[1, 2], [3, 4], [5], [6]] if name != RADAR_TREE else [[1, 2], [3, 9], [5], [6]]
        results[name] = {"runs": [{"workload": MTBENCH, "temperature": GREEDY, "mode": MODE_BATCHED, "repeat": r,
                                   "num_prompts": 4, "prompt_tokens": 40, "output_tokens": 100, "seconds": seconds,
                                   "metrics": snapshot.to_dict()} for r in range(2)],
                         "outputs": {key: outputs}, "outputs_consistent": {key: True}}
    return build_document(settings=main_settings().to_dict() | {"tag": "main_smollm2"}, backend="vllm",
                          configs=configs, results=results,
                          workloads=[{"name": MTBENCH, "prompt_ids": [[1]] * 4, "prompt_keys": list("abcd")}],
                          online=[], models={"target": "T", "radar_checkpoint": "R"}, notes=[], machine={},
                          packages={})


def test_summary_is_one_table_with_the_best_k_marked() -> None:
    summary = render_summary(_main_document())
    lines = [line for line in summary.splitlines() if line.startswith("|")]
    assert lines[0] == ("| method | tok/s | vs no speculation | vs best stock EAGLE-3 | mean acceptance length | "
                        "draft calls per round | mean stop depth | mean tree size | greedy outputs match no-spec |")
    assert len(lines) == 2 + 5 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "mtbench, 4 prompts, up to 128 new tokens, T=0, batched (batch 4), float32, 3 engine starts x 1 repeat(s)" in summary
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[2:]}
    assert list(rows) == [NO_SPEC, "eagle3-k1", "eagle3-k2 (best K)", RADAR_CHAIN, RADAR_TREE]
    # tok/s 100 / 1.0 s; 1.25x the best stock K (80 tok/s), 2x no speculation (50 tok/s)
    assert rows[RADAR_CHAIN][1:4] == ["100.0", "2.00x (2.00–2.00)", "1.25x (1.25–1.25)"]
    # acceptance length 1 + 60 / 60, 12 draft calls in 8 rounds, stop depths 1, 1, 2, 2
    assert rows[RADAR_CHAIN][4:7] == ["2.00", "1.50", "1.50"]
    assert rows["eagle3-k2 (best K)"][5:7] == ["2.00", "–"] and rows[NO_SPEC][4] == "–"
    assert rows[NO_SPEC][-1] == "reference |" and rows[RADAR_CHAIN][-1] == "4/4 yes |"
    assert rows[RADAR_TREE][-1] == "3/4 NO |"


def test_cli_main_preset_prints_only_the_summary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from radar_vllm.bench import harness
    from radar_vllm.cli import main

    document = _main_document()
    (tmp_path / "main.md").write_text("## Offline\n")
    outputs = harness.BenchOutputs(tmp_path / "main.json", tmp_path / "main.md", [], document)
    monkeypatch.setattr(harness, "run_benchmark", lambda settings: outputs)
    assert main(["bench", "--preset", "main", "--target", "t", "--radar-checkpoint", "r", "--backend", "vllm"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("RADAR main job: mtbench") and "eagle3-k2 (best K)" in printed
    assert "## Offline" not in printed and f"table:   {tmp_path / 'main.md'}" in printed
