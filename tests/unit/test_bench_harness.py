"""Benchmark harness pieces without vLLM: rows, confidence policy, workloads, cells, report, client.

The reference-decoder run at the end goes through the whole harness (models, rows, runs, JSON,
markdown, plots) on tiny random models in a few seconds.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import BENCH_CLI, bench_settings, tiny_bench_args
from radar_vllm.bench.configs import (
    CONFIDENCE_CHAIN,
    KIND_EAGLE3,
    KIND_NONE,
    KIND_RADAR,
    NO_SPEC,
    RADAR_CHAIN,
    RADAR_TREE,
    STATIC_TREE,
    TREE_UNSUPPORTED_REASON,
    EAGLE3_DYNAMIC,
    BenchConfig,
    build_configs,
    tune_dynamic_schedule,
)
from radar_vllm.bench.confidence import make_confidence_policy
from radar_vllm.bench.measures import mean_acceptance_length
from radar_vllm.bench.reference_backend import cumulative_histogram, round_counters
from radar_vllm.bench.report import build_cells, build_document, render_markdown
from radar_vllm.bench.settings import MODE_BATCH1, BenchSettings
from radar_vllm.bench.snapshots import (
    GENERATION_TOKENS,
    ITERATION_TOKENS,
    NUM_ACCEPTED_TOKENS,
    NUM_DRAFTS,
    RADAR_DRAFT_CALLS,
    RADAR_ROUNDS,
    RADAR_STOP_DEPTH,
    RADAR_TREE_SIZE,
    MetricSnapshot,
)
from radar_vllm.bench.workloads import MTBENCH, Workload, build_second_turn, select_evenly
from radar_vllm.core.policy import PolicyRunner


# ------------------------------------------------------------------------------ rows
def test_rows_in_order_with_speculative_configs(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    target, head, radar = tiny_bench_models
    configs = build_configs(head=str(head), radar_checkpoint=str(radar), k_list=[3, 1, 3],
                            confidence_checkpoint=str(radar), tree_supported=True)
    names = [c.name for c in configs]
    assert names == [NO_SPEC, "eagle3-k1", "eagle3-k3", RADAR_CHAIN, RADAR_TREE, STATIC_TREE, CONFIDENCE_CHAIN]
    by_name = {c.name: c for c in configs}
    assert by_name[NO_SPEC].speculative_config() is None
    assert by_name["eagle3-k3"].speculative_config() == {  # the same prefill work as RADAR engines
        "method": "eagle3", "model": str(head), "num_speculative_tokens": 3, "disable_eagle_block_drop": True}
    assert "disable_eagle_block_drop" not in by_name[RADAR_CHAIN].speculative_config()  # RADAR's default
    chain = by_name[RADAR_CHAIN].speculative_config()
    assert chain["num_speculative_tokens"] == 4 and chain["radar"] == {"mode": "chain"}  # tiny max_depth 4
    tree = by_name[RADAR_TREE]
    # tiny checkpoint: top_k 4, depth 4 -> total_tokens min(60, 4 * (1 + 4 * 3) + 1) = 53 -> 52 draft slots
    assert tree.num_speculative_tokens == 52 and tree.speculative_config()["radar"] == {"mode": "tree"}
    assert by_name[STATIC_TREE].radar_overrides == {"mode": "tree", "threshold": 0.0}
    assert not any(c.skipped for c in configs)


def _cell(config: str, mode: str, median: float, **extra) -> dict:
    return {"config": config, "mode": mode, "tokens_per_s": {"median": median}, **extra}


def test_dynamic_sd_row_and_its_schedule_tuned_from_the_k_sweep(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    _, head, radar = tiny_bench_models
    configs = build_configs(head=str(head), radar_checkpoint=str(radar), k_list=[1, 2], dynamic_sd=True,
                            include_tree=False, include_static_tree=False)
    assert [c.name for c in configs] == [NO_SPEC, "eagle3-k1", "eagle3-k2", EAGLE3_DYNAMIC, RADAR_CHAIN]
    cells = [
        _cell(NO_SPEC, "batch1", 30.0), _cell("eagle3-k1", "batch1", 33.0), _cell("eagle3-k2", "batch1", 31.0),
        _cell(NO_SPEC, "batch1", 32.0), _cell("eagle3-k1", "batch1", 30.0),  # a second workload: sums decide
        _cell(NO_SPEC, "batched", 290.0), _cell("eagle3-k1", "batched", 250.0), _cell("eagle3-k2", "batched", 200.0),
        _cell("eagle3-k2", "batched", 999.0, sampling_broken=True),  # flagged cells never count
        _cell(RADAR_CHAIN, "batched", 999.0),  # not a stock row
    ]
    schedule = tune_dynamic_schedule(cells, [1, 2], {"batch1": 1, "batched": 16}, 64)
    assert schedule == [[1, 15, 1], [16, 64, 0]]
    assert tune_dynamic_schedule(cells, [1, 2], {"batched": 16}, 16) == [[1, 16, 0]]
    with pytest.raises(ValueError, match="no no-spec or stock EAGLE-3 cells"):
        tune_dynamic_schedule([], [1], {"batch1": 1}, 8)
    row = dataclasses.replace(configs[3], dynamic_schedule=schedule)
    assert row.speculative_config() == {"method": "eagle3", "model": str(head), "num_speculative_tokens": 2,
                                        "num_speculative_tokens_per_batch_size": [[1, 15, 1], [16, 64, 0]],
                                        "disable_eagle_block_drop": True}
    dynamic = pytest.importorskip("vllm.v1.spec_decode.dynamic.utils")
    assert dynamic.validate_and_normalize_dynamic_sd_schedule(schedule) == [(1, 15, 1), (16, 64, 0)]
    # The harness's row: the schedule's largest K sizes the drafter (no drafting past what it verifies).
    from radar_vllm.bench.harness import dynamic_sd_row

    tuned = dynamic_sd_row(configs[3], bench_settings(k_list=(1, 2), offline_modes=("batch1", "batched")),
                           {"cells": cells}, 64)
    assert tuned.speculative_config()["num_speculative_tokens"] == 1 and tuned.max_depth == 1
    assert tuned.speculative_config()["num_speculative_tokens_per_batch_size"] == [[1, 63, 1], [64, 64, 0]]


def test_tree_rows_skipped_with_reason_when_unsupported(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    _, head, radar = tiny_bench_models
    configs = build_configs(head=str(head), radar_checkpoint=str(radar), k_list=[1], tree_supported=False)
    skipped = {c.name: c.skip_reason for c in configs if c.skipped}
    assert skipped == {RADAR_TREE: TREE_UNSUPPORTED_REASON, STATIC_TREE: TREE_UNSUPPORTED_REASON}


def test_only_keeps_no_spec_and_rejects_unknown(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    _, head, radar = tiny_bench_models
    configs = build_configs(head=str(head), radar_checkpoint=str(radar), k_list=[1, 2], only=["eagle3-k2"])
    assert [c.name for c in configs] == [NO_SPEC, "eagle3-k2"]
    with pytest.raises(ValueError, match="unknown configuration"):
        build_configs(head=str(head), radar_checkpoint=str(radar), k_list=[1], only=["eagle3-k9"])


def test_config_requires_draft_model_for_speculation() -> None:
    with pytest.raises(ValueError, match="draft_model"):
        BenchConfig(name="x", kind=KIND_EAGLE3)
    with pytest.raises(ValueError, match="kind"):
        BenchConfig(name="x", kind="magic")


def test_settings_validation_names_the_parameter() -> None:
    with pytest.raises(ValueError, match="repeats"):
        bench_settings(repeats=0)
    with pytest.raises(ValueError, match="offline mode"):
        bench_settings(offline_modes=("streaming",))
    with pytest.raises(ValueError, match="target is required"):
        BenchSettings()
    settings = bench_settings(max_prompt_tokens=256, max_new_tokens=32)
    # turn 2 holds turn 1 + its answer: 288 prompt tokens + 32 answer + 128 draft margin -> 512
    assert settings.turn2_max_prompt_tokens == 288
    assert settings.max_model_len() == 512


# ------------------------------------------------------------------------------ confidence policy
def test_confidence_policy_continues_exactly_while_best_score_above_log_threshold() -> None:
    threshold = 0.4
    policy = make_confidence_policy(threshold, state_size=4)
    generator = torch.Generator().manual_seed(0)
    scores = -torch.rand(64, 4, generator=generator) * 3.0  # [batch, top_k] cumulative log-probs
    scores = torch.sort(scores, dim=-1, descending=True).values
    expected = scores[:, 0] >= math.log(threshold)
    assert 0 < int(expected.sum()) < 64  # both decisions occur
    state = policy.features(scores)
    logits, _ = policy.step(state)
    assert torch.equal(policy.decide(logits), expected)
    # second step of the same round: the LSTM carries nothing, the rule is unchanged
    logits_again, _ = policy.step(state, policy.init_hidden(64))
    assert torch.equal(policy.decide(logits_again), expected)
    # the batched runtime the vLLM proposer uses decides the same
    runner = PolicyRunner(policy, max_batch_size=64)
    runner.begin_round(64)
    assert torch.equal(runner.step(scores).cpu(), expected)


def test_confidence_policy_rejects_bad_threshold() -> None:
    with pytest.raises(ValueError, match="threshold"):
        make_confidence_policy(1.0, state_size=4)


# ------------------------------------------------------------------------------ workloads
def test_select_evenly() -> None:
    assert select_evenly(list(range(10)), 3) == [0, 3, 6]
    assert select_evenly([1, 2], 5) == [1, 2]
    with pytest.raises(ValueError, match="count"):
        select_evenly([1], 0)


def test_second_turn_holds_first_turn_answer_and_second_turn(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    from radar_vllm.bench.workloads import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_bench_models[0]))
    first = Workload(name=MTBENCH, prompt_ids=[[1], [2]], prompt_keys=["a", "b"],
                     turns=[["Who wrote Hamlet?", "And when?"], ["List five fruits.", "Now sort them."]])
    answers = [tokenizer("William Shakespeare wrote Hamlet.", add_special_tokens=False)["input_ids"],
               tokenizer("apple, banana", add_special_tokens=False)["input_ids"]]
    second = build_second_turn(tokenizer, first, answers, max_prompt_tokens=4096)
    assert second.prompt_keys == ["a", "b"]
    text = tokenizer.decode(second.prompt_ids[0])
    assert text.index("Who wrote Hamlet?") < text.index("William Shakespeare wrote Hamlet.") < text.index("And when?")
    assert text.rstrip().endswith("assistant")
    short = build_second_turn(tokenizer, first, answers, max_prompt_tokens=5)
    assert short.num_prompts == 0


# ------------------------------------------------------------------------------ cells and report
def _run(workload: str, temperature: float, repeat: int, tokens: int, seconds: float,
         metrics: MetricSnapshot) -> dict:
    return {"workload": workload, "temperature": temperature, "mode": MODE_BATCH1, "repeat": repeat,
            "num_prompts": 2, "prompt_tokens": 20, "output_tokens": tokens, "seconds": seconds,
            "metrics": metrics.to_dict()}


def _spec_metrics(drafts: float, accepted: float, steps: float, draft_calls: float = 0.0,
                  rounds: float = 0.0) -> MetricSnapshot:
    snapshot = MetricSnapshot(counters={NUM_DRAFTS: drafts, NUM_ACCEPTED_TOKENS: accepted})
    snapshot.histograms[ITERATION_TOKENS] = cumulative_histogram([], [])
    snapshot.histograms[ITERATION_TOKENS].count = steps
    if rounds:
        snapshot.counters[RADAR_DRAFT_CALLS] = draft_calls
        snapshot.counters[RADAR_ROUNDS] = rounds
        snapshot.histograms[RADAR_STOP_DEPTH] = cumulative_histogram([1, 2, 2, 3], [1, 2, 3, 4])
    return snapshot


def _results() -> tuple[list[BenchConfig], dict]:
    configs = [
        BenchConfig(name=NO_SPEC, kind=KIND_NONE),
        BenchConfig(name="eagle3-k2", kind=KIND_EAGLE3, num_speculative_tokens=2, max_depth=2, draft_model="h"),
        BenchConfig(name="eagle3-k4", kind=KIND_EAGLE3, num_speculative_tokens=4, max_depth=4, draft_model="h"),
        BenchConfig(name=RADAR_CHAIN, kind=KIND_RADAR, num_speculative_tokens=4, max_depth=4, draft_model="r"),
    ]
    none = MetricSnapshot()
    none.histograms[ITERATION_TOKENS] = cumulative_histogram([], [])
    none.histograms[ITERATION_TOKENS].count = 100.0
    results = {
        NO_SPEC: {"runs": [_run("mtbench", 0.0, r, 100, s, none) for r, s in enumerate([2.0, 2.5, 1.5])],
                  "outputs": {"mtbench|batch1": [[1, 2, 3], [4, 5]]}, "outputs_consistent": {"mtbench|batch1": True}},
        "eagle3-k2": {"runs": [_run("mtbench", 0.0, r, 100, s, _spec_metrics(40, 20, 41))
                               for r, s in enumerate([1.0, 1.25, 1.0])],
                      "outputs": {"mtbench|batch1": [[1, 2, 3], [4, 5]]}, "outputs_consistent": {"mtbench|batch1": True}},
        "eagle3-k4": {"runs": [_run("mtbench", 0.0, r, 100, s, _spec_metrics(30, 30, 31))
                               for r, s in enumerate([1.6, 1.6, 1.6])],
                      "outputs": {"mtbench|batch1": [[1, 2, 3], [4, 5]]}, "outputs_consistent": {"mtbench|batch1": True}},
        RADAR_CHAIN: {"runs": [_run("mtbench", 0.0, r, 100, s, _spec_metrics(25, 50, 26, draft_calls=50, rounds=25))
                               for r, s in enumerate([0.8, 0.8, 1.0])],
                      "outputs": {"mtbench|batch1": [[1, 2, 3], [4, 6]]}, "outputs_consistent": {"mtbench|batch1": False}},
    }
    return configs, results


def test_cells_ratios_acceptance_and_match() -> None:
    configs, results = _results()
    cells = {c.config: c for c in build_cells(configs, results)}
    base, k2, radar = cells[NO_SPEC], cells["eagle3-k2"], cells[RADAR_CHAIN]
    # tokens/s medians: no-spec 100/2.0 = 50; k2 100/1.0 = 100; k4 62.5; radar 100/0.8 = 125
    assert base.tokens_per_s.median == pytest.approx(50.0)
    assert k2.tokens_per_s.median == pytest.approx(100.0)
    assert radar.vs_no_spec.value == pytest.approx(2.5)
    assert radar.best_eagle3 == "eagle3-k2"
    assert radar.vs_best_eagle3.value == pytest.approx(1.25)
    assert radar.vs_best_eagle3.low == pytest.approx(100.0 / 100.0)  # radar min 100 / k2 max 100
    # pooled counters over 3 repeats: 75 drafts, 150 accepted -> 1 + 2 = 3
    assert radar.acceptance_length == pytest.approx(3.0)
    assert k2.acceptance_length == pytest.approx(1.5)
    assert radar.draft_calls_per_round == pytest.approx(2.0)
    assert k2.draft_calls_per_round == pytest.approx(2.0)  # stock EAGLE-3: K
    assert base.draft_calls_per_round == 0.0
    assert radar.target_passes_per_token == pytest.approx(78 / 300)
    assert radar.stop_depths == {"1": 3, "2": 6, "3": 3}
    assert k2.greedy_match["all_match"] and k2.greedy_match["num_matched"] == 2
    assert radar.greedy_match["mismatched"] == [1] and not radar.greedy_match["all_match"]
    assert radar.repeats_consistent is False


def test_document_and_markdown() -> None:
    configs, results = _results()
    document = build_document(settings={"tag": "t", "num_prompts": 2}, backend="vllm", configs=configs,
                              results=results, workloads=[{"name": "mtbench", "prompt_ids": [[1], [2, 3]],
                                                           "prompt_keys": ["a", "b"]}],
                              online=[], models={"target": "T", "radar_checkpoint": "R"}, notes=["n1"],
                              machine={"cpu_model": "cpu", "num_cpus": 2, "memory_gib": 8.0},
                              packages={"torch": "2"})
    json.dumps(document)  # serializable
    assert [c["status"] for c in document["configs"]] == ["ok"] * 4
    markdown = render_markdown(document)
    assert "| radar-chain | 125.0 [100.0–125.0] | 2.50x" in markdown
    assert "RADAR chain is 1.25x the best stock EAGLE-3 (eagle3-k2) [faster" in markdown
    assert "1/2 NO (repeats differ)" in markdown
    assert "Note: n1" in markdown


def test_round_counters_match_reference_rounds() -> None:
    # 3 rounds: draft calls [2, 4, 1], accepted [1, 3, 0], tree sizes [2, 4, 1], 9 tokens
    snapshot = round_counters(9, [2, 4, 1], [1, 3, 0], [2, 4, 1], max_depth=4, max_nodes=4)
    assert snapshot.counters[NUM_DRAFTS] == 3.0
    assert mean_acceptance_length(snapshot.counters[NUM_DRAFTS], snapshot.counters[NUM_ACCEPTED_TOKENS]) == \
        pytest.approx(7 / 3)
    assert snapshot.histograms[ITERATION_TOKENS].count == 4.0  # prefill + 3 verifications
    assert snapshot.counters[GENERATION_TOKENS] == 9.0
    assert snapshot.histograms[RADAR_TREE_SIZE].buckets == {"1.0": 1.0, "2.0": 2.0, "3.0": 2.0, "4.0": 3.0,
                                                             "+Inf": 3.0}


# ------------------------------------------------------------------------------ online client
def test_online_client_counts_tokens_ttft_and_respects_concurrency() -> None:
    from aiohttp import web

    from radar_vllm.bench.online import Load, parse_sse_line, run_level

    assert parse_sse_line(b"data: [DONE]") is None
    assert parse_sse_line(b": keep-alive") is None
    assert parse_sse_line(b'data: {"a": 1}') == {"a": 1}
    state = {"in_flight": 0, "max_in_flight": 0, "prompts": []}

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state["prompts"].append(body["prompt"])
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            await asyncio.sleep(0.05)
            for text in ("a", "bc", "d"):
                chunk = {"choices": [{"index": 0, "text": text}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(0.02)
            usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
            await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        finally:
            state["in_flight"] -= 1
        return response

    async def scenario() -> object:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await run_level(f"http://127.0.0.1:{port}", [[1, 2], [3]], concurrency=2,
                                   load=Load(max_tokens=5, timeout_s=30.0), num_requests=5)
        finally:
            await runner.cleanup()

    level = asyncio.run(scenario())
    assert (level.completed, level.failed, level.output_tokens) == (5, 0, 25)
    assert state["max_in_flight"] == 2
    assert state["prompts"] == [[1, 2], [3], [1, 2], [3], [1, 2]]
    assert level.ttft_ms["median"] >= 50.0
    # TPOT = (latency - TTFT) / (5 - 1): about 2-3 chunk gaps of 20 ms over 4 tokens
    assert 5.0 <= level.tpot_ms["median"] <= 200.0
    assert level.request_throughput == pytest.approx(5 / level.wall_seconds)


# ------------------------------------------------------------------------------ reference run
def test_reference_backend_end_to_end(tmp_path: Path, tiny_bench_models: tuple[Path, Path, Path]) -> None:
    from radar_vllm.bench.harness import run_benchmark

    target, _, radar = tiny_bench_models
    settings = BenchSettings(
        target=str(target), radar_checkpoint=str(radar), backend="reference", k_list=(2,), workloads=("mtbench", "mtbench-turn2"), num_prompts=2,
        max_new_tokens=10, max_prompt_tokens=256, temperatures=(0.0, 1.0), offline_modes=(MODE_BATCH1,),
        repeats=2, only_configs=("eagle3-k2", RADAR_CHAIN, RADAR_TREE), dtype="float32",
        output_dir=str(tmp_path / "results"), tag="ref", online_concurrency=(), torch_threads=1,
    )
    outputs = run_benchmark(settings)
    document = json.loads(outputs.json_path.read_text())
    assert document["backend"] == "reference"
    assert [w["name"] for w in document["workloads"]] == ["mtbench", "mtbench-turn2"]
    cells = document["cells"]
    # 4 rows x 2 workloads x 2 temperatures
    assert len(cells) == 16
    for cell in cells:
        assert cell["tokens_per_s"]["count"] == 2
        if cell["temperature"] == 0.0 and cell["config"] != NO_SPEC:
            assert cell["greedy_match"]["all_match"], cell  # fp32 reference decoding is exact
    tree = next(c for c in cells if c["config"] == RADAR_TREE)
    assert tree["tree_sizes"] and tree["mean_tree_size"] >= 1
    assert outputs.markdown_path.is_file()
    assert {p.name for p in outputs.plot_paths} >= {"ref-speedup.png", "ref-acceptance.png"}


# ------------------------------------------------------------------------------ command line
def test_cli_presets_and_explicit_options(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    from radar_vllm.cli import build_parser
    from radar_vllm.commands.bench import settings_from_args

    parser = build_parser()
    tiny = ["bench", *tiny_bench_args(tiny_bench_models), "--backend", "reference"]
    quick = settings_from_args(parser.parse_args(tiny + ["--quick", "--k", "2"]))
    assert quick.quick and quick.engine_inline
    assert quick.target == str(tiny_bench_models[0]) and quick.radar_checkpoint == str(tiny_bench_models[2])
    assert quick.k_list == (2,)  # explicit beats the preset's (1, 3)
    assert quick.num_prompts == 2 and quick.confidence_threshold is None
    assert quick.dtype == "float32" and quick.torch_threads == 1
    assert quick.tag == "bench-quick-reference"
    full = settings_from_args(parser.parse_args(BENCH_CLI + [
        "--online-concurrency", "none", "--engine-arg",
        "max_num_batched_tokens=512", "--confidence-threshold", "0.3", "--temperatures", "0"]))
    assert not full.quick and full.online_concurrency == () and full.temperatures == (0.0,)
    assert full.engine_args == {"max_num_batched_tokens": 512}
    assert full.confidence_threshold == 0.3 and full.k_list == (1, 2, 3, 4, 5, 6, 7)
    no_confidence = settings_from_args(parser.parse_args(BENCH_CLI + ["--no-confidence"]))
    assert no_confidence.confidence_threshold is None
