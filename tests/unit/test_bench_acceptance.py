"""RADAR at a fixed depth (``radar-chain-dD``), per-position acceptance in the cells and the
``sampling`` preset (acceptance at T = 0, 0.6, 1). No vLLM: rows are built from tiny checkpoints,
metrics come from a stand-in engine. A few seconds.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
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
    STATIC_TREE,
    BenchConfig,
    build_configs,
    fixed_depth_name,
    fixed_depth_of,
    radar_config_of,
)
from radar_vllm.bench.estimate import (
    SMOLLM2_CPU_COSTS,
    estimate_run,
    offline_row_seconds,
    planned_online_rows,
    planned_rows,
    planned_workloads,
)
from radar_vllm.bench.measures import draft_acceptance_rate, first_draft_acceptance
from radar_vllm.bench.offline import OfflineRunner
from radar_vllm.bench.report import build_cell, build_document, render_markdown
from radar_vllm.bench.settings import (
    GREEDY,
    MODE_BATCHED,
    PRESETS,
    SAMPLING_PRESET,
    BenchSettings,
    temperatures_for,
)
from radar_vllm.bench.snapshots import (
    ACCEPTED_PER_POSITION,
    NUM_ACCEPTED_TOKENS,
    NUM_DRAFT_TOKENS,
    NUM_DRAFTS,
    MetricSnapshot,
)
from radar_vllm.bench.workloads import MTBENCH, Workload

D1 = "radar-chain-d1"
SAMPLING_ROWS = [NO_SPEC, "eagle3-k1", "eagle3-k1-uncorrected", RADAR_CHAIN, D1, RADAR_TREE]
SAMPLING_MAX_MINUTES = 30.0


def sampling_settings(**overrides: Any) -> BenchSettings:
    return bench_settings("sampling", **overrides)


# ------------------------------------------------------------------------------ the fixed-depth row
def test_fixed_depth_rows_follow_radar_chain_and_carry_the_override(
        tiny_bench_models: tuple[Path, Path, Path]) -> None:
    _, head, radar = tiny_bench_models
    plain = build_configs(head=str(head), radar_checkpoint=str(radar), k_list=[1], tree_supported=True)
    configs = build_configs(head=str(head), radar_checkpoint=str(radar), k_list=[1], tree_supported=True,
                            fixed_depths=[3, 1, 3])
    names = [c.name for c in configs]
    assert names == [NO_SPEC, "eagle3-k1", RADAR_CHAIN, D1, "radar-chain-d3", RADAR_TREE, STATIC_TREE]
    # the other rows are unchanged
    assert [c for c in configs if c.name in {p.name for p in plain}] == plain
    d1 = configs[3]
    assert (d1.kind, d1.mode, d1.uses_radar, d1.skipped) == (KIND_RADAR, "chain", True, False)
    # the whole chain's draft slots (tiny max_depth 4); the proposer drafts 1 and pads the rest
    assert d1.speculative_config() == {"method": "eagle3", "model": str(radar), "num_speculative_tokens": 4,
                                       "radar": {"mode": "chain", "fixed_depth": 1}}
    assert radar_config_of(str(radar), d1.radar_overrides).fixed_depth == 1
    assert radar_config_of(str(radar), configs[2].radar_overrides).fixed_depth is None
    only = build_configs(head=str(head), radar_checkpoint=str(radar), k_list=[1], fixed_depths=[1, 3],
                         only=["radar-chain-d3"])
    assert [c.name for c in only] == [NO_SPEC, "radar-chain-d3"]
    with pytest.raises(ValueError, match="fixed_depth=5 exceeds radar.max_depth=4"):
        build_configs(head=str(head), radar_checkpoint=str(radar), k_list=[1], fixed_depths=[5])


def test_fixed_depth_override_reaches_the_engine(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    from radar_vllm.bench.harness import BenchModels, make_job
    from radar_vllm.bench.engine_process import engine_kwargs

    target, head, radar = tiny_bench_models
    config = next(c for c in build_configs(head=str(head), radar_checkpoint=str(radar), k_list=[1],
                                           fixed_depths=[2]) if c.name == "radar-chain-d2")
    models = BenchModels(target=str(target), head=str(head), radar_checkpoint=str(radar), confidence_checkpoint=None)
    job = make_job(bench_settings(), config, models, [], build_turn2=False)
    kwargs = engine_kwargs(job["engine"], job["config"]["speculative_config"])
    assert kwargs["speculative_config"]["radar"] == {"mode": "chain", "fixed_depth": 2}
    assert BenchConfig.from_dict(job["config"]) == config


def test_fixed_depth_names_parse() -> None:
    assert fixed_depth_name(1) == D1
    assert [fixed_depth_of(name) for name in (D1, "radar-chain-d12", RADAR_CHAIN, "radar-chain-dx", RADAR_TREE,
                                              "eagle3-k1")] == [1, 12, None, None, None, None]


def test_fixed_depth_rows_in_settings_estimate_and_cli() -> None:
    from radar_vllm.cli import build_parser
    from radar_vllm.commands.bench import settings_from_args

    with pytest.raises(ValueError, match="radar_fixed_depths entries"):
        bench_settings(radar_fixed_depths=(0,))
    settings = bench_settings(k_list=(1, 3), radar_fixed_depths=(3, 1), include_static_tree=False,
                              confidence_threshold=None)
    assert planned_rows(settings) == [NO_SPEC, "eagle3-k1", "eagle3-k3", "eagle3-dynamic", RADAR_CHAIN, D1,
                                      "radar-chain-d3", RADAR_TREE]
    assert planned_rows(dataclasses.replace(settings, include_radar=False, include_dynamic_sd=False)) == [
        NO_SPEC, "eagle3-k1", "eagle3-k3"]
    # costed as stock EAGLE-3 at K = D (same drafts and verification)
    for batch, temperature in ((1, GREEDY), (16, 1.0)):
        assert SMOLLM2_CPU_COSTS.speed("radar-chain-d3", batch, temperature) == \
            SMOLLM2_CPU_COSTS.speed("eagle3-k3", batch, temperature)
    assert offline_row_seconds(settings, D1, SMOLLM2_CPU_COSTS) > 0
    with pytest.raises(ValueError, match="radar-chain-dD"):
        SMOLLM2_CPU_COSTS.speed("radar-chain-dx", 1, GREEDY)
    parser = build_parser()
    base = BENCH_CLI
    assert settings_from_args(parser.parse_args(base)).radar_fixed_depths == ()
    assert settings_from_args(parser.parse_args(base + ["--radar-fixed-depth", "1,3"])).radar_fixed_depths == (1, 3)
    assert settings_from_args(parser.parse_args(base + ["--preset", "sampling", "--radar-fixed-depth", "none"])
                              ).radar_fixed_depths == ()


def test_reference_decoder_runs_the_fixed_depth_row(tiny_bench_models: tuple[Path, Path, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from radar_vllm.bench.reference_backend import build_rows, round_counters
    from radar_vllm.offline.reference import decoder
    from radar_vllm.offline.reference.decoder import FixedDepth, PolicyStop

    monkeypatch.setattr(decoder, "ReferenceDecoder", lambda *args, **kwargs: None)  # no models needed here
    _, head, radar = tiny_bench_models
    configs = build_configs(head=str(head), radar_checkpoint=str(radar), k_list=[], include_tree=False,
                            include_static_tree=False, fixed_depths=[2])
    rows = {row.config.name: row for row in build_rows(configs, None, None, torch.device("cpu"), None)
            if row.make_rule is not None}
    fixed, learned = rows["radar-chain-d2"].make_rule(), rows[RADAR_CHAIN].make_rule()
    assert isinstance(fixed, FixedDepth) and fixed.depth == 2
    assert isinstance(learned, PolicyStop)
    # 3 rounds accepting 1, 3 and 0 tokens: 2 rounds accepted position 1, 1 round positions 2 and 3
    snapshot = round_counters(9, [2, 4, 1], [1, 3, 0], [2, 4, 1], max_depth=4, max_nodes=4)
    assert snapshot.vectors[ACCEPTED_PER_POSITION] == [2.0, 1.0, 1.0, 0.0]


# ------------------------------------------------------------------------------ per-position acceptance
def test_draft_acceptance_arithmetic() -> None:
    assert draft_acceptance_rate(40, 25) == pytest.approx(0.625)
    assert draft_acceptance_rate(0, 0) is None
    with pytest.raises(ValueError, match="counters"):
        draft_acceptance_rate(-1, 0)
    assert first_draft_acceptance([14.0, 11.0], 20) == pytest.approx(0.7)
    assert first_draft_acceptance(None, 20) is None and first_draft_acceptance([], 20) is None
    assert first_draft_acceptance([3.0], 0) is None


class Counter(SimpleNamespace):  # the class names snapshot_from_metrics reads, as vllm.v1.metrics.reader's
    pass


class Vector(SimpleNamespace):
    pass


def spec_llm(step: dict[str, float], per_position: list[float] | None) -> FakeLLM:
    """A stand-in engine whose spec-decode metrics grow by ``step`` per generate call (two engines'
    label sets, so the snapshot has to sum them); ``per_position`` None: no per-position vector."""

    def metrics(calls: int) -> list[Any]:
        found: list[Any] = []
        for engine in ("0", "1"):
            found += [Counter(name=name, labels={"engine": engine}, value=calls * value / 2)
                      for name, value in step.items()]
            if per_position is not None:
                found.append(Vector(name=ACCEPTED_PER_POSITION, labels={"engine": engine},
                                    values=[calls * v / 2 for v in per_position]))
        return found + [Counter(name="vllm:request_success", labels={}, value=calls)]

    return FakeLLM(answer=lambda request, params: [5] * params.max_tokens, metrics=metrics)


def _measured_cell(config: BenchConfig, llm: FakeLLM, repeats: int) -> Any:
    workload = Workload(name=MTBENCH, prompt_ids=[[1, 2], [3]], prompt_keys=["a", "b"])
    runner = OfflineRunner(llm, max_new_tokens=4, seed=0)
    llm.generate([], [])  # counters do not start at zero: the cell holds the measured runs only
    records = [runner.measure(workload, 0.6, MODE_BATCHED, repeat)[0] for repeat in range(repeats)]
    return build_cell(config, records)


def test_cells_carry_accepted_per_drafted_and_first_draft_acceptance() -> None:
    config = BenchConfig(name="eagle3-k2", kind=KIND_EAGLE3, num_speculative_tokens=2, max_depth=2, draft_model="h")
    # per run: 10 drafts of 2 tokens, 12 accepted: 7 at position 1, 5 at position 2
    llm = spec_llm({NUM_DRAFTS: 10.0, NUM_DRAFT_TOKENS: 20.0, NUM_ACCEPTED_TOKENS: 12.0}, [7.0, 5.0])
    cell = _measured_cell(config, llm, repeats=2)
    assert cell.draft_acceptance == pytest.approx(24 / 40)
    assert cell.first_draft_acceptance == pytest.approx(14 / 20)
    assert cell.acceptance_length == pytest.approx(1 + 24 / 20)
    assert cell.acceptance_per_position == pytest.approx([0.7, 0.5])
    data = cell.to_dict()
    assert (data["draft_acceptance"], data["first_draft_acceptance"]) == (cell.draft_acceptance, 0.7)


def test_rows_without_the_per_position_vector_or_drafts() -> None:
    tree = BenchConfig(name=RADAR_TREE, kind=KIND_RADAR, mode="tree", num_speculative_tokens=11, max_depth=4,
                       draft_model="r")
    cell = _measured_cell(tree, spec_llm({NUM_DRAFTS: 4.0, NUM_DRAFT_TOKENS: 40.0, NUM_ACCEPTED_TOKENS: 6.0}, None),
                          repeats=1)
    assert cell.draft_acceptance == pytest.approx(0.15)
    assert cell.first_draft_acceptance is None and cell.acceptance_length == pytest.approx(2.5)
    base = _measured_cell(BenchConfig(name=NO_SPEC, kind=KIND_NONE), spec_llm({}, None), repeats=1)
    assert (base.draft_acceptance, base.first_draft_acceptance, base.acceptance_length) == (None, None, None)


# ------------------------------------------------------------------------------ the sampling preset
def test_sampling_preset_rows_workload_and_temperatures(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    settings = sampling_settings()
    assert planned_rows(settings) == SAMPLING_ROWS
    assert [c.name for c in bench_rows(settings, tiny_bench_models)] == SAMPLING_ROWS
    assert planned_workloads(settings) == [MTBENCH]
    assert temperatures_for(settings.temperatures, settings.sampled_workloads, MTBENCH) == (0.0, 0.6, 1.0)
    assert settings.modes_for(tree=False) == settings.modes_for(tree=True) == (MODE_BATCHED,)
    assert (settings.repeats_for(tree=False), settings.repeats_for(tree=True)) == (1, 1)
    assert (settings.num_prompts, settings.max_new_tokens, settings.dtype) == (16, 96, "float32")
    assert settings.online_concurrency == () and planned_online_rows(settings, SAMPLING_ROWS) == []
    assert PRESETS["sampling"] is SAMPLING_PRESET


def test_sampling_preset_estimate_is_well_under_half_an_hour() -> None:
    estimate = estimate_run(sampling_settings())
    assert estimate.online_s == 0.0 and estimate.scoring_s > 0
    assert list(estimate.offline_by_row_s) == SAMPLING_ROWS
    assert 5.0 <= estimate.total_s / 60.0 <= SAMPLING_MAX_MINUTES / 2


def test_cli_sampling_preset_and_its_file_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from radar_vllm.cli import build_parser
    from radar_vllm.commands import bench

    monkeypatch.setattr(bench, "default_assets", lambda: ("smollm2", "radar"))
    parser = build_parser()
    settings = bench.settings_from_args(parser.parse_args(["bench", "--preset", "sampling", "--backend", "vllm"]))
    assert settings.tag == "sampling_smollm2" and settings.output_dir == str(Path("benchmarks") / "results")
    assert (settings.target, settings.radar_checkpoint, settings.dtype) == ("smollm2", "radar", "float32")
    assert settings.temperatures == (0.0, 0.6, 1.0) and settings.radar_fixed_depths == (1,)
    assert settings.uncorrected_k == (1,) and settings.confidence_threshold is None
    other = bench.settings_from_args(parser.parse_args(["bench", "--preset", "sampling", "--backend", "vllm",
                                                        "--target", "m", "--radar-checkpoint", "r"]))
    assert other.tag == "bench-sampling"  # not the shipped SmolLM2 assets: not named after them
    assert bench.settings_from_args(parser.parse_args(["bench", "--preset", "sampling", "--backend", "vllm",
                                                       "--tag", "x"])).tag == "x"


def _sampling_document() -> dict[str, Any]:
    """A sampling-preset document: every row at T = 0 and 0.6 (batched); the tree row without the
    per-position vector; radar-chain-d1's T = 0.6 outputs far less likely than no speculation's."""
    configs = [BenchConfig(name=NO_SPEC, kind=KIND_NONE),
               BenchConfig(name=RADAR_CHAIN, kind=KIND_RADAR, num_speculative_tokens=4, max_depth=4,
                           draft_model="r", radar_overrides={"mode": "chain"}),
               BenchConfig(name=D1, kind=KIND_RADAR, num_speculative_tokens=4, max_depth=4, draft_model="r",
                           radar_overrides={"mode": "chain", "fixed_depth": 1}),
               BenchConfig(name=RADAR_TREE, kind=KIND_RADAR, mode="tree", num_speculative_tokens=11, max_depth=4,
                           draft_model="r", radar_overrides={"mode": "tree"})]
    counters = {RADAR_CHAIN: ({NUM_DRAFTS: 10.0, NUM_DRAFT_TOKENS: 25.0, NUM_ACCEPTED_TOKENS: 15.0}, [8.0, 5.0, 2.0]),
                D1: ({NUM_DRAFTS: 20.0, NUM_DRAFT_TOKENS: 20.0, NUM_ACCEPTED_TOKENS: 9.0}, [9.0]),
                RADAR_TREE: ({NUM_DRAFTS: 8.0, NUM_DRAFT_TOKENS: 80.0, NUM_ACCEPTED_TOKENS: 12.0}, None),
                NO_SPEC: ({}, None)}
    scores = {NO_SPEC: [-1.0, -1.1, -0.9, -1.05], RADAR_CHAIN: [-1.02, -0.95, -1.1, -0.98],
              D1: [-6.0, -6.2, -5.9, -6.1], RADAR_TREE: [-1.0, -1.0, -1.1, -0.9]}
    results = {}
    for config in configs:
        metrics = MetricSnapshot(counters=dict(counters[config.name][0]))
        if counters[config.name][1] is not None:
            metrics.vectors[ACCEPTED_PER_POSITION] = counters[config.name][1]
        runs = [{"workload": MTBENCH, "temperature": t, "mode": MODE_BATCHED, "repeat": 0, "num_prompts": 4,
                 "prompt_tokens": 40, "output_tokens": 40, "seconds": 1.0, "metrics": metrics.to_dict()}
                for t in (0.0, 0.6)]
        results[config.name] = {
            "runs": runs, "outputs": {f"{MTBENCH}|{MODE_BATCHED}": [[1, 2]] * 4},
            "outputs_consistent": {f"{MTBENCH}|{MODE_BATCHED}": True},
            "sampled_outputs": [{"workload": MTBENCH, "temperature": 0.6, "mode": MODE_BATCHED,
                                 "outputs": [[1, 2]] * 4, "scores": scores[config.name]}]}
    return build_document(settings=dict(sampling_settings().to_dict(), tag="sampling_smollm2"), backend="vllm",
                          configs=configs, results=results,
                          workloads=[{"name": MTBENCH, "prompt_ids": [[1]] * 4, "prompt_keys": list("abcd")}],
                          online=[], models={"target": "T"}, notes=[], machine={}, packages={})


def test_sampling_report_has_one_acceptance_table_per_temperature() -> None:
    markdown = render_markdown(_sampling_document())
    for temperature, last in (("0", "greedy match |"), ("0.6", "log-prob/token (no-spec) | sampling check |")):
        table = markdown[markdown.index(f"### mtbench, T={temperature}, batched"):].split("\n\n")[1].splitlines()
        assert table[0] == ("| config | tok/s | vs no-spec | vs best EAGLE-3 | accept len | accepted/drafted | "
                            "1st-draft accept | draft calls/round | target passes/token | " + last)
        assert table[1].count("|") == table[0].count("|")
        rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table[2:]}
        assert list(rows) == [NO_SPEC, RADAR_CHAIN, D1, RADAR_TREE]
        # accept len, accepted/drafted, 1st-draft accept
        assert rows[RADAR_CHAIN][4:7] == ["2.50", "0.600", "0.800"]
        assert rows[D1][4:7] == ["1.45", "0.450", "0.450"]
        assert rows[RADAR_TREE][4:7] == ["2.50", "0.150", "–"]
        assert rows[NO_SPEC][4:7] == ["–", "–", "–"]
    sampled = markdown[markdown.index("### mtbench, T=0.6, batched"):].split("\n\n")[1].splitlines()
    rows = {line.split(" | ")[0][2:]: line for line in sampled[2:]}
    assert rows[NO_SPEC].endswith("| reference |")
    assert "| passed (p=" in rows[RADAR_CHAIN] and "**sampling: BROKEN (p=" in rows[D1]
    assert rows[D1].split(" | ")[-2] == "-6.05 (-1.01)"  # its log-prob/token and no speculation's


def test_every_engine_of_a_run_gets_one_kv_block_size(tiny_bench_models: tuple[Path, Path, Path]) -> None:
    """RADAR engines default to 32-token KV blocks, which alone speed up large CPU batches: the
    benchmark gives every row, stock ones included, the same block size (offline and served)."""
    from radar_vllm.bench.engine_process import engine_kwargs
    from radar_vllm.bench.harness import BenchModels, make_job
    from radar_vllm.bench.online import server_command

    target, head, radar = tiny_bench_models
    models = BenchModels(target=str(target), head=str(head), radar_checkpoint=str(radar), confidence_checkpoint=None)
    configs = build_configs(head=str(head), radar_checkpoint=str(radar), k_list=[1])
    for settings, expected in ((bench_settings(), 32), (bench_settings(kv_block_size=16), 16),
                               (bench_settings(engine_args={"block_size": 64}), 64), (bench_settings(kv_block_size=0), None)):
        for config in configs:
            job = make_job(settings, config, models, [], build_turn2=False)
            assert engine_kwargs(job["engine"], config.speculative_config()).get("block_size") == expected
            command = server_command(job["engine"], config.speculative_config(), 8000, 4)
            if expected:
                assert command[command.index("--block-size") + 1] == str(expected)
            else:
                assert "--block-size" not in command
    with pytest.raises(ValueError, match="kv_block_size"):
        bench_settings(kv_block_size=-1)
