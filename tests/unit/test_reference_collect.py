"""collect / calibrate on a tiny random target + head: exact laws checked by brute force."""
from __future__ import annotations

import json

import pytest
import torch

from radar_vllm.cli import main
from radar_vllm.core.config import TreeConfig
from radar_vllm.core.costs import ENGINE_REFERENCE_CPU, load_cost_table
from radar_vllm.offline.reference.record import collect_prompt
from radar_vllm.offline.reference.decoder import ReferenceDecoder
from radar_vllm.core.policy_state import chain_round_states
from radar_vllm.offline.reference.runners import load_head, load_target
from radar_vllm.offline.reference.recompute import brute_force_acceptance_law, path_draft_logprobs
from radar_vllm.offline.rl.table import load_round_table, read_shard_records
from tiny_models import make_tiny_eagle3_head, make_tiny_llama

PROMPT = list(range(7, 27))
LAW_TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("tiny-collect")
    make_tiny_llama(root / "target", context_scale=0.6)
    make_tiny_eagle3_head(root / "head", root / "target")
    return root


@pytest.fixture(scope="module")
def flat_models(tiny):
    """Target and head with flattened output layers: non-trivial laws at temperature 1."""
    target = load_target(tiny / "target")
    head = load_head(tiny / "head", target)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.06)
        head.lm_head.weight.mul_(0.06)
    return target, head


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_recorded_laws_equal_brute_force(flat_models, temperature) -> None:
    target, head = flat_models
    config = TreeConfig(top_k=3, max_depth=3, total_tokens=9)
    decoder = ReferenceDecoder(target, head, config)
    rounds = collect_prompt(decoder, PROMPT, 12, temperature,
                            torch.Generator().manual_seed(1), keep_trees=True)
    assert len(rounds) >= 3
    nontrivial = 0
    for record in rounds[:3]:
        assert record.states.shape == (3, 3) and record.accept_probs.shape == (3, 4)
        for depth, tree in enumerate(record.trees, start=1):
            listed = tree.to_lists()[0]
            assert int(record.tree_sizes[depth - 1]) == len(listed["target_tokens"])
            assert max(listed["depths"]) <= depth
            expected = brute_force_acceptance_law(target, record.context, listed["target_tokens"],
                                                  listed["parents"], 3, temperature)
            assert torch.allclose(record.accept_probs[depth - 1].double(),
                                  torch.tensor(expected, dtype=torch.float64),
                                  atol=LAW_TOLERANCE), (depth, record.accept_probs, expected)
            nontrivial += int(max(expected) < 0.99)
    if temperature == 1.0:
        assert nontrivial >= 3  # the laws really are spread, not point masses
    else:
        assert nontrivial == 0


def test_chain_mode_records_chain_states_and_laws(flat_models) -> None:
    target, head = flat_models
    depth, width = 3, 4
    config = TreeConfig(top_k=1, max_depth=depth, total_tokens=depth + 1)
    decoder = ReferenceDecoder(target, head, config, chain_state_size=width)
    rounds = collect_prompt(decoder, PROMPT, 8, 1.0, torch.Generator().manual_seed(2),
                            keep_trees=True)
    target_to_draft = head.target_to_draft_ids()
    for record in rounds[:2]:
        assert torch.equal(record.tree_sizes, torch.arange(1, depth + 1, dtype=torch.int32))
        chain = record.trees[-1].to_lists()[0]
        assert chain["parents"] == [-1, 0, 1]
        logprobs = path_draft_logprobs(target, head, record.context, chain["target_tokens"])
        # Each drafted token is the argmax of its call's draft distribution.
        drafted = [int(target_to_draft[t]) for t in chain["target_tokens"]]
        assert drafted == [int(lp.argmax()) for lp in logprobs[:depth]]
        expected_states = chain_round_states(torch.stack(logprobs[:depth])[None], width)[0]
        assert torch.allclose(record.states, expected_states, atol=1e-3)
        for d, tree in enumerate(record.trees, start=1):
            listed = tree.to_lists()[0]
            expected = brute_force_acceptance_law(target, record.context, listed["target_tokens"],
                                                  listed["parents"], depth, 1.0)
            assert torch.allclose(record.accept_probs[d - 1].double(),
                                  torch.tensor(expected, dtype=torch.float64), atol=LAW_TOLERANCE)


def test_collect_calibrate_train_evaluate_commands(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "rounds"
    common = ["collect", "--target", str(tiny / "target"), "--head", str(tiny / "head"),
              "--out", str(out), "--top-k", "3", "--max-depth", "3", "--total-tokens", "9",
              "--max-new-tokens", "10", "--prompts-per-shard", "2", "--temperatures", "0", "1"]
    assert main(common + ["--num-prompts", "2"]) == 0
    first = load_round_table(out / "T1")
    assert first.metadata.temperature == 1.0 and first.metadata.split == "train"
    assert first.metadata.head_id.startswith("head@")
    # Resume: two more prompts are appended, the first two are not redone.
    assert main(common + ["--num-prompts", "4"]) == 0
    table = load_round_table(out / "T1")
    assert table.num_rounds > first.num_rounds
    assert torch.equal(table.states[: first.num_rounds], first.states)
    positions = sorted(set(table.prompt_index.tolist()))
    assert positions == [0, 1, 2, 3]
    # Excluding a prompt (e.g. one the head was trained on) moves the selection past it, and
    # shards written without the exclusion are not resumed into.
    first_id = read_shard_records(out / "T1")[0]["shard"]["prompt_ids"][0]
    exclude = tmp_path / "head_prompts.jsonl"
    exclude.write_text(json.dumps({"prompt_id": first_id}) + "\n")
    other_out = tmp_path / "rounds-excluding"
    assert main(common[:5] + ["--out", str(other_out)] + common[7:] +
                ["--num-prompts", "2", "--temperatures", "1",
                 "--exclude-prompts", str(exclude)]) == 0
    kept = [i for r in read_shard_records(other_out / "T1") for i in r["shard"]["prompt_ids"]]
    assert first_id not in kept and len(kept) >= 1
    capsys.readouterr()
    assert main(common + ["--num-prompts", "4", "--exclude-prompts", str(exclude)]) == 2
    assert "--exclude-prompts" in capsys.readouterr().err
    greedy = load_round_table(out / "T0")
    assert torch.equal(greedy.accept_probs.amax(-1), torch.ones(greedy.num_rounds, 3))
    chain_out = tmp_path / "chain"
    assert main(common[:5] + ["--out", str(chain_out), "--mode", "chain", "--chain-state-size",
                              "4", "--max-depth", "3", "--max-new-tokens", "8",
                              "--num-prompts", "1", "--temperatures", "1"]) == 0
    chain = load_round_table(chain_out / "T1")
    assert (chain.metadata.mode, chain.metadata.top_k, chain.metadata.state_size) == \
        ("chain", 1, 4)
    assert torch.equal(chain.tree_sizes[0], torch.tensor([1, 2, 3], dtype=torch.int32))

    costs_path = tmp_path / "costs.json"
    assert main(["calibrate", "--target", str(tiny / "target"), "--head", str(tiny / "head"),
                 "--out", str(costs_path), "--top-k", "3", "--max-depth", "3",
                 "--total-tokens", "9", "--context-tokens", "24", "--repeats", "2",
                 "--warmup", "1"]) == 0
    costs = load_cost_table(costs_path)
    assert costs.engine == ENGINE_REFERENCE_CPU
    assert costs.head_id == table.metadata.head_id
    assert costs.verify_num_nodes == (1, 2, 4, 8)
    assert all(seconds > 0 for seconds in costs.verify_seconds)
    assert costs.draft_step_seconds > 0 and costs.policy_step_seconds > 0

    policies = tmp_path / "policies"
    assert main(["train-policy", "--table", str(out / "T1"), "--costs", str(costs_path),
                 "--out", str(policies), "--epochs", "1", "--val-fraction", "0.3",
                 "--this-machine", "--engine", ENGINE_REFERENCE_CPU]) == 0
    prefix = tmp_path / "eval"
    assert main(["evaluate-policy", "--table", str(out / "T1"), "--costs", str(costs_path),
                 "--policy", f"ours={policies / 'exact'}", "--out", str(prefix),
                 "--no-plot"]) == 0
    report = json.loads(prefix.with_suffix(".json").read_text())
    assert report["rows"][-1]["name"] == "oracle"
    # A cost table of another head is refused.
    capsys.readouterr()
    make_tiny_eagle3_head(tmp_path / "other-head", tiny / "target", seed=5)
    other = tmp_path / "other.json"
    assert main(["calibrate", "--target", str(tiny / "target"), "--head",
                 str(tmp_path / "other-head"), "--out", str(other), "--top-k", "3",
                 "--max-depth", "3", "--total-tokens", "9", "--context-tokens", "16",
                 "--repeats", "1", "--warmup", "0"]) == 0
    capsys.readouterr()
    assert main(["train-policy", "--table", str(out / "T1"), "--costs", str(other),
                 "--out", str(policies), "--epochs", "1"]) == 2
    assert "head" in capsys.readouterr().err
