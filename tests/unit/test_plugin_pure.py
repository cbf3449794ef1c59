"""Pure parts of the vLLM plugin: chain policy state, round statistics, version gate, test models."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from radar_vllm.core.policy_state import chain_frontier_scores, chain_round_states
from tiny_models import TINY_TARGET_RECORD, make_tiny_eagle3_head, make_tiny_llama
from radar_vllm.vllm.plugin import check_vllm_version
from radar_vllm.vllm.stats import (
    PADDING_TOKEN,
    RadarTotals,
    count_stop_depth,
    histogram_from_survival,
    strip_padding,
    summarize_step,
)


def test_chain_frontier_scores_worked_example():
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.6, 0.1]]))
    prefix = torch.tensor([0.0, -1.0])
    scores, next_prefix = chain_frontier_scores(prefix, logprobs, top_k=3)
    expected = torch.stack([
        torch.log(torch.tensor([0.5, 0.3, 0.15])),
        -1.0 + torch.log(torch.tensor([0.6, 0.2, 0.1])),
    ])
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(next_prefix, expected[:, 0])
    with pytest.raises(ValueError, match="top_k"):
        chain_frontier_scores(prefix, logprobs, top_k=5)


def test_round_states_match_step_by_step():
    generator = torch.Generator().manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(3, 5, 11, generator=generator) * 2, dim=-1)
    batched = chain_round_states(logprobs, top_k=4)
    prefix = torch.zeros(3)
    for step in range(5):
        scores, prefix = chain_frontier_scores(prefix, logprobs[:, step], top_k=4)
        torch.testing.assert_close(batched[:, step], scores)
        assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_strip_padding():
    assert strip_padding([5, 9, PADDING_TOKEN, PADDING_TOKEN]) == [5, 9]
    assert strip_padding([PADDING_TOKEN, PADDING_TOKEN]) == []
    assert strip_padding([1, 2, 3]) == [1, 2, 3]


def test_summarize_step_example():
    # Drafts of depths [1, 3, 3] (K = 4); accepted [0, 2, 3].
    summary = summarize_step(3, [3, 2, 2, 0], [2, 2, 1, 0])
    assert summary.stop_depths == {1: 1, 3: 2}
    assert summary.acceptance_lengths == {1: 1, 3: 1, 4: 1}
    assert summary.draft_calls == 3
    totals = RadarTotals()
    totals.add(summary)
    totals.add(summarize_step(1, [1, 0, 0, 0], [0, 0, 0, 0]))
    assert totals.rounds == 2 and totals.draft_calls == 4
    assert totals.mean_stop_depth == pytest.approx((1 + 3 + 3 + 1) / 4)
    assert totals.mean_acceptance_length == pytest.approx((1 + 3 + 4 + 1) / 4)


def test_summarize_step_tree_mode():
    # Trees of 9, 4 and 9 nodes whose rounds stopped after 3, 1 and 5 draft calls; accepted [2, 0, 4].
    sizes, accepted = [9, 4, 9], [2, 0, 4]
    per_pos = [sum(1 for s in sizes if s > i) for i in range(9)]
    accepted_per_pos = [sum(1 for a in accepted if a > i) for i in range(9)]
    depths = [0] * 6
    for depth in (3, 1, 5):
        count_stop_depth(depths, depth)
    summary = summarize_step(3, per_pos, accepted_per_pos, depths)
    assert summary.stop_depths == {1: 1, 3: 1, 5: 1}
    assert summary.tree_sizes == {4: 1, 9: 2}
    assert summary.acceptance_lengths == {1: 1, 3: 1, 5: 1}
    assert summary.draft_calls == 5
    totals = RadarTotals()
    totals.add(summary)
    assert totals.mean_tree_size == pytest.approx(22 / 3)
    assert totals.mean_stop_depth == pytest.approx(3.0)
    # chain mode: tree size = stop depth
    chain = summarize_step(3, [3, 2, 2, 0], [2, 2, 1, 0])
    assert chain.tree_sizes == chain.stop_depths == {1: 1, 3: 2}
    with pytest.raises(ValueError, match="depth must be in"):
        count_stop_depth(depths, 6)
    with pytest.raises(ValueError, match="stop_depth_counts must be non-negative"):
        summarize_step(1, [1], [0], [0, -1])


def test_histogram_from_survival_rejects_increasing_counts():
    assert histogram_from_survival([4, 4, 1], total=6) == {0: 2, 2: 3, 3: 1}
    with pytest.raises(ValueError, match="must not increase"):
        histogram_from_survival([1, 2])


@pytest.mark.parametrize("version", ["0.32.0", "0.32.3.dev5+gabc123", "0.33.1"])
def test_supported_vllm_versions(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0"])
def test_unsupported_vllm_versions_fail_loudly(version):
    with pytest.raises(RuntimeError, match=rf"vLLM {version} is installed.*VLLM_PLUGINS"):
        check_vllm_version(version)


def test_tiny_models_are_consistent(tmp_path):
    target = make_tiny_llama(tmp_path / "target")
    head = make_tiny_eagle3_head(tmp_path / "head", target, aux_layer_ids=[1, 2, 3])
    config = json.loads((head / "config.json").read_text())
    target_config = json.loads((target / "config.json").read_text())
    tensors = load_file(str(head / "model.safetensors"))
    record = json.loads((target / TINY_TARGET_RECORD).read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert tensors["fc.weight"].shape == (128, 3 * target_config["hidden_size"])
    assert tensors["lm_head.weight"].shape == (config["draft_vocab_size"], 128)
    # d2t maps the draft vocabulary onto the target's subset S exactly.
    draft_ids = torch.arange(config["draft_vocab_size"])
    assert torch.equal(draft_ids + tensors["d2t"], torch.tensor(sorted(record["subset"])))
    assert tensors["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * 128
    # Deterministic for a seed.
    again = make_tiny_llama(tmp_path / "again")
    first = load_file(str(target / "model.safetensors"))
    second = load_file(str(again / "model.safetensors"))
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_all_stopped_monitor_cpu():
    from radar_vllm.vllm.stop_monitor import AllStoppedMonitor

    monitor = AllStoppedMonitor(torch.device("cpu"), max_depth=4)
    monitor.begin_round()
    assert not monitor.all_stopped()
    monitor.record(torch.tensor([True, False, False]))
    assert not monitor.all_stopped()
    monitor.record(torch.tensor([False, False, False]))
    assert monitor.all_stopped()
    monitor.begin_round()
    assert not monitor.all_stopped()


@pytest.mark.parametrize("ours, upstream", [
    ("radar_vllm.vllm.proposer", "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer"),
    ("radar_vllm.vllm.worker", "vllm.v1.worker.gpu_model_runner:GPUModelRunner"),
    ("radar_vllm.vllm.cpu_sampling_fix", "vllm.v1.worker.gpu_model_runner:GPUModelRunner"),
])
def test_overrides_follow_the_pinned_upstream_methods(ours, upstream):
    """RadarProposer.propose follows vLLM's SpecDecodeBaseProposer.propose of the pinned release,
    the runners' GPUModelRunner._sample, and the CPU seeded-sampling fix GPUModelRunner._bookkeeping_sync. If this
    fails after a vLLM upgrade, re-read the upstream method, port what changed into the module
    named (or refuse the new branch), then pin the new hash."""
    import hashlib
    import importlib
    import inspect

    pytest.importorskip("vllm")
    module_name, class_name = upstream.split(":")
    upstream_class = getattr(importlib.import_module(module_name), class_name)
    pins = importlib.import_module(ours).UPSTREAM_SHA256
    assert pins
    for method, digest in pins.items():
        source = inspect.getsource(getattr(upstream_class, method))
        assert hashlib.sha256(source.encode()).hexdigest() == digest, (
            f"vLLM's {class_name}.{method} changed: re-read it against {ours}")


def _constant_policy(continue_: bool, state_size: int = 4):
    from radar_vllm.core.policy import PolicyConfig, StopPolicy

    policy = StopPolicy(PolicyConfig(state_size=state_size))
    with torch.no_grad():
        policy.mlp_out.weight.zero_()
        policy.mlp_out.bias.copy_(torch.tensor([-20.0, 20.0] if continue_ else [20.0, -20.0]))
    return policy.eval()


def test_sampled_requests_run_the_sampled_policy():
    from types import SimpleNamespace

    from radar_vllm.core.growth import ChainGrowth
    from radar_vllm.core.policy import PolicyRunner
    from radar_vllm.vllm.proposer import RadarProposer
    from radar_vllm.vllm.stop_monitor import AllStoppedMonitor

    proposer = RadarProposer.__new__(RadarProposer)  # only the policy selection is exercised
    proposer.policy_runner = PolicyRunner(_constant_policy(False), max_batch_size=8)  # greedy: stop
    proposer.sampled_policy_runner = PolicyRunner(_constant_policy(True), max_batch_size=8)  # sampled: go on
    proposer.positions = torch.zeros(8, dtype=torch.int64)
    proposer.stop_monitor = AllStoppedMonitor(torch.device("cpu"), 4)

    def first_decision(metadata, batch_size=4):
        growth = ChainGrowth(batch_size, 4, 4, torch.device("cpu"))
        growth.start(torch.randn(batch_size, 16))
        proposer._begin_policy_round(batch_size, metadata)
        return proposer._decide(growth, torch.ones(batch_size, dtype=torch.bool)).tolist(), len(proposer._round_runners)

    mixed = SimpleNamespace(all_greedy=False, all_random=False, temperature=torch.tensor([-1.0, 1.0, 0.0, 0.7]))
    assert first_decision(mixed) == ([False, True, False, True], 2)
    assert first_decision(SimpleNamespace(all_greedy=True, all_random=False, temperature=None)) == ([False] * 4, 1)
    assert first_decision(SimpleNamespace(all_greedy=False, all_random=True, temperature=torch.ones(4))) == (
        [True] * 4, 1)
    proposer.sampled_policy_runner = None  # a checkpoint without one: every request runs the main policy
    assert first_decision(mixed) == ([False] * 4, 1)


def test_radar_engines_take_small_kv_blocks_only_where_the_user_chose_none():
    from types import SimpleNamespace

    from radar_vllm.vllm.engine_plan import RADAR_BLOCK_SIZE, use_radar_block_size

    default = SimpleNamespace(block_size=128, user_specified_block_size=False)  # the CPU platform's
    use_radar_block_size(default)
    assert default.block_size == RADAR_BLOCK_SIZE == 32 and default.user_specified_block_size
    chosen = SimpleNamespace(block_size=128, user_specified_block_size=True)
    small = SimpleNamespace(block_size=16, user_specified_block_size=False)  # GPU platforms' default
    for config, size in ((chosen, 128), (small, 16)):
        use_radar_block_size(config)
        assert config.block_size == size
