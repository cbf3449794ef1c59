"""Stop policy: network shape, features, decisions, recurrent reset, checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from radar_vllm.kernels.dispatch import force_backend, interpreter_enabled
from radar_vllm.core.policy import (
    CONFIG_FILENAME,
    DECISION_SAMPLED,
    DECISION_THRESHOLD,
    WEIGHTS_FILENAME,
    PolicyConfig,
    PolicyRunner,
    StopPolicy,
    continue_probability,
    decide,
    load_policy,
    load_policy_checkpoint,
    save_policy,
)


def make_policy(seed: int = 0, config: PolicyConfig | None = None) -> StopPolicy:
    torch.manual_seed(seed)
    return StopPolicy(config).eval()


def random_scores(batch: int, width: int = 10, seed: int = 1) -> torch.Tensor:
    """Frontier-like scores: negative cumulative log-probs sorted descending, [batch, width]."""
    g = torch.Generator().manual_seed(seed)
    scores = -torch.rand(batch, width, generator=g) * 12.0 - 0.01
    return torch.sort(scores, dim=-1, descending=True).values


# ----------------------------------------------------------------------------------------------
# network and config


def test_default_parameter_count_matches_paper() -> None:
    policy = StopPolicy()
    assert sum(p.numel() for p in policy.parameters()) == 89_730


def test_parameter_count_follows_config() -> None:
    config = PolicyConfig(state_size=4, lstm_hidden=8, mlp_hidden=6)
    policy = StopPolicy(config)
    lstm = 4 * 8 * (4 + 8) + 2 * 4 * 8
    mlp = (8 + 4) * 6 + 6 + 6 * 2 + 2
    assert sum(p.numel() for p in policy.parameters()) == lstm + mlp


@pytest.mark.parametrize(
    "field, value",
    [
        ("state_size", 0),
        ("lstm_hidden", -3),
        ("mlp_hidden", 2.5),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("decision", "greedy"),
        ("threshold", 1.5),
        ("threshold", -0.01),
        ("score_floor", 0.0),
        ("score_floor", float("-inf")),
    ],
)
def test_config_rejects_bad_values_naming_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        PolicyConfig(**{field: value})
    assert field in str(info.value)
    assert repr(value) in str(info.value)


def test_config_dict_round_trip_and_unknown_key() -> None:
    config = PolicyConfig(state_size=6, decision=DECISION_SAMPLED, threshold=0.3, score_floor=-20.0)
    assert PolicyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="depth_feature"):
        PolicyConfig.from_dict({**config.to_dict(), "depth_feature": True})


def test_features_sanitise_clamp_and_sort() -> None:
    policy = StopPolicy(PolicyConfig(state_size=4, score_floor=-30.0))
    scores = torch.tensor([[-1.0, float("-inf"), -50.0, float("nan")], [-3.0, -0.5, -2.0, 0.25]])
    state = policy.features(scores)
    expected = torch.tensor([[-1.0, -30.0, -30.0, -30.0], [0.0, -0.5, -2.0, -3.0]])
    assert state.dtype == torch.float32
    assert torch.equal(state, expected)
    with pytest.raises(ValueError, match="frontier_scores"):
        policy.features(torch.zeros(2, 5))


def test_sequence_forward_equals_repeated_steps() -> None:
    policy = make_policy(3)
    states = torch.stack([policy.features(random_scores(5, seed=s)) for s in range(4)], dim=1)  # [5, 4, 10]
    logits_seq = policy(states)
    hidden = None
    for t in range(states.shape[1]):
        logits, hidden = policy.step(states[:, t], hidden)
        torch.testing.assert_close(logits, logits_seq[:, t], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# decisions


def test_threshold_decision_is_deterministic_and_matches_probability() -> None:
    policy = make_policy(5)
    state = policy.features(random_scores(64, seed=7))
    with torch.no_grad():
        logits, _ = policy.step(state)
    p = continue_probability(logits)
    threshold = float(p.median())  # splits the batch, so both outcomes occur
    flags = [policy.decide(logits, mode=DECISION_THRESHOLD, threshold=threshold) for _ in range(3)]
    assert all(torch.equal(flags[0], f) for f in flags[1:])
    assert torch.equal(flags[0], torch.softmax(logits, -1)[:, 1] >= threshold)
    assert 0 < int(flags[0].sum()) < 64
    assert bool(decide(p, DECISION_THRESHOLD, 0.0).all())
    assert not bool(decide(p.clamp(max=0.999), DECISION_THRESHOLD, 1.0).any())


def test_sampled_decision_frequency_matches_probability() -> None:
    trials = 20_000
    probs = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.97])
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(len(probs))
    for _ in range(4):
        batch = probs.repeat(trials // 4)
        counts += decide(batch, DECISION_SAMPLED, generator=g).view(-1, len(probs)).sum(0).float()
    freq = counts / trials
    sigma = torch.sqrt(probs * (1 - probs) / trials)
    assert bool(((freq - probs).abs() < 5 * sigma).all()), (freq, probs)


def test_sampled_decision_uses_given_uniform() -> None:
    p = torch.tensor([0.2, 0.2, 0.7, 0.7])
    u = torch.tensor([0.1, 0.3, 0.69, 0.71])
    assert torch.equal(decide(p, DECISION_SAMPLED, uniform=u), torch.tensor([True, False, True, False]))
    with pytest.raises(ValueError, match="mode"):
        decide(p, "coin")


# ----------------------------------------------------------------------------------------------
# batched runtime


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param(
            "triton", marks=pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1")
        ),
    ],
)
def test_runner_matches_policy_steps_and_keeps_stopped_requests_stopped(backend: str) -> None:
    policy = make_policy(11)
    batch, steps = 6, 4
    round_scores = [random_scores(batch, seed=20 + t) for t in range(steps)]
    p_continue = torch.tensor([0.5])
    with force_backend(backend):
        runner = PolicyRunner(policy, max_batch_size=8, decision=DECISION_THRESHOLD, threshold=0.5)
        runner.begin_round(batch)
        hidden = None
        still_active = torch.ones(batch, dtype=torch.bool)
        for scores in round_scores:
            flags = runner.step(scores).clone()
            logits, hidden = policy.step(policy.features(scores), hidden)
            p_continue = continue_probability(logits)
            torch.testing.assert_close(runner.p_continue[:batch], p_continue, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(runner.hidden[:batch], hidden[0], rtol=1e-5, atol=1e-6)
            clear = (p_continue - 0.5).abs() > 1e-4  # rows whose decision cannot flip by rounding
            expected = still_active & (p_continue >= 0.5)
            assert torch.equal(flags[clear], expected[clear])
            assert not bool((flags & ~still_active).any())
            still_active = flags
        # rows beyond the round's batch are untouched
        assert torch.equal(runner.hidden[batch:], torch.zeros(2, policy.config.lstm_hidden))


def test_runner_resets_recurrent_state_every_round() -> None:
    policy = make_policy(2)
    scores = random_scores(5, seed=3)
    runner = PolicyRunner(policy, max_batch_size=5)
    runner.begin_round(5)
    runner.step(scores)
    first = runner.p_continue.clone()
    runner.step(scores)
    second = runner.p_continue.clone()
    assert not torch.equal(first, second)  # the recurrent state matters
    runner.begin_round(5)
    assert torch.equal(runner.hidden, torch.zeros_like(runner.hidden))
    assert bool(runner.active.all())
    runner.step(scores)
    assert torch.equal(runner.p_continue, first)


def test_runner_sampled_mode_with_uniform() -> None:
    policy = make_policy(4)
    scores = random_scores(4, seed=9)
    runner = PolicyRunner(policy, max_batch_size=4, decision=DECISION_SAMPLED)
    runner.begin_round(4)
    p = continue_probability(policy.step(policy.features(scores))[0])
    uniform = torch.stack([p[0] - 0.01, p[1] + 0.01, p[2] - 0.01, p[3] + 0.01]).clamp(0, 1)
    flags = runner.step(scores, uniform=uniform)
    assert torch.equal(flags, torch.tensor([True, False, True, False]))


def test_runner_rejects_bad_sizes() -> None:
    policy = make_policy()
    with pytest.raises(ValueError, match="max_batch_size"):
        PolicyRunner(policy, max_batch_size=0)
    runner = PolicyRunner(policy, max_batch_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        runner.begin_round(4)
    runner.begin_round(2)
    with pytest.raises(ValueError, match="frontier_scores"):
        runner.step(random_scores(3))


# ----------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_is_bit_identical(tmp_path: Path) -> None:
    config = PolicyConfig(decision=DECISION_SAMPLED, threshold=0.4)
    policy = make_policy(21, config)
    metadata = {"training_record": "runs/rl-0007.json", "epochs": 100}
    save_policy(policy, None, tmp_path / "ckpt", metadata=metadata)
    assert (tmp_path / "ckpt" / WEIGHTS_FILENAME).is_file()
    loaded = load_policy_checkpoint(tmp_path / "ckpt")
    assert loaded.config == config
    assert loaded.metadata == metadata
    assert not loaded.policy.training
    states = torch.stack([policy.features(random_scores(7, seed=s)) for s in range(3)], dim=1)
    with torch.no_grad():
        assert torch.equal(policy(states), loaded.policy(states))
    # file-path forms
    save_policy(policy, PolicyConfig(threshold=0.7), tmp_path / "flat" / "p.safetensors")
    other = load_policy(tmp_path / "flat" / "p.json")
    assert other.config.threshold == 0.7
    with torch.no_grad():
        assert torch.equal(policy(states), other(states))


def test_save_rejects_config_of_other_architecture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="architecture"):
        save_policy(make_policy(), PolicyConfig(lstm_hidden=64), tmp_path)


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    save_policy(make_policy(8), None, tmp_path)
    return tmp_path


def test_load_missing_files(saved: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_policy(saved / "nowhere")
    (saved / WEIGHTS_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILENAME):
        load_policy(saved)


def test_load_bad_json(saved: Path) -> None:
    (saved / CONFIG_FILENAME).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"policy\.json.*JSON"):
        load_policy(saved)


def test_load_bad_config_values(saved: Path) -> None:
    document = json.loads((saved / CONFIG_FILENAME).read_text())
    document["config"]["threshold"] = 2.0
    (saved / CONFIG_FILENAME).write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"policy\.json.*threshold"):
        load_policy(saved)


def test_load_wrong_format_marker(saved: Path) -> None:
    (saved / CONFIG_FILENAME).write_text(json.dumps({"config": {}}))
    with pytest.raises(ValueError, match="format"):
        load_policy(saved)


def _rewrite_tensors(directory: Path, edit) -> None:
    tensors = load_file(str(directory / WEIGHTS_FILENAME))
    edit(tensors)
    save_file(tensors, str(directory / WEIGHTS_FILENAME))


def test_load_missing_tensor(saved: Path) -> None:
    _rewrite_tensors(saved, lambda t: t.pop("mlp_out.bias"))
    with pytest.raises(ValueError, match=r"policy\.safetensors.*missing.*mlp_out\.bias"):
        load_policy(saved)


def test_load_unexpected_tensor(saved: Path) -> None:
    _rewrite_tensors(saved, lambda t: t.__setitem__("depth_embedding", torch.ones(3)))
    with pytest.raises(ValueError, match=r"policy\.safetensors.*unexpected.*depth_embedding"):
        load_policy(saved)


def test_load_wrong_shape(saved: Path) -> None:
    _rewrite_tensors(saved, lambda t: t.__setitem__("mlp_in.weight", torch.ones(128, 139)))
    with pytest.raises(ValueError, match=r"policy\.safetensors.*mlp_in\.weight.*\(128, 139\).*\(128, 138\)"):
        load_policy(saved)


def test_load_config_disagreeing_with_weights(saved: Path) -> None:
    document = json.loads((saved / CONFIG_FILENAME).read_text())
    document["config"]["state_size"] = 8
    (saved / CONFIG_FILENAME).write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"lstm\.weight_ih_l0.*\(512, 10\).*\(512, 8\)"):
        load_policy(saved)


def test_load_corrupt_weights(saved: Path) -> None:
    (saved / WEIGHTS_FILENAME).write_bytes(b"\x00garbage" * 4)
    with pytest.raises(ValueError, match=r"policy\.safetensors"):
        load_policy(saved)



def test_folded_input_scaling_gives_the_scaled_networks_logits() -> None:
    torch.manual_seed(3)
    policy = StopPolicy(PolicyConfig(state_size=6)).eval()
    states = torch.randn(4, 5, 6) * 4.0 - 10.0
    mean, std = torch.randn(6), torch.rand(6) + 0.3
    expected = policy((states - mean) / std)
    folded = policy.fold_input_scaling(mean, std)
    assert folded is policy
    torch.testing.assert_close(policy(states), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positive std"):
        policy.fold_input_scaling(mean, torch.zeros(6))
