"""RadarConfig, overrides, start-up validation and `radar-vllm pack` (no vLLM involved)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from radar_vllm.cli import main as cli_main
from radar_vllm.offline.pack import pack_radar_checkpoint
from radar_vllm.core.config import (
    OVERRIDES_ENV,
    RadarConfig,
    parse_overrides,
    radar_section,
    read_head_config,
    resolve_radar_config,
    validate_radar_setup,
)
from tiny_models import make_random_policy, make_tiny_eagle3_head, make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("radar_config")
    target = make_tiny_llama(root / "target")
    head = make_tiny_eagle3_head(root / "head", target)
    policy = make_random_policy(root / "policy", top_k=4, seed=0)
    checkpoint = pack_radar_checkpoint(head, policy, root / "radar", max_depth=4)
    return root, target, head, policy, checkpoint


def test_defaults_and_round_trip():
    config = RadarConfig()
    assert (config.top_k, config.max_depth, config.total_tokens, config.mode) == (10, 7, 60, "chain")
    assert RadarConfig.from_dict(config.to_dict()) == config
    assert "threshold" not in config.to_dict()  # None: the policy's own


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"top_k": 0}, "radar.top_k must be >= 1"),
        ({"max_depth": 0}, "radar.max_depth must be >= 1"),
        ({"threshold": 1.5}, "radar.threshold must be a number in [0, 1]"),
        ({"mode": "forest"}, "radar.mode must be one of"),
        ({"decision": "vote"}, "radar.decision must be one of"),
        ({"top_k": 2, "max_depth": 2, "total_tokens": 60}, "total_tokens=60"),
        ({"colour": "red"}, "unknown RADAR option(s) ['colour']"),
        ({"fixed_depth": 0}, "radar.fixed_depth must be >= 1"),
        ({"fixed_depth": 8}, "radar.fixed_depth=8 exceeds radar.max_depth=7"),
        ({"scratch_blocks": -1}, "radar.scratch_blocks must be >= 0"),
        ({"skip_drafting": "sometimes"}, "radar.skip_drafting must be one of"),
        ({"gate_costs": ""}, "radar.gate_costs must be a non-empty path string"),
        ({"gate_costs": []}, "radar.gate_costs must be a non-empty path string"),
        ({"gate_costs": ["a.json", 3]}, "radar.gate_costs must be a non-empty path string"),
        ({"gate_costs_extrapolate": "yes"}, "radar.gate_costs_extrapolate must be true or false"),
        ({"tree_sizes": 6}, "radar.tree_sizes must be a list"),
        ({"tree_sizes": [1]}, "radar.tree_sizes[] must be >= 2"),
        ({"tree_sizes": [6.5]}, "radar.tree_sizes[] must be an integer"),
        ({"total_tokens": 12, "tree_sizes": [12]}, "radar.tree_sizes holds 12: each must be below radar.total_tokens=12"),
        ({"tree_sizes": [6, 4, 6]}, "radar.tree_sizes repeats a size"),
    ],
)
def test_bad_options_name_the_option(options, fragment):
    with pytest.raises(ValueError) as error:
        RadarConfig.from_dict(options)
    assert fragment in str(error.value)


def test_overrides_environment_then_explicit(monkeypatch):
    section = {"policy": "policy", "top_k": 4, "max_depth": 4, "total_tokens": 16, "threshold": 0.5}
    monkeypatch.setenv(OVERRIDES_ENV, '{"threshold": 0.6, "max_depth": 3}')
    config = resolve_radar_config(section, ("launch", {"threshold": 0.7}))
    assert (config.threshold, config.max_depth, config.top_k) == (0.7, 3, 4)
    monkeypatch.setenv(OVERRIDES_ENV, "[1, 2]")
    with pytest.raises(ValueError, match=OVERRIDES_ENV):
        resolve_radar_config(section)
    with pytest.raises(ValueError, match="unknown RADAR option"):
        parse_overrides('{"depth": 3}')


def test_pack_writes_a_valid_checkpoint(tiny):
    _, target, head, _, checkpoint = tiny
    config = read_head_config(checkpoint)
    section = radar_section(config)
    # total_tokens defaults to min(60, 1 + the most candidates): 1 + 4 * (1 + 4 * 3) = 53.
    assert section == {"policy": "policy", "mode": "chain", "top_k": 4, "max_depth": 4, "total_tokens": 53,
                       "skip_drafting": "auto"}
    head_config = read_head_config(head)
    assert {k: v for k, v in config.items() if k != "radar"} == head_config
    # Head weights copied unchanged, policy in a sub-directory (not a top-level *.safetensors).
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["model.safetensors"]
    assert (checkpoint / "policy" / "policy.safetensors").is_file()
    original = load_file(str(head / "model.safetensors"))
    copied = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.equal(original[name], copied[name]) for name in original)
    validated = validate_radar_setup(
        RadarConfig.from_dict(section), checkpoint, target_hidden_size=128, num_speculative_tokens=4
    )
    assert validated.threshold == 0.5 and validated.decision == "threshold"


def test_pack_refuses_non_empty_output(tiny, tmp_path):
    _, _, head, policy, _ = tiny
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        pack_radar_checkpoint(head, policy, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_pack_cli(tiny, tmp_path, capsys):
    _, _, head, policy, _ = tiny
    code = cli_main(["pack", str(head), str(policy), str(tmp_path / "ck"), "--max-depth", "3", "--threshold", "0.4"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["radar"]["max_depth"] == 3 and printed["radar"]["threshold"] == 0.4
    assert cli_main(["pack", str(head), str(tmp_path / "nope"), str(tmp_path / "ck2")]) == 2
    assert not (tmp_path / "ck2").exists()


def test_pack_carries_a_gate_cost_table(tiny, tmp_path):
    from radar_vllm.core.draft_gate import GATE_TABLE_FORMAT, weights_id

    _, _, head, policy, _ = tiny
    table = tmp_path / "gate.json"
    table.write_text(json.dumps({"format": GATE_TABLE_FORMAT, "modes": {}}))
    out = pack_radar_checkpoint(head, policy, tmp_path / "ck", max_depth=4, gate_costs_paths=[table])
    assert read_head_config(out)["radar"]["gate_costs"] == "gate_costs.json"
    assert json.loads((out / "gate_costs.json").read_text())["format"] == GATE_TABLE_FORMAT
    # several tables (one per machine) are kept side by side, listed in order
    second = tmp_path / "gate_b.json"
    second.write_text(json.dumps({"format": GATE_TABLE_FORMAT, "modes": {}, "note": "machine B"}))
    several = pack_radar_checkpoint(head, policy, tmp_path / "ck3", max_depth=4, gate_costs_paths=[table, second],
                                    tree_sizes=[6])
    assert read_head_config(several)["radar"]["tree_sizes"] == [6]
    assert read_head_config(several)["radar"]["gate_costs"] == ["gate_costs.json", "gate_costs_2.json"]
    assert json.loads((several / "gate_costs_2.json").read_text())["note"] == "machine B"
    # re-packing a packed checkpoint with one table leaves none of the old ones behind
    repacked = pack_radar_checkpoint(several, policy, tmp_path / "ck4", max_depth=4, gate_costs_paths=[second])
    assert not (repacked / "gate_costs_2.json").exists()
    assert json.loads((repacked / "gate_costs.json").read_text())["note"] == "machine B"
    # the table names the head by its weights, which packing leaves as they are
    assert weights_id(out).split("@")[1] == weights_id(head).split("@")[1]
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(ValueError, match="not a gate-cost table"):
        pack_radar_checkpoint(head, policy, tmp_path / "ck2", gate_costs_paths=[tmp_path / "notes.json"])
    assert not (tmp_path / "ck2").exists()


def _copy_checkpoint(checkpoint, destination):
    shutil.copytree(checkpoint, destination)
    return destination


def test_validation_missing_policy(tiny, tmp_path):
    _, _, _, _, checkpoint = tiny
    broken = _copy_checkpoint(checkpoint, tmp_path / "ck")
    shutil.rmtree(broken / "policy")
    config = RadarConfig.from_dict(radar_section(read_head_config(broken)))
    with pytest.raises(FileNotFoundError, match="RADAR stop policy not found"):
        validate_radar_setup(config, broken)


def test_validation_wrong_policy_shape(tiny, tmp_path):
    _, _, _, _, checkpoint = tiny
    broken = _copy_checkpoint(checkpoint, tmp_path / "ck")
    weights = broken / "policy" / "policy.safetensors"
    tensors = load_file(str(weights))
    tensors["mlp_in.weight"] = tensors["mlp_in.weight"][:, :-1].contiguous()
    save_file(tensors, str(weights))
    config = RadarConfig.from_dict(radar_section(read_head_config(broken)))
    with pytest.raises(ValueError, match="mlp_in.weight"):
        validate_radar_setup(config, broken)


def test_validation_policy_state_size_vs_top_k(tiny):
    _, _, _, _, checkpoint = tiny
    config = RadarConfig.from_dict(radar_section(read_head_config(checkpoint))).with_overrides({"top_k": 5})
    with pytest.raises(ValueError, match=r"takes states of size 4 but radar.top_k=5"):
        validate_radar_setup(config, checkpoint)


def test_validation_hidden_size_and_depth(tiny):
    _, _, _, _, checkpoint = tiny
    config = RadarConfig.from_dict(radar_section(read_head_config(checkpoint)))
    with pytest.raises(ValueError, match="hidden size 128 .* but the target model has hidden size 256"):
        validate_radar_setup(config, checkpoint, target_hidden_size=256)
    with pytest.raises(ValueError, match="num_speculative_tokens=3 but the RADAR checkpoint's max_depth=4"):
        validate_radar_setup(config, checkpoint, num_speculative_tokens=3)
    tree = config.with_overrides({"mode": "tree"})
    with pytest.raises(ValueError, match=f"in tree mode num_speculative_tokens must be total_tokens - 1 = {tree.total_tokens - 1}"):
        validate_radar_setup(tree, checkpoint, num_speculative_tokens=config.max_depth)
    validate_radar_setup(tree, checkpoint, num_speculative_tokens=tree.total_tokens - 1)


def test_tree_policy_selected_by_mode():
    section = {"policy": "policy", "tree_policy": "policy-tree", "top_k": 4, "max_depth": 4, "total_tokens": 16}
    chain = RadarConfig.from_dict(section)
    tree = chain.with_overrides({"mode": "tree"})
    assert (chain.active_policy, chain.policy_path("/ck").as_posix()) == ("policy", "/ck/policy")
    assert (tree.active_policy, tree.policy_path("/ck").as_posix()) == ("policy-tree", "/ck/policy-tree")
    # without tree_policy, tree mode runs the main policy (older checkpoints keep their meaning)
    legacy = RadarConfig.from_dict({k: v for k, v in section.items() if k != "tree_policy"}, "legacy")
    assert legacy.with_overrides({"mode": "tree"}).active_policy == "policy"
    assert "tree_policy" not in legacy.to_dict()
    assert RadarConfig.from_dict(chain.to_dict()) == chain
    with pytest.raises(ValueError, match="radar.tree_policy must be a non-empty path string"):
        RadarConfig.from_dict({**section, "tree_policy": ""})


def test_pack_with_tree_policy(tiny, tmp_path):
    _, _, head, policy, _ = tiny
    tree_policy = make_random_policy(tmp_path / "tree-policy", top_k=4, seed=1, threshold=0.3)
    code = cli_main(["pack", str(head), str(policy), str(tmp_path / "ck"), "--max-depth", "4",
                     "--tree-policy", str(tree_policy)])
    assert code == 0
    checkpoint = tmp_path / "ck"
    section = radar_section(read_head_config(checkpoint))
    assert section["policy"] == "policy" and section["tree_policy"] == "policy-tree"
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["model.safetensors"]
    original = load_file(str(tree_policy / "policy.safetensors"))
    copied = load_file(str(checkpoint / "policy-tree" / "policy.safetensors"))
    assert all(torch.equal(original[name], copied[name]) for name in original)
    config = RadarConfig.from_dict(section)
    chain = validate_radar_setup(config, checkpoint, num_speculative_tokens=4)
    tree = validate_radar_setup(config.with_overrides({"mode": "tree"}), checkpoint)
    # each mode runs its own policy, with that policy's own threshold
    assert chain.policy_path == checkpoint / "policy" and chain.threshold == 0.5
    assert tree.policy_path == checkpoint / "policy-tree" and tree.threshold == 0.3


def test_pack_with_sampled_policy(tiny, tmp_path):
    _, _, head, policy, _ = tiny
    sampled_policy = make_random_policy(tmp_path / "sampled-policy", top_k=4, seed=3, threshold=0.4)
    code = cli_main(["pack", str(head), str(policy), str(tmp_path / "ck"), "--max-depth", "4",
                     "--sampled-policy", str(sampled_policy)])
    assert code == 0
    checkpoint = tmp_path / "ck"
    section = radar_section(read_head_config(checkpoint))
    assert section["sampled_policy"] == "policy-sampled"
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["model.safetensors"]
    config = RadarConfig.from_dict(section)
    chain = validate_radar_setup(config, checkpoint, num_speculative_tokens=4)
    assert chain.policy_path == checkpoint / "policy" and chain.threshold == 0.5
    assert chain.sampled_policy_path == checkpoint / "policy-sampled" and chain.sampled_threshold == 0.4
    # an explicit threshold applies to both policies
    assert validate_radar_setup(config.with_overrides({"threshold": 0.7}), checkpoint).sampled_threshold == 0.7
    # tree mode runs one policy for every request
    assert validate_radar_setup(config.with_overrides({"mode": "tree"}), checkpoint).sampled_policy_path is None
    # the engine plan carries it to every process
    from radar_vllm.vllm.engine_plan import _radar_from_dict, _radar_to_dict

    assert _radar_from_dict(_radar_to_dict(chain)) == chain
    # a policy of the wrong width or a missing one is refused, naming the key
    wide = make_random_policy(tmp_path / "wide", top_k=5, seed=2)
    with pytest.raises(ValueError, match=r"radar.sampled_policy\) takes states of size 5 but radar.top_k=4"):
        pack_radar_checkpoint(head, policy, tmp_path / "ck2", max_depth=4, sampled_policy_path=wide)
    shutil.rmtree(checkpoint / "policy-sampled")
    with pytest.raises(FileNotFoundError, match="radar.sampled_policy='policy-sampled'"):
        validate_radar_setup(config, checkpoint)
    with pytest.raises(ValueError, match="radar.sampled_policy must be a non-empty path string"):
        RadarConfig.from_dict({**section, "sampled_policy": ""})


def test_validation_checks_the_tree_policy_in_chain_mode_too(tiny, tmp_path):
    _, _, head, policy, _ = tiny
    wide = make_random_policy(tmp_path / "wide", top_k=5, seed=2)
    with pytest.raises(ValueError, match=r"radar.tree_policy\) takes states of size 5 but radar.top_k=4"):
        pack_radar_checkpoint(head, policy, tmp_path / "ck", max_depth=4, tree_policy_path=wide)
    assert not (tmp_path / "ck").exists()
    checkpoint = pack_radar_checkpoint(head, policy, tmp_path / "ck2", max_depth=4, tree_policy_path=policy)
    shutil.rmtree(checkpoint / "policy-tree")
    config = RadarConfig.from_dict(radar_section(read_head_config(checkpoint)))
    with pytest.raises(FileNotFoundError, match="radar.tree_policy='policy-tree'"):
        validate_radar_setup(config, checkpoint)


def test_the_gate_chooses_among_smaller_trees_only_in_tree_mode_with_the_gate_on():
    options = {"total_tokens": 12, "tree_sizes": [6, 4]}
    assert RadarConfig.from_dict({**options, "mode": "tree"}).gate_tree_sizes == [6, 4]
    assert RadarConfig.from_dict(options).gate_tree_sizes == []  # chain mode verifies no trees
    assert RadarConfig.from_dict({**options, "mode": "tree", "skip_drafting": "never"}).gate_tree_sizes == []
    assert RadarConfig.from_dict({**options, "mode": "tree", "fixed_depth": 3}).gate_tree_sizes == []
    assert RadarConfig.from_dict({"mode": "tree"}).gate_tree_sizes == []
