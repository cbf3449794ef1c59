"""Fused policy-step kernel: Triton (interpreter on CPU) against the torch reference and nn.LSTM."""
from __future__ import annotations

import pytest
import torch

from radar_vllm.kernels.dispatch import force_backend, interpreter_enabled
from radar_vllm.kernels.policy_step import PolicyStepWeights, pack_policy_weights, policy_step
from radar_vllm.kernels.fixtures import TOLERANCES
from radar_vllm.core.policy import PolicyConfig, StopPolicy, continue_probability

ATOL, RTOL = TOLERANCES[torch.float32]

# Triton runs on CPU tensors only in its interpreter; tests/run.sh sets TRITON_INTERPRET=1.
pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1")


def make_inputs(
    config: PolicyConfig, batch: int, seed: int
) -> tuple[StopPolicy, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    policy = StopPolicy(config).eval()
    g = torch.Generator().manual_seed(seed + 100)
    state = policy.features(-torch.rand(batch, config.state_size, generator=g) * 15.0)
    hidden = torch.randn(batch, config.lstm_hidden, generator=g) * 0.5
    cell = torch.randn(batch, config.lstm_hidden, generator=g)
    return policy, state, hidden, cell


def run(
    backend: str,
    weights: PolicyStepWeights,
    state: torch.Tensor,
    hidden: torch.Tensor,
    cell: torch.Tensor,
    threshold: float,
    uniform: torch.Tensor | None,
    active: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = state.shape[0]
    h, c = hidden.clone(), cell.clone()
    p = torch.full((batch,), float("nan"))
    flags = torch.arange(batch) % 2 == 0  # poison: a fixed pattern the result must overwrite
    with force_backend(backend):
        policy_step(state, h, c, weights, threshold, uniform, p, flags, active)
    return h, c, p, flags


@pytest.mark.parametrize(
    "config, batch, sampled, with_active",
    [
        (PolicyConfig(), 1, False, False),
        (PolicyConfig(), 37, True, True),  # ragged: crosses program blocks
        (PolicyConfig(state_size=7, lstm_hidden=20, mlp_hidden=33), 16, False, True),  # padded weights
        (PolicyConfig(state_size=3, lstm_hidden=8, mlp_hidden=5), 5, True, False),
    ],
)
def test_triton_matches_reference(config: PolicyConfig, batch: int, sampled: bool, with_active: bool) -> None:
    policy, state, hidden, cell = make_inputs(config, batch, seed=batch)
    weights = policy.packed_weights()
    g = torch.Generator().manual_seed(7)
    uniform = torch.rand(batch, generator=g) if sampled else None
    active = torch.rand(batch, generator=g) < 0.7 if with_active else None
    with torch.no_grad():
        logits, _ = policy.step(state, (hidden, cell))
    threshold = float(continue_probability(logits).median())
    ref = run("torch", weights, state, hidden, cell, threshold, uniform, active)
    tri = run("triton", weights, state, hidden, cell, threshold, uniform, active)
    for name, a, b in zip(("hidden", "cell", "p_continue"), tri[:3], ref[:3]):
        assert not bool(a.isnan().any()), name
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=name)
    probability = ref[2]
    decisive = (probability - (uniform if sampled else threshold)).abs() > 1e-5
    assert torch.equal(tri[3][decisive], ref[3][decisive])
    expected = (uniform < probability) if sampled else (probability >= threshold)
    if active is not None:
        expected = expected & active
    assert torch.equal(ref[3], expected)


def test_reference_matches_torch_lstm_policy() -> None:
    policy, state, hidden, cell = make_inputs(PolicyConfig(), 9, seed=3)
    with torch.no_grad():
        logits, (h_expected, c_expected) = policy.step(state, (hidden, cell))
    h, c, p, _ = run("torch", policy.packed_weights(), state, hidden, cell, 0.5, None, None)
    torch.testing.assert_close(h, h_expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(c, c_expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(p, continue_probability(logits), atol=ATOL, rtol=RTOL)


def test_packing_rejects_bad_shapes() -> None:
    policy = StopPolicy()
    lstm = policy.lstm
    with pytest.raises(ValueError, match="weight_hh"):
        pack_policy_weights(
            lstm.weight_ih_l0, lstm.weight_hh_l0[:, :5], lstm.bias_ih_l0, lstm.bias_hh_l0,
            policy.mlp_in.weight, policy.mlp_in.bias, policy.mlp_out.weight, policy.mlp_out.bias,
        )


def test_launcher_rejects_bad_buffers() -> None:
    policy, state, hidden, cell = make_inputs(PolicyConfig(), 4, seed=1)
    weights = policy.packed_weights()
    p = torch.empty(4)
    flags = torch.empty(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="hidden"):
        policy_step(state, hidden.double(), cell, weights, 0.5, None, p, flags)
    with pytest.raises(ValueError, match="continue_flags"):
        policy_step(state, hidden, cell, weights, 0.5, None, p, flags.int())
    with pytest.raises(ValueError, match="state"):
        policy_step(state[:, :5], hidden, cell, weights, 0.5, None, p, flags)
