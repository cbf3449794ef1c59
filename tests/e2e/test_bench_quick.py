"""``radar-vllm bench --quick`` end to end on tiny random models (passed as ``--target`` and
``--radar-checkpoint``, float32) with the CPU build of vLLM.

One run for the module: four rows (no speculation, RADAR chain, RADAR's chain at a fixed depth of 2
without the stop policy, and stock EAGLE-3 K=1 as shipped: ``VLLM_PLUGINS=""``, T = 1 only), each
in its own worker process with an in-process engine,
MT-Bench turns 1 and 2 (T = 1 on turn 1 only), batch 1 (first prompt) and batched (both prompts),
two repeats; the T = 1 outputs scored by the target; then the RADAR row served on loopback at
concurrency 1 and 2. The same command run again reuses every finished row, score and server
(seconds). About 4 minutes on 2 cores.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from conftest import TINY_MAX_DEPTH, tiny_bench_args  # noqa: E402
from radar_vllm.cli import main  # noqa: E402

ONLINE_REQUESTS = 3
UNCORRECTED = "eagle3-k1-uncorrected"
RADAR_CHAIN = "radar-chain"
FIXED_DEPTH = 2
FIXED = f"radar-chain-d{FIXED_DEPTH}"


def quick_command(out: Path, models: tuple[Path, Path, Path]) -> list[str]:
    return [
        "bench", "--quick", *tiny_bench_args(models), "--configs", f"radar-chain,{FIXED},{UNCORRECTED}",
        "--uncorrected-k", "1",
        "--radar-fixed-depth", str(FIXED_DEPTH),
        "--repeats", "2",
        "--batch1-prompts", "1", "--sampled-workloads", "mtbench",
        "--online-concurrency", "1,2", "--online-configs", "radar-chain",
        "--online-requests", str(ONLINE_REQUESTS), "--online-max-new-tokens", "16",
        "--output-dir", str(out), "--tag", "quick",
    ]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory,
              tiny_bench_models: tuple[Path, Path, Path]) -> tuple[int, Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench-quick")
    code = main(quick_command(out, tiny_bench_models))
    document = json.loads((out / "quick.json").read_text()) if (out / "quick.json").is_file() else {}
    return code, out, document


def _cells(document: dict[str, Any], config: str) -> list[dict[str, Any]]:
    return [cell for cell in document["cells"] if cell["config"] == config]


def test_run_succeeds_with_both_rows(quick_run: tuple[int, Path, dict[str, Any]]) -> None:
    code, out, document = quick_run
    assert code == 0
    assert document["backend"] == "vllm" and document["quick"] is True
    status = {c["name"]: c["status"] for c in document["configs"]}
    assert status == {"no-spec": "ok", UNCORRECTED: "ok", "radar-chain": "ok", FIXED: "ok"}, [
        c.get("reason") for c in document["configs"]]
    assert document["machine"]["num_cpus"] >= 1 and document["packages"]["torch"]
    # vLLM loaded the plugin for every row but the uncorrected one
    loaded = {c["name"]: c["radar_plugin_loaded"] for c in document["configs"]}
    assert loaded == {"no-spec": True, UNCORRECTED: False, "radar-chain": True, FIXED: True}
    assert sorted((c["workload"], c["temperature"], c["mode"]) for c in _cells(document, UNCORRECTED)) == [
        ("mtbench", 1.0, "batch1"), ("mtbench", 1.0, "batched")]
    # MT-Bench turn 2 was built from the no-speculation answers and run by both rows
    names = [w["name"] for w in document["workloads"]]
    assert names == ["mtbench", "mtbench-turn2"]
    assert document["workloads"][1]["num_prompts"] >= 1
    # MT-Bench turn 1 at 2 temperatures, turn 2 greedy only; 2 modes per row, each with 2 repeats
    for config in ("no-spec", "radar-chain", FIXED):
        cells = _cells(document, config)
        assert sorted((c["workload"], c["temperature"]) for c in cells) == sorted(
            [("mtbench", 0.0), ("mtbench", 0.0), ("mtbench", 1.0), ("mtbench", 1.0),
             ("mtbench-turn2", 0.0), ("mtbench-turn2", 0.0)])
        assert all(cell["tokens_per_s"]["count"] == 2 for cell in cells)
    # batch 1 times the first prompt only; batched all of them
    for config in ("no-spec", "radar-chain"):
        assert {r["num_prompts"] for r in document["runs"][config] if r["mode"] == "batch1"} == {1}
    assert {r["num_prompts"] for r in document["runs"]["no-spec"]
            if r["mode"] == "batched" and r["workload"] == "mtbench"} == {2}


def test_sampled_cells_carry_the_target_scores(quick_run: tuple[int, Path, dict[str, Any]]) -> None:
    _, out, document = quick_run
    sampled = [cell for cell in document["cells"] if cell["temperature"] > 0]
    assert len(sampled) == 8
    for cell in sampled:
        assert len(cell["sample_scores"]) == (1 if cell["mode"] == "batch1" else 2), cell["config"]
        assert all(s is None or s <= 0.0 for s in cell["sample_scores"])
        assert cell["logprob_per_token"] is not None
        if cell["mode"] == "batched" and cell["kind"] != "none":  # 2 outputs a side: tested against no-spec
            assert 0.0 <= cell["sampling_check"]["p_value"] <= 1.0
            assert cell["sampling_check"]["baseline_mean"] == pytest.approx(next(
                c["logprob_per_token"] for c in sampled if c["config"] == "no-spec" and c["mode"] == "batched"))
    assert "| log-prob/token (no-spec) | sampling check |" in (out / "quick.md").read_text()


@pytest.mark.parametrize("config", ["radar-chain", FIXED])
def test_radar_greedy_outputs_match_no_speculation(quick_run: tuple[int, Path, dict[str, Any]], config: str) -> None:
    _, _, document = quick_run
    greedy = [cell for cell in _cells(document, config) if cell["temperature"] == 0.0]
    assert len(greedy) == 4
    assert {cell["greedy_match"]["num_prompts"] for cell in greedy if cell["mode"] == "batch1"} == {1}
    for cell in greedy:
        match = cell["greedy_match"]
        assert match["num_prompts"] >= 1
        assert match["all_match"], cell


def test_radar_metrics_and_ratios(quick_run: tuple[int, Path, dict[str, Any]]) -> None:
    _, _, document = quick_run
    assert next(c for c in document["configs"] if c["name"] == "radar-chain")["radar_metrics_seen"] is True
    for cell in _cells(document, "radar-chain"):
        assert cell["vs_no_spec"]["value"] > 0
        assert 1.0 <= cell["draft_calls_per_round"] <= TINY_MAX_DEPTH
        assert sum(cell["stop_depths"].values()) > 0
        assert set(cell["stop_depths"]) <= {str(d) for d in range(1, TINY_MAX_DEPTH + 1)}
        assert cell["acceptance_length"] >= 1.0
    greedy_batch1 = next(c for c in _cells(document, "radar-chain")
                         if c["temperature"] == 0.0 and c["mode"] == "batch1" and c["workload"] == "mtbench")
    # the tiny head's depth-1 drafts are often right: fewer target passes than output tokens
    assert greedy_batch1["acceptance_length"] > 1.0
    assert greedy_batch1["target_passes_per_token"] < 1.0
    base = next(c for c in _cells(document, "no-spec") if c["temperature"] == 0.0 and c["mode"] == "batch1")
    # without speculation each engine step (prefill included) emits exactly one token at batch 1
    assert base["target_passes_per_token"] == pytest.approx(1.0)
    assert base["draft_calls_per_round"] == 0.0


def test_fixed_depth_row_drafts_that_many_tokens_and_reports_per_position_acceptance(
        quick_run: tuple[int, Path, dict[str, Any]]) -> None:
    _, out, document = quick_run
    config = next(c for c in document["configs"] if c["name"] == FIXED)
    assert config["speculative_config"]["radar"] == {"mode": "chain", "fixed_depth": FIXED_DEPTH}
    for run in document["runs"][FIXED]:
        counters = run["metrics"]["counters"]
        assert counters["vllm:spec_decode_num_drafts"] > 0
        # every round drafts exactly FIXED_DEPTH tokens (the padded slots are not drafts)
        assert counters["vllm:spec_decode_num_draft_tokens"] == FIXED_DEPTH * counters["vllm:spec_decode_num_drafts"]
        assert counters["vllm:radar_draft_calls"] == FIXED_DEPTH * counters["vllm:radar_rounds"]
    for config in (FIXED, RADAR_CHAIN, UNCORRECTED):
        for cell in _cells(document, config):
            key = (cell["workload"], cell["temperature"], cell["mode"])
            runs = [r["metrics"] for r in document["runs"][config]
                    if (r["workload"], r["temperature"], r["mode"]) == key]
            drafts, drafted, accepted = (sum(m["counters"][f"vllm:spec_decode_num_{name}"] for m in runs)
                                         for name in ("drafts", "draft_tokens", "accepted_tokens"))
            first = sum(m["vectors"]["vllm:spec_decode_num_accepted_tokens_per_pos"][0] for m in runs)
            assert cell["draft_acceptance"] == pytest.approx(accepted / drafted), config
            assert cell["first_draft_acceptance"] == pytest.approx(first / drafts), config
            assert 0.0 <= cell["draft_acceptance"] <= 1.0 and 0.0 <= cell["first_draft_acceptance"] <= 1.0
            if config != RADAR_CHAIN:  # same-size drafts: position 1 is accepted at least as often as any other
                assert cell["draft_acceptance"] <= cell["first_draft_acceptance"] + 1e-9, config
    for cell in _cells(document, UNCORRECTED):  # one draft token per round: both rates are the same
        assert cell["draft_acceptance"] == pytest.approx(cell["first_draft_acceptance"])
    for cell in _cells(document, FIXED):
        assert cell["draft_calls_per_round"] == pytest.approx(FIXED_DEPTH)
        assert cell["acceptance_length"] == pytest.approx(1.0 + FIXED_DEPTH * cell["draft_acceptance"])
    assert all(c["draft_acceptance"] is None and c["first_draft_acceptance"] is None
               for c in _cells(document, "no-spec"))
    assert "| accept len | accepted/drafted | 1st-draft accept |" in (out / "quick.md").read_text()


def test_online_levels_and_outputs(quick_run: tuple[int, Path, dict[str, Any]]) -> None:
    _, out, document = quick_run
    levels = document["online"]
    assert [(level["config"], level["concurrency"]) for level in levels] == [("radar-chain", 1), ("radar-chain", 2)]
    for level in levels:
        assert level["completed"] == ONLINE_REQUESTS, level.get("errors")
        assert level["ttft_ms"]["median"] > 0 and level["request_throughput"] > 0
        assert level["metrics"]["counters"]["vllm:spec_decode_num_drafts"] > 0
    markdown = (out / "quick.md").read_text()
    assert "| radar-chain |" in markdown and "## Online" in markdown
    for suffix in ("speedup", "acceptance", "concurrency"):
        assert (out / f"quick-{suffix}.png").stat().st_size > 0


def test_same_command_again_reuses_finished_rows_and_servers(quick_run: tuple[int, Path, dict[str, Any]],
                                                             tiny_bench_models: tuple[Path, Path, Path]) -> None:
    code, out, first = quick_run
    assert code == 0
    assert main(quick_command(out, tiny_bench_models)) == 0
    again = json.loads((out / "quick.json").read_text())
    assert [c["status"] for c in again["configs"]] == ["ok", "ok", "ok", "ok"]
    # nothing was measured again: the same runs, cells, scores and online levels
    assert again["runs"] == first["runs"]
    assert [c["sample_scores"] for c in again["cells"]] == [c["sample_scores"] for c in first["cells"]]
    assert [c["tokens_per_s"] for c in again["cells"]] == [c["tokens_per_s"] for c in first["cells"]]
    assert [level.get("resumed") for level in again["online"]] == [True, True]
    assert [level["output_throughput"] for level in again["online"]] == \
        [level["output_throughput"] for level in first["online"]]
