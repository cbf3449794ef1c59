"""The ``report`` preset, its run-time estimate, per-workload temperatures, batch-1 prompt subsets
and resuming an interrupted run (finished rows and servers are reused, changed ones rerun).

No vLLM: the offline job runs on a fake engine, the worker subprocess is a stand-in module and
the online part is fed a stored result. A few seconds in all.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import BENCH_CLI, FakeLLM, bench_rows, bench_settings
from radar_vllm.bench.configs import (
    KIND_EAGLE3,
    KIND_NONE,
    KIND_RADAR,
    NO_SPEC,
    RADAR_CHAIN,
    RADAR_TREE,
    BenchConfig,
)
from radar_vllm.bench.estimate import (
    SMOLLM2_CPU_COSTS,
    CostModel,
    RowSpeed,
    estimate_run,
    planned_online_rows,
    planned_rows,
    planned_workloads,
)
from radar_vllm.bench.offline import run_offline_job, turn2_source_mode
from radar_vllm.bench.settings import (
    GREEDY,
    MODE_BATCH1,
    MODE_BATCHED,
    ONLINE_BEST_EAGLE3,
    ONLINE_SAMPLING_MIXED,
    PRESETS,
    BenchSettings,
    temperatures_for,
)
from radar_vllm.bench.workloads import HUMANEVAL, MTBENCH, MTBENCH_TURN2, SHAREGPT, Workload

# "about two hours" (the estimate errs long: every answer at full length)
REPORT_MINUTES_RANGE = (80.0, 150.0)
SECONDS_PER_MINUTE = 60.0


def report_settings(**overrides: Any) -> BenchSettings:
    return bench_settings("report", **overrides)


# ------------------------------------------------------------------------------ preset content
def test_report_preset_has_every_row_the_report_needs(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    settings = report_settings()
    # no speculation, the stock K sweep, stock Dynamic SD tuned from it, both RADAR rows
    expected = [NO_SPEC] + [f"eagle3-k{k}" for k in range(1, 5)] + ["eagle3-dynamic", RADAR_CHAIN, RADAR_TREE]
    assert planned_rows(settings) == expected
    # the names match what the harness builds from real checkpoints
    built = bench_rows(settings, tiny_bench_models)
    assert [c.name for c in built] == expected
    assert not any(c.plugin_disabled or c.sampled_only for c in built)


def test_report_preset_covers_every_cell_of_the_goal() -> None:
    settings = report_settings()
    assert planned_workloads(settings) == [MTBENCH, HUMANEVAL, SHAREGPT]
    for workload in (MTBENCH, HUMANEVAL, SHAREGPT):
        assert temperatures_for(settings.temperatures, settings.sampled_workloads, workload) == (GREEDY, 1.0)
    assert settings.modes_for(tree=False) == (MODE_BATCH1, MODE_BATCHED)
    assert settings.modes_for(tree=True) == (MODE_BATCH1, MODE_BATCHED)
    assert (settings.repeats_for(tree=False), settings.repeats_for(tree=True), settings.engine_starts) == (1, 1, 2)
    assert settings.max_new_tokens == 128 and settings.num_prompts == 16 and settings.dtype == "float32"
    assert settings.batch1_prompts_for(settings.num_prompts) == 4
    assert settings.online_concurrency == (1, 4, 16, 64)
    assert planned_online_rows(settings, planned_rows(settings)) == [NO_SPEC, "eagle3-dynamic", RADAR_CHAIN,
                                                                     RADAR_TREE]
    assert (settings.online_sampling, settings.online_disconnect_fraction, settings.online_duration_s) == (
        ONLINE_SAMPLING_MIXED, 0.2, 60.0)


def test_report_preset_estimate_is_about_two_hours() -> None:
    minutes = estimate_run(report_settings()).total_s / SECONDS_PER_MINUTE
    assert REPORT_MINUTES_RANGE[0] <= minutes <= REPORT_MINUTES_RANGE[1], minutes


def test_every_preset_validates() -> None:
    for name in PRESETS:
        settings = bench_settings(name)
        assert settings.repeats >= 1, name


# ------------------------------------------------------------------------------ estimate
def test_no_spec_rate_interpolates_the_two_measurements() -> None:
    costs = SMOLLM2_CPU_COSTS
    assert costs.no_spec_tokens_per_s(1) == pytest.approx(costs.batch1_tokens_per_s)
    assert costs.no_spec_tokens_per_s(16) == pytest.approx(costs.reference_batch_tokens_per_s)
    rates = [costs.no_spec_tokens_per_s(b) for b in (1, 2, 4, 8, 16, 32)]
    assert rates == sorted(rates)
    with pytest.raises(ValueError, match="batch_size"):
        costs.no_spec_tokens_per_s(0)
    with pytest.raises(ValueError, match="row"):
        costs.speed("medusa", 1, GREEDY)


def test_estimate_by_hand() -> None:
    # 10 tok/s at batch 1, 20 tok/s at batch 2 (no batching penalty); no-spec and eagle3-k1 only
    costs = CostModel(engine_start_s=30.0, server_start_s=40.0, batch1_tokens_per_s=10.0, reference_batch=2,
                      reference_batch_tokens_per_s=20.0, run_overhead_s=1.0, warmup_s=2.0, sampled_factor=0.5,
                      score_s_per_output=0.5, eagle3_batch1=(0.5,), eagle3_batched=(0.25,),
                      rows={NO_SPEC: RowSpeed(1.0, 1.0)})
    settings = bench_settings(k_list=(1,), include_radar=False, include_dynamic_sd=False, confidence_threshold=None,
                              workloads=(MTBENCH, HUMANEVAL), num_prompts=2, batch1_prompts=1, max_new_tokens=10,
                              temperatures=(GREEDY, 1.0), sampled_workloads=(MTBENCH,), repeats=2,
                              online_concurrency=(2,), online_requests=3, online_configs=(NO_SPEC,))
    estimate = estimate_run(settings, costs)
    # no-spec, per repeat: 3 cells (mtbench T0, T1, humaneval T0) x [batch1 10/10 + 1; batched 20/20 + 1] = 12
    assert estimate.offline_by_row_s[NO_SPEC] == pytest.approx(2 * 12.0)
    # eagle3-k1 per repeat: greedy batch1 10/5 + 1 = 3, batched 20/5 + 1 = 5 (x2 cells); T=1: 10/2.5 + 1, 20/2.5 + 1
    assert estimate.offline_by_row_s["eagle3-k1"] == pytest.approx(2 * (2 * (3.0 + 5.0) + 5.0 + 9.0))
    # online no-spec at 2: 3 requests = 2 waves of 2 x 10 tokens at 20 tok/s + 1
    assert estimate.online_by_row_s == {NO_SPEC: pytest.approx(2 + 1.0)}
    assert estimate.engine_starts_s == pytest.approx(2 * (30.0 + 2.0) + (40.0 + 2.0))
    # scoring: mtbench T=1, first repeat: 1 batch-1 + 2 batched outputs per row, 2 rows, 0.5 s each
    assert estimate.scoring_s == pytest.approx(2 * 3 * 0.5)
    assert estimate.total_s == pytest.approx(estimate.engine_starts_s + 24.0 + 60.0 + 3.0 + 3.0)
    assert "estimated run time" in estimate.summary()


@pytest.mark.parametrize("change", [
    {"num_prompts": 20},
    {"batch1_prompts": 5},
    {"repeats": 2},
    {"tree_repeats": 2},
    {"engine_starts": 3},
    {"max_new_tokens": 256},
    {"k_list": tuple(range(1, 9))},
    {"workloads": (MTBENCH, MTBENCH_TURN2, HUMANEVAL, SHAREGPT)},
    {"temperatures": (GREEDY, 0.7, 1.0)},
    {"online_concurrency": (1, 4, 16, 64, 128)},
    {"online_duration_s": 90.0},
])
def test_estimate_grows_with_every_size(change: dict[str, Any]) -> None:
    base = estimate_run(report_settings()).total_s
    assert estimate_run(report_settings(**change)).total_s > base


def test_estimate_leaves_out_finished_rows() -> None:
    settings = report_settings()
    full = estimate_run(settings)
    rest = estimate_run(settings, rows=[RADAR_TREE], online_rows=[])
    assert rest.total_s < full.total_s
    assert rest.offline_by_row_s == {RADAR_TREE: full.offline_by_row_s[RADAR_TREE]}


# ------------------------------------------------------------------------------ settings
def test_new_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="batch1_prompts"):
        bench_settings(batch1_prompts=0)
    with pytest.raises(ValueError, match="tree_repeats"):
        bench_settings(tree_repeats=0)
    with pytest.raises(ValueError, match="tree_modes"):
        bench_settings(tree_modes=())
    with pytest.raises(ValueError, match="offline mode"):
        bench_settings(tree_modes=("streaming",))
    with pytest.raises(ValueError, match="sampled_workloads"):
        bench_settings(workloads=(MTBENCH,), sampled_workloads=(HUMANEVAL,))


def test_temperatures_for() -> None:
    assert temperatures_for((0.0, 1.0), (), HUMANEVAL) == (0.0, 1.0)
    assert temperatures_for((0.0, 1.0), (MTBENCH,), MTBENCH_TURN2) == (0.0,)
    assert temperatures_for((1.0,), (MTBENCH,), HUMANEVAL) == ()


# ------------------------------------------------------------------------------ command line
def test_cli_report_preset_quick_and_conflicts() -> None:
    from radar_vllm.cli import build_parser
    from radar_vllm.commands.bench import PRESET_NAMES, settings_from_args

    assert PRESET_NAMES == tuple(PRESETS)
    parser = build_parser()
    base = BENCH_CLI
    report = settings_from_args(parser.parse_args(base + ["--preset", "report", "--tree-repeats", "2", "--tree-modes", "batch1"]))
    assert report.tag == "bench-report-reference" and not report.quick
    assert report.tree_repeats == 2 and report.tree_modes == (MODE_BATCH1,)  # explicit beats the preset
    assert report.sampled_workloads == () and report.batch1_prompts == 4 and report.resume
    quick = settings_from_args(parser.parse_args(base + ["--quick"]))
    assert quick == settings_from_args(parser.parse_args(base + ["--preset", "quick"]))
    assert quick.quick and quick.tag == "bench-quick-reference"
    fresh = settings_from_args(parser.parse_args(base + ["--preset", "report", "--no-resume",
                                                         "--sampled-workloads", "none"]))
    assert not fresh.resume and fresh.sampled_workloads == ()
    with pytest.raises(ValueError, match="--quick"):
        settings_from_args(parser.parse_args(base + ["--quick", "--preset", "report"]))


def test_cli_estimate_prints_and_runs_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from radar_vllm.cli import main

    code = main(BENCH_CLI + ["--preset", "report", "--estimate", "--output-dir", str(tmp_path)])
    assert code == 0
    assert "estimated run time" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ offline job
def test_offline_job_samples_only_listed_workloads_and_times_a_batch1_subset(
        tiny_bench_models: tuple[Path, Path, Path]) -> None:
    mtbench = Workload(name=MTBENCH, prompt_ids=[[1, 2], [3], [4, 5, 6]], prompt_keys=["a", "b", "c"],
                       turns=[["Hi.", "More."], ["Why?", "Why not?"], ["Name a fruit.", "Another."]])
    humaneval = Workload(name=HUMANEVAL, prompt_ids=[[7], [8], [9]], prompt_keys=["h1", "h2", "h3"])
    llm = FakeLLM()  # answers every prompt with its own last token repeated
    job = {"workloads": [mtbench.to_dict(), humaneval.to_dict()], "temperatures": [0.0, 1.0],
           "sampled_workloads": [MTBENCH], "batch1_prompts": 2, "modes": [MODE_BATCH1, MODE_BATCHED],
           "repeats": 2, "max_new_tokens": 4, "seed": 0, "warmup": False,
           "build_turn2": {"tokenizer": str(tiny_bench_models[0]), "max_prompt_tokens": 4096}}
    result = run_offline_job(job, llm, lambda: None)
    cells = {(r["workload"], r["temperature"], r["mode"]) for r in result["runs"]}
    assert cells == {(MTBENCH, 0.0, MODE_BATCH1), (MTBENCH, 0.0, MODE_BATCHED), (MTBENCH, 1.0, MODE_BATCH1),
                     (MTBENCH, 1.0, MODE_BATCHED), (MTBENCH_TURN2, 0.0, MODE_BATCH1),
                     (MTBENCH_TURN2, 0.0, MODE_BATCHED), (HUMANEVAL, 0.0, MODE_BATCH1),
                     (HUMANEVAL, 0.0, MODE_BATCHED)}
    assert len(result["runs"]) == 2 * len(cells)
    for run in result["runs"]:
        assert run["num_prompts"] == (2 if run["mode"] == MODE_BATCH1 else 3)
    assert result["outputs"][f"{HUMANEVAL}|{MODE_BATCH1}"] == [[7] * 4, [8] * 4]
    # batch 1 covers 2 of 3 prompts: turn 2 is built from the batched answers, for all 3 prompts
    assert [w["prompt_keys"] for w in result["derived_workloads"]] == [["a", "b", "c"]]
    assert turn2_source_mode([MODE_BATCH1, MODE_BATCHED], 3, None) == MODE_BATCH1
    assert turn2_source_mode([MODE_BATCH1], 3, 2) == MODE_BATCH1


@pytest.mark.parametrize("listed", [[], [HUMANEVAL]])
def test_offline_job_samples_every_listed_workload_not_only_the_first(listed: list[str]) -> None:
    # (the sampled outputs of the first workload once took the place of the list: every later
    # workload then ran greedy only)
    first = Workload(name=MTBENCH, prompt_ids=[[1], [2]], prompt_keys=["a", "b"])
    second = Workload(name=HUMANEVAL, prompt_ids=[[3], [4]], prompt_keys=["c", "d"])
    third = Workload(name=SHAREGPT, prompt_ids=[[5], [6]], prompt_keys=["e", "f"])
    job = {"workloads": [first.to_dict(), second.to_dict(), third.to_dict()], "temperatures": [0.0, 1.0],
           "sampled_workloads": listed, "modes": [MODE_BATCHED], "repeats": 1, "max_new_tokens": 2, "seed": 0,
           "warmup": False}
    result = run_offline_job(job, FakeLLM(), lambda: None)
    sampled = {(r["workload"], r["temperature"]) for r in result["runs"] if r["temperature"] > 0}
    expected = {(name, 1.0) for name in (listed or [MTBENCH, HUMANEVAL, SHAREGPT])}
    assert sampled == expected
    assert {entry["workload"] for entry in result["sampled_outputs"]} == {name for name, _ in expected}


def test_offline_job_of_a_radar_row_records_the_depth_gate() -> None:
    class GateLLM(FakeLLM):
        def collective_rpc(self, method: str) -> list[Any]:
            assert method == "radar_gate_summary"
            return [{"gate": {"1": {"rate_d0": 20.0 + len(self.calls)}}, "rounds": {"draft": len(self.calls)}}]

    workload = Workload(name=MTBENCH, prompt_ids=[[1, 2], [3]], prompt_keys=["a", "b"])
    job = {"workloads": [workload.to_dict()], "temperatures": [0.0], "modes": [MODE_BATCHED], "repeats": 2,
           "max_new_tokens": 3, "seed": 0, "warmup": False}
    radar = BenchConfig(name=RADAR_CHAIN, kind=KIND_RADAR, num_speculative_tokens=7, max_depth=7, draft_model="ckpt")
    runs = run_offline_job(dict(job, config=radar.to_dict()), GateLLM(), lambda: None)["runs"]
    assert [run["gate"]["rounds"]["draft"] for run in runs] == [1, 2]  # read after each run
    assert runs[1]["gate"]["gate"]["1"]["rate_d0"] == 22.0
    stock = BenchConfig(name="eagle3-k2", kind=KIND_EAGLE3, num_speculative_tokens=2, draft_model="head")

    class CachingLLM(FakeLLM):  # every timed run starts from an empty prefix cache
        def __init__(self) -> None:
            super().__init__()
            self.resets: list[int] = []

        def reset_prefix_cache(self) -> bool:
            self.resets.append(len(self.calls))
            return True

    caching = CachingLLM()
    run_offline_job(dict(job, config=stock.to_dict()), caching, lambda: None)
    assert caching.resets == [0, 1]  # before each of the two runs
    assert all("gate" not in run for run in run_offline_job(dict(job, config=stock.to_dict()), GateLLM(),
                                                             lambda: None)["runs"])


def test_workload_head() -> None:
    workload = Workload(name=MTBENCH, prompt_ids=[[1], [2]], prompt_keys=["a", "b"], turns=[["x"], ["y"]])
    assert workload.head(1) == Workload(name=MTBENCH, prompt_ids=[[1]], prompt_keys=["a"], turns=[["x"]])
    assert workload.head(5) == workload
    with pytest.raises(ValueError, match="count"):
        workload.head(0)


# ------------------------------------------------------------------------------ resuming
FAKE_WORKER = textwrap.dedent('''
    """Stand-in worker: counts its runs, fails when the job says so, else writes a result."""
    import argparse, json, sys
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("--job", type=Path)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    job = json.loads(args.job.read_text())
    with open(job["counter"], "a") as handle:
        handle.write(job["config"]["name"] + "\\n")
    error = "boom" if job.get("fail") else None
    args.result.write_text(json.dumps({"runs": [{"value": job["value"]}], "error": error}))
''')


class CountingBar:
    def __init__(self) -> None:
        self.n = 0

    def update(self, count: int) -> None:
        self.n += count


def test_rerun_reuses_finished_rows_and_reruns_changed_or_failed_ones(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from radar_vllm.bench import harness

    (tmp_path / "fake_bench_worker.py").write_text(FAKE_WORKER)
    monkeypatch.setattr(harness, "WORKER_MODULE", "fake_bench_worker")
    monkeypatch.setattr(harness, "POLL_S", 0.05)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    counter = tmp_path / "count.txt"
    row_dir = tmp_path / "rows" / "eagle3-k1"

    def run(job: dict, resume: bool = True) -> tuple[dict, int]:
        bar = CountingBar()
        result = harness.run_config_subprocess(job, row_dir, env, 60.0, bar, resume=resume, units=5)
        return result, bar.n

    def runs() -> int:
        return len(counter.read_text().splitlines()) if counter.is_file() else 0

    job = {"config": {"name": "eagle3-k1"}, "counter": str(counter), "value": 1}
    first, _ = run(job)
    assert first["error"] is None and not first.get("resumed") and runs() == 1
    again, advanced = run(job)
    assert again["resumed"] and again["runs"] == [{"value": 1}] and advanced == 5 and runs() == 1
    assert harness.finished_result(row_dir, job) is not None
    changed, _ = run(dict(job, value=2))  # other settings: measured again
    assert changed["runs"] == [{"value": 2}] and runs() == 2
    run(dict(job, value=2), resume=False)  # --no-resume
    assert runs() == 3
    failed, _ = run(dict(job, value=3, fail=True))
    assert failed["error"] == "boom" and runs() == 4
    assert harness.finished_result(row_dir, dict(job, value=3, fail=True)) is None
    retried, _ = run(dict(job, value=3, fail=True))
    assert retried["error"] == "boom" and runs() == 5  # a failed row is tried again


def test_rerun_reuses_finished_online_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radar_vllm.bench import harness, online

    settings = bench_settings(online_concurrency=(1, 2), online_requests=2, online_max_new_tokens=8,
                             work_dir=str(tmp_path), output_dir=str(tmp_path))
    models = harness.BenchModels(target="t", head="h", radar_checkpoint="r", confidence_checkpoint=None)
    config = BenchConfig(name=RADAR_CHAIN, kind=KIND_RADAR, num_speculative_tokens=4, max_depth=4, draft_model="r")
    prompts = [[1, 2], [3]]
    levels = [{"concurrency": c, "num_requests": 2, "completed": 2, "config": RADAR_CHAIN} for c in (1, 2)]
    request = harness.online_request(settings, config, models, prompts)
    harness.write_json(tmp_path / "online" / f"{RADAR_CHAIN}.json", {"request": request, "levels": levels})

    def no_server(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished online row must not start a server")

    monkeypatch.setattr(online, "start_server", no_server)
    entries = harness.run_online(settings, [config], models, prompts, tmp_path, {})
    assert [(e["concurrency"], e["resumed"]) for e in entries] == [(1, True), (2, True)]
    # other prompts: not the stored request any more, so the server would be started (and fails here)
    assert harness.finished_online(tmp_path / "online" / f"{RADAR_CHAIN}.json",
                                   harness.online_request(settings, config, models, [[9]])) is None
    entries = harness.run_online(settings, [config], models, [[9]], tmp_path, {})
    assert entries == [{"config": RADAR_CHAIN, "server_start": 0,
                        "error": "AssertionError: a finished online row must not start a server"}]


def test_online_rows_best_eagle3_token() -> None:
    from radar_vllm.bench.harness import online_rows

    configs = [BenchConfig(name=NO_SPEC, kind=KIND_NONE),
               BenchConfig(name="eagle3-k1", kind=KIND_EAGLE3, num_speculative_tokens=1, draft_model="h"),
               BenchConfig(name="eagle3-k2", kind=KIND_EAGLE3, num_speculative_tokens=2, draft_model="h"),
               BenchConfig(name=RADAR_CHAIN, kind=KIND_RADAR, num_speculative_tokens=4, draft_model="r"),
               BenchConfig(name=RADAR_TREE, kind=KIND_RADAR, num_speculative_tokens=9, draft_model="r")]
    cell = {"workload": MTBENCH, "temperature": 0.0, "mode": MODE_BATCH1}
    document = {"cells": [dict(cell, config=NO_SPEC, kind=KIND_NONE, tokens_per_s={"median": 50.0}),
                          dict(cell, config="eagle3-k1", kind=KIND_EAGLE3, tokens_per_s={"median": 40.0}),
                          dict(cell, config="eagle3-k2", kind=KIND_EAGLE3, tokens_per_s={"median": 45.0})]}
    chosen = online_rows(configs, document, {}, (NO_SPEC, ONLINE_BEST_EAGLE3, RADAR_CHAIN))
    assert [c.name for c in chosen] == [NO_SPEC, "eagle3-k2", RADAR_CHAIN]


def test_announced_estimate_leaves_out_rows_finished_in_the_work_dir(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from radar_vllm.bench import harness

    settings = report_settings(online_concurrency=())
    configs = [BenchConfig(name=NO_SPEC, kind=KIND_NONE),
               BenchConfig(name="eagle3-k1", kind=KIND_EAGLE3, num_speculative_tokens=1, draft_model="h")]
    notes: list[str] = []
    harness.announce_estimate(settings, configs, configs, tmp_path, notes)
    before = capsys.readouterr().err
    assert "no-spec" in before and "finished rows" not in before and "2 offline row(s)" in notes[0]
    harness.write_json(tmp_path / "rows" / NO_SPEC / harness.RESULT_FILE, {"runs": [], "error": None})
    harness.write_json(tmp_path / "rows" / "eagle3-k1" / harness.RESULT_FILE, {"error": "boom"})
    harness.announce_estimate(settings, configs, configs, tmp_path, notes)
    after = capsys.readouterr().err
    assert f"finished rows found in {tmp_path} (reused where the job is unchanged): no-spec" in after
    assert "1 offline row(s)" in notes[1]


def test_markdown_states_the_narrowed_grid() -> None:
    from radar_vllm.bench.report import sampling_lines

    assert sampling_lines(bench_settings().to_dict()) == []
    lines = sampling_lines(report_settings(sampled_workloads=(MTBENCH,), tree_repeats=3).to_dict())
    assert lines == [
        "- Batch 1 times the first 4 prompts of each workload (batched: all of them in one call)",
        "- T > 0 only on mtbench; the other workloads are greedy only",
        "- Tree rows (radar-tree, static-tree): batch1, batched, 3 repeat(s)",
    ]


def test_turn2_without_its_source_is_refused() -> None:
    with pytest.raises(ValueError, match="built from the greedy no-speculation answers"):
        bench_settings(workloads=("sharegpt", "mtbench-turn2"))
    with pytest.raises(ValueError, match="add 'mtbench' to workloads and 0 to temperatures"):
        bench_settings(workloads=("mtbench", "mtbench-turn2"), temperatures=(1.0,))
    assert bench_settings(workloads=("mtbench", "mtbench-turn2")).workloads[1] == "mtbench-turn2"
