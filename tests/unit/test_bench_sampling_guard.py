"""The benchmark guards itself against broken sampling: the sample-quality test, the scores of
T > 0 cells in the results, the flag in the report, and the stock EAGLE-3 row run as shipped
(``VLLM_PLUGINS=""``). No vLLM: engines are stand-ins; the scorer is a tiny random Llama.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import BENCH_CLI, FakeLLM, bench_settings
from radar_vllm.bench.configs import KIND_EAGLE3, KIND_NONE, KIND_RADAR, NO_SPEC, RADAR_CHAIN, BenchConfig
from radar_vllm.bench.sample_quality import compare_quality, load_scorer, logprob_per_token, two_sided_p
from radar_vllm.bench.settings import GREEDY, MODE_BATCHED, BenchSettings

UNCORRECTED = "eagle3-k1-uncorrected"


# ------------------------------------------------------------------------------ the test statistic
def _normal(rng: random.Random, mean: float, std: float, count: int) -> list[float]:
    return [rng.gauss(mean, std) for _ in range(count)]


def test_compare_quality_flags_clearly_different_samples() -> None:
    rng = random.Random(0)
    # the measured SmolLM2 gap: about -1.0 per token without speculation, -6.1 with the broken kernel
    comparison = compare_quality(_normal(rng, -1.0, 0.3, 8), _normal(rng, -6.1, 1.0, 8), 0.6)
    assert comparison.flagged and comparison.p_value < 1e-6
    assert comparison.difference == pytest.approx(comparison.candidate_mean - comparison.baseline_mean)
    assert comparison.difference < -4.0 and (comparison.num_baseline, comparison.num_candidate) == (8, 8)
    assert comparison.to_dict()["flagged"] is True


def test_compare_quality_does_not_flag_samples_of_the_same_law() -> None:
    rng = random.Random(1)
    trials = 400
    flagged = sum(compare_quality(_normal(rng, -1.0, 0.5, 8), _normal(rng, -1.0, 0.5, 8), 1.0).flagged
                  for _ in range(trials))
    assert flagged <= 3  # expected 0.4 at alpha 1e-3
    same = [-1.2, -0.8, -1.0, -1.1]
    assert compare_quality(same, list(same), 1.0).p_value == pytest.approx(1.0)


def test_few_outputs_are_not_over_trusted() -> None:
    # 2 outputs per side: z = 0.5 / 0.141 = 3.5 (p 4e-4 for a normal law), but t with ~2 degrees of freedom
    comparison = compare_quality([-1.0, -1.2], [-1.5, -1.7], 1.0)
    assert comparison.df == pytest.approx(2.0)
    assert 0.05 < comparison.p_value < 0.1 and not comparison.flagged
    # empty outputs (NaN) are left out; fewer than 2 scored outputs cannot be tested
    assert compare_quality([-1.0, math.nan, -1.2], [-1.5, -1.7], 1.0).num_baseline == 2
    with pytest.raises(ValueError, match="at least 2"):
        compare_quality([-1.0], [-1.5, -1.7], 1.0)


def test_two_sided_p_of_student_t() -> None:
    assert two_sided_p(2.228, 10) == pytest.approx(0.05, abs=2e-4)
    assert two_sided_p(12.706, 1) == pytest.approx(0.05, abs=2e-4)
    assert two_sided_p(3.2905, 1e9) == pytest.approx(1e-3, rel=1e-3)  # the normal law
    assert two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert two_sided_p(math.inf, 5) == 0.0


def test_logprob_per_token_is_the_mean_tempered_log_prob(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    model = load_scorer(tiny_bench_models[0])
    prompt, output = [3, 17, 42, 5], [9, 100, 7]
    (score, empty) = logprob_per_token(model, [prompt, prompt], [output, []], 0.5)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + output])).logits[0].float()
    logprobs = torch.log_softmax(logits / 0.5, dim=-1)
    expected = sum(float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(output)) / len(output)
    assert score == pytest.approx(expected, abs=1e-4)
    assert math.isnan(empty)


def test_logprob_per_token_batched_equals_one_by_one(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    model = load_scorer(tiny_bench_models[0])
    prompts = [[3, 17, 42, 5], [8], [11, 12, 13, 14, 15, 16, 17], [4, 4]]
    outputs = [[9, 100, 7], [5, 6, 7, 8, 9, 10], [], [77]]
    batched = logprob_per_token(model, prompts, outputs, 0.7, batch_size=4)
    single = logprob_per_token(model, prompts, outputs, 0.7, batch_size=1)
    assert math.isnan(batched[2]) and math.isnan(single[2])
    for a, b in zip(batched[:2] + batched[3:], single[:2] + single[3:]):
        assert a == pytest.approx(b, abs=1e-4)


# ------------------------------------------------------------------------------ report
def _metrics() -> dict[str, Any]:
    return {"counters": {}, "vectors": {}, "histograms": {}}


def _row(temperature_runs: dict[float, float], scores: list[float] | None) -> dict[str, Any]:
    """A row's result: one batched run of 100 tokens per temperature (seconds given), scores at T = 1."""
    runs = [{"workload": "mtbench", "temperature": t, "mode": MODE_BATCHED, "repeat": 0, "num_prompts": 8,
             "prompt_tokens": 80, "output_tokens": 100, "seconds": seconds, "metrics": _metrics()}
            for t, seconds in temperature_runs.items()]
    sampled = [] if scores is None else [{"workload": "mtbench", "temperature": 1.0, "mode": MODE_BATCHED,
                                          "outputs": [[1]] * len(scores), "scores": scores}]
    return {"runs": runs, "sampled_outputs": sampled, "error": None}


def _guarded_results() -> tuple[list[BenchConfig], dict[str, Any]]:
    rng = random.Random(2)
    good = lambda: _normal(rng, -1.0, 0.3, 8)  # noqa: E731
    configs = [
        BenchConfig(name=NO_SPEC, kind=KIND_NONE),
        BenchConfig(name="eagle3-k1", kind=KIND_EAGLE3, num_speculative_tokens=1, draft_model="h"),
        BenchConfig(name=UNCORRECTED, kind=KIND_EAGLE3, num_speculative_tokens=1, draft_model="h",
                    plugin_disabled=True, sampled_only=True),
        BenchConfig(name=RADAR_CHAIN, kind=KIND_RADAR, num_speculative_tokens=4, draft_model="r"),
    ]
    results = {
        NO_SPEC: _row({0.0: 2.0, 1.0: 2.0}, good()),
        "eagle3-k1": _row({0.0: 1.0, 1.0: 1.6}, good()),
        UNCORRECTED: _row({1.0: 0.5}, _normal(rng, -6.1, 1.0, 8)),  # fastest at T = 1, and broken
        RADAR_CHAIN: _row({0.0: 0.8, 1.0: 0.4}, _normal(rng, -5.0, 1.0, 7) + [None]),  # broken too
    }
    return configs, results


def _document() -> dict[str, Any]:
    from radar_vllm.bench.report import build_document

    configs, results = _guarded_results()
    return build_document(settings={"tag": "t"}, backend="vllm", configs=configs, results=results,
                          workloads=[{"name": "mtbench", "prompt_ids": [[1]] * 8, "prompt_keys": list("abcdefgh")}],
                          online=[], models={"target": "T"}, notes=[], machine={}, packages={})


def test_results_json_carries_the_statistic_and_the_flag() -> None:
    document = json.loads(json.dumps(_document()))
    cells = {(c["config"], c["temperature"]): c for c in document["cells"]}
    base, k1 = cells[(NO_SPEC, 1.0)], cells[("eagle3-k1", 1.0)]
    broken, radar = cells[(UNCORRECTED, 1.0)], cells[(RADAR_CHAIN, 1.0)]
    assert len(base["sample_scores"]) == 8 and base["logprob_per_token"] == pytest.approx(
        sum(base["sample_scores"]) / 8)
    assert base["sampling_check"] is None and not base["sampling_broken"]  # the reference itself
    assert cells[(NO_SPEC, 0.0)]["sample_scores"] is None  # greedy cells are not scored
    # the correct row passes, the uncorrected one and the broken RADAR row are flagged
    assert k1["sampling_check"]["p_value"] > 1e-3 and not k1["sampling_broken"]
    assert broken["sampling_broken"] and broken["sampling_check"]["p_value"] < 1e-6 and broken["plugin_disabled"]
    assert radar["sampling_broken"] and radar["sampling_check"]["num_candidate"] == 7  # the empty output left out
    assert broken["sampling_check"]["baseline_mean"] == pytest.approx(base["logprob_per_token"])
    # flagged speeds are not results: no ratios, never the best stock K (even when fastest)
    assert broken["vs_no_spec"] is None and radar["vs_no_spec"] is None and radar["vs_best_eagle3"] is None
    assert k1["best_eagle3"] == "eagle3-k1" and k1["vs_no_spec"]["value"] == pytest.approx(2.0 / 1.6)
    assert [(f["config"], f["temperature"]) for f in document["sampling"]["flagged"]] == [
        (UNCORRECTED, 1.0), (RADAR_CHAIN, 1.0)]


def test_report_marks_flagged_rows() -> None:
    from radar_vllm.bench.report import render_markdown

    markdown = render_markdown(_document())
    table = markdown[markdown.index("### mtbench, T=1, batched"):]
    header, rows = table.splitlines()[2], {line.split(" | ")[0][2:]: line for line in table.splitlines()[4:8]}
    assert header.endswith("| log-prob/token (no-spec) | sampling check |")
    assert "**sampling: BROKEN (p=" in rows[UNCORRECTED]
    assert "| ~~200.0 [200.0–200.0]~~ not a result | invalid | invalid |" in rows[UNCORRECTED]
    assert "| invalid | invalid |" in rows[RADAR_CHAIN] and "**sampling: BROKEN (p=" in rows[RADAR_CHAIN]
    assert "| passed (p=" in rows["eagle3-k1"] and "BROKEN" not in rows["eagle3-k1"]
    assert rows[NO_SPEC].endswith("| reference |")
    # next to each T > 0 row: its mean log-prob per token and no speculation's
    base_logprob = rows[NO_SPEC].split(" | ")[-2]
    assert rows["eagle3-k1"].split(" | ")[-2].endswith(f" ({base_logprob})")
    assert (f"Sampling BROKEN (outputs not distributed like no speculation's; speed not a result): "
            f"{UNCORRECTED}, {RADAR_CHAIN}.") in table
    assert "Best stock EAGLE-3 here: eagle3-k1." in table
    # the warning up front lists every flagged row; the headline gives RADAR no speed there
    assert markdown.index("## Sampling check FAILED") < markdown.index("## Offline")
    assert f"- {UNCORRECTED}: mtbench, T=1, batched: " in markdown
    assert "RADAR chain sampling BROKEN (p=" in markdown
    assert "| greedy match |" in markdown[markdown.index("### mtbench, T=0, batched"):]


def test_best_eagle3_row_skips_uncorrected_and_flagged_rows() -> None:
    from radar_vllm.bench.harness import best_eagle3_row, online_rows

    document = _document()
    document["cells"] = [c for c in document["cells"] if c["temperature"] == 1.0]  # first cell: T = 1
    assert best_eagle3_row(document) == "eagle3-k1"
    configs, results = _guarded_results()
    assert [c.name for c in online_rows(configs, document, results)] == [NO_SPEC, "eagle3-k1", RADAR_CHAIN]


# ------------------------------------------------------------------------------ offline job
def seed_llm() -> FakeLLM:
    """Answers each request with its sampling seed repeated (greedy: 0)."""
    return FakeLLM(answer=lambda request, params: [params.seed or 0] * params.max_tokens)


def test_offline_job_keeps_the_sampled_outputs_of_the_first_repeat() -> None:
    from radar_vllm.bench.offline import run_offline_job
    from radar_vllm.bench.workloads import Workload

    workload = Workload(name="mtbench", prompt_ids=[[1], [2], [3]], prompt_keys=["a", "b", "c"])
    job = {"workloads": [workload.to_dict()], "temperatures": [0.0, 0.7], "modes": ["batch1", "batched"],
           "repeats": 2, "max_new_tokens": 2, "seed": 10, "warmup": False, "batch1_prompts": 2}
    result = run_offline_job(job, seed_llm(), lambda: None)
    assert result["sampled_outputs"] == [
        {"workload": "mtbench", "temperature": 0.7, "mode": "batch1", "outputs": [[10, 10], [11, 11]]},
        {"workload": "mtbench", "temperature": 0.7, "mode": "batched", "outputs": [[10, 10], [11, 11], [12, 12]]},
    ]


# ------------------------------------------------------------------------------ the uncorrected row
def test_uncorrected_rows_settings_cli_and_estimate() -> None:
    from radar_vllm.bench.estimate import offline_row_seconds, planned_online_rows, planned_rows, SMOLLM2_CPU_COSTS
    from radar_vllm.cli import build_parser
    from radar_vllm.commands.bench import settings_from_args

    parser = build_parser()
    base = BENCH_CLI
    assert settings_from_args(parser.parse_args(base + ["--uncorrected-k", "1,3"])).uncorrected_k == (1, 3)
    assert settings_from_args(parser.parse_args(base)).uncorrected_k == ()
    assert settings_from_args(parser.parse_args(base + ["--preset", "sampling"])).uncorrected_k == (1,)
    report = settings_from_args(parser.parse_args(base + ["--preset", "report", "--uncorrected-k", "1",
                                                          "--sampled-workloads", "mtbench"]))
    assert report.uncorrected_k == (1,)
    assert settings_from_args(parser.parse_args(base + ["--preset", "sampling", "--uncorrected-k", "none"])
                              ).uncorrected_k == ()
    assert bench_settings(uncorrected_k=(1,), temperatures=(0.0, 0.6)).uncorrected_rows_k == (1,)
    greedy_only = dataclasses.replace(report, temperatures=(0.0,))  # nothing to show without T > 0
    assert greedy_only.uncorrected_rows_k == () and UNCORRECTED not in planned_rows(greedy_only)
    with pytest.raises(ValueError, match="uncorrected_k entries"):
        bench_settings(uncorrected_k=(0,))
    # the estimate runs it at T > 0 only and never serves it as the best K
    assert UNCORRECTED in planned_rows(report)
    assert offline_row_seconds(report, UNCORRECTED, SMOLLM2_CPU_COSTS) < 0.5 * offline_row_seconds(
        report, "eagle3-k1", SMOLLM2_CPU_COSTS)
    assert UNCORRECTED not in planned_online_rows(dataclasses.replace(report, online_configs=()), planned_rows(report))


def test_the_worker_does_not_load_the_plugin_itself() -> None:
    code = ("import sys, radar_vllm.bench.engine_process, radar_vllm.bench.offline, radar_vllm.offline.generate; "
            "print(sorted(m for m in sys.modules if m.startswith('radar_vllm.vllm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # the plugin (hooks, proposer, ...) is loaded by vLLM's plugin loader in the engine, never here
    assert out.strip() == "[]"


def test_worker_reports_whether_vllm_loaded_the_plugin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from radar_vllm.bench import engine_process as worker
    from radar_vllm.offline import generate

    monkeypatch.setattr(worker, "PLUGIN_MODULE", "fake_radar_plugin_for_test")
    job = {"engine": {"model": "m", "max_model_len": 64, "max_num_seqs": 1, "seed": 0, "dtype": "float32"},
           "config": {"speculative_config": None}, "progress_file": str(tmp_path / "progress"),
           "workloads": [], "temperatures": [0.0], "modes": [MODE_BATCHED], "repeats": 1, "max_new_tokens": 2,
           "seed": 0, "warmup": False}
    monkeypatch.setattr(generate, "make_llm", lambda *args, **kwargs: seed_llm())
    assert worker.run_job(job)["radar_plugin_loaded"] is False

    def loading_llm(*args: Any, **kwargs: Any) -> FakeLLM:  # as vLLM does when it loads the plugin
        monkeypatch.setitem(sys.modules, "fake_radar_plugin_for_test", object())
        return seed_llm()

    monkeypatch.setattr(generate, "make_llm", loading_llm)
    assert worker.run_job(job)["radar_plugin_loaded"] is True


ENV_WORKER = textwrap.dedent('''
    """Stand-in worker: reports the VLLM_PLUGINS it was started with."""
    import argparse, json, os
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("--job", type=Path)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    args.result.write_text(json.dumps({"vllm_plugins": os.environ.get("VLLM_PLUGINS"), "error": None}))
''')


def test_uncorrected_row_subprocess_runs_with_empty_vllm_plugins(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from radar_vllm.bench import harness

    (tmp_path / "env_bench_worker.py").write_text(ENV_WORKER)
    monkeypatch.setattr(harness, "WORKER_MODULE", "env_bench_worker")
    monkeypatch.setattr(harness, "POLL_S", 0.05)
    env = {key: value for key, value in os.environ.items() if key != "VLLM_PLUGINS"}
    env["PYTHONPATH"] = str(tmp_path)
    stock = BenchConfig(name="eagle3-k1", kind=KIND_EAGLE3, num_speculative_tokens=1, draft_model="h")
    uncorrected = dataclasses.replace(stock, name=UNCORRECTED, plugin_disabled=True, sampled_only=True)
    seen = {}
    for config in (stock, uncorrected):
        job = {"config": config.to_dict()}
        result = harness.run_config_subprocess(job, tmp_path / config.name, harness.row_env(env, config), 60.0,
                                               type("Bar", (), {"update": lambda self, n: None})())
        seen[config.name] = result["vllm_plugins"]
    assert seen == {"eagle3-k1": None, UNCORRECTED: ""}
    assert "VLLM_PLUGINS" not in env  # the run's environment is left as it was


def _greedy(model: Any, prompt: list[int], count: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_harness_scores_sampled_outputs_and_runs_the_uncorrected_row_without_plugin(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bench_models: tuple[Path, Path, Path]) -> None:
    """run_benchmark with stand-in rows: the target's greedy answers for no-spec and eagle3-k1,
    unlikely tokens for the uncorrected row; the real scorer (tiny target) flags the latter."""
    from radar_vllm.bench import harness, sample_quality

    calls: list[dict[str, Any]] = []
    models: dict[str, Any] = {}

    def fake_row(job: dict, row_dir: Path, env: dict, timeout_s: float, bar: Any, resume: bool = False,
                 units: int = 0) -> dict[str, Any]:
        name = job["config"]["name"]
        calls.append({"name": name, "plugins": env.get("VLLM_PLUGINS"), "temperatures": job["temperatures"]})
        if "target" not in models:
            models["target"] = load_scorer(job["engine"]["model"])
        model = models["target"]
        prompts = job["workloads"][0]["prompt_ids"]
        runs, sampled = [], []
        for temperature in job["temperatures"]:
            runs.append({"workload": "mtbench", "temperature": temperature, "mode": MODE_BATCHED, "repeat": 0,
                         "num_prompts": len(prompts), "prompt_tokens": 10, "output_tokens": 40, "seconds": 1.0,
                         "metrics": _metrics()})
            if temperature > GREEDY:
                outputs = ([[7, 300, 11, 450, 2, 199]] * len(prompts) if name == UNCORRECTED
                           else [_greedy(model, p, 6) for p in prompts])
                sampled.append({"workload": "mtbench", "temperature": temperature, "mode": MODE_BATCHED,
                                "outputs": outputs})
        return {"runs": runs, "outputs": {}, "outputs_consistent": {}, "sampled_outputs": sampled, "error": None,
                "radar_plugin_loaded": name != UNCORRECTED or models.get("plugin_leaks", False)}

    monkeypatch.setattr(harness, "vllm_installed", lambda: True)
    monkeypatch.setattr(harness, "run_config_subprocess", fake_row)
    target, head, _ = tiny_bench_models
    settings = BenchSettings(target=str(target), head=str(head), backend="vllm", k_list=(1,), uncorrected_k=(1,),
                             include_radar=False, include_dynamic_sd=False,
                             confidence_threshold=None, workloads=("mtbench",), num_prompts=6, max_new_tokens=6,
                             temperatures=(0.0, 1.0), offline_modes=(MODE_BATCHED,), repeats=1,
                             online_concurrency=(), dtype="float32", output_dir=str(tmp_path), tag="g",
                             plots=False)
    document = json.loads(harness.run_benchmark(settings).json_path.read_text())
    assert [(c["name"], c["plugins"], c["temperatures"]) for c in calls] == [
        (NO_SPEC, None, [0.0, 1.0]), ("eagle3-k1", None, [0.0, 1.0]), (UNCORRECTED, "", [1.0])]
    sampled = {c["config"]: c for c in document["cells"] if c["temperature"] == 1.0}
    assert all(len(c["sample_scores"]) == 6 and all(math.isfinite(v) for v in c["sample_scores"])
               for c in sampled.values())
    assert not sampled["eagle3-k1"]["sampling_broken"]  # the same outputs as no speculation
    assert sampled[UNCORRECTED]["sampling_broken"], sampled[UNCORRECTED]["sampling_check"]
    assert sampled[UNCORRECTED]["logprob_per_token"] < sampled[NO_SPEC]["logprob_per_token"]
    assert [f["config"] for f in document["sampling"]["flagged"]] == [UNCORRECTED]
    assert (tmp_path / ".work-g" / "rows" / NO_SPEC / harness.SCORES_FILE).is_file()
    assert "sampling: BROKEN" in (tmp_path / "g.md").read_text()

    # run again: the stored scores are reused; a row that claims no plugin but loaded it fails
    def no_scoring(*args: Any, **kwargs: Any) -> list[float]:
        raise AssertionError("the same outputs must not be scored again")

    monkeypatch.setattr(sample_quality, "logprob_per_token", no_scoring)
    models["plugin_leaks"] = True
    again = json.loads(harness.run_benchmark(settings).json_path.read_text())
    assert [c["sample_scores"] for c in again["cells"]] == [c["sample_scores"] for c in document["cells"]
                                                            if c["config"] != UNCORRECTED]
    status = {c["name"]: (c["status"], c["reason"]) for c in again["configs"]}
    assert status[UNCORRECTED][0] == "failed" and "VLLM_PLUGINS" in status[UNCORRECTED][1]
    assert status["eagle3-k1"] == ("ok", None)


def test_a_large_shift_is_flagged_with_few_outputs() -> None:
    # the uncorrected CPU verification at T = 0.6: -3.0 against -0.7 per token, 16 outputs, p ~ 0.04
    baseline = [-0.7 + 0.3 * ((i % 5) - 2) / 2 for i in range(16)]
    broken = [-3.0 + 4.0 * ((i % 5) - 2) / 2 for i in range(16)]
    comparison = compare_quality(baseline, broken, 0.6)
    assert 1e-3 < comparison.p_value < 0.05
    assert comparison.flagged
    # a small shift is not flagged
    small = compare_quality([-0.7 + 0.3 * ((i % 5) - 2) / 2 for i in range(16)],
                            [-0.8 + 0.3 * ((i % 5) - 2) / 2 for i in range(16)], 0.6)
    assert abs(small.difference) < 1.0 and not small.flagged
