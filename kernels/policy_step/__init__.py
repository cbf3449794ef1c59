"""Fused stop-policy step: LSTM cell, MLP head, softmax and continue flag in one launch.

``policy_step`` updates the recurrent state ``hidden``/``cell`` in place and writes the
continue probability and the continue flag of every request to device memory, so a draft loop
never waits for the host. Threshold mode (``uniform=None``): continue when
P(continue) >= threshold. Sampled mode: continue when uniform[b] < P(continue), with the uniform
numbers drawn on the device by the caller. Rows with ``active[b] = False`` never continue.
"""
from __future__ import annotations

import torch

from ..dispatch import use_triton
from .naive import policy_step_reference
from .packing import PolicyStepWeights, pack_policy_weights, padded_size

__all__ = ["PolicyStepWeights", "pack_policy_weights", "padded_size", "policy_step", "policy_step_reference"]


def _check_args(
    state: torch.Tensor,
    hidden: torch.Tensor,
    cell: torch.Tensor,
    weights: PolicyStepWeights,
    uniform: torch.Tensor | None,
    p_continue: torch.Tensor,
    continue_flags: torch.Tensor,
    active: torch.Tensor | None,
) -> None:
    batch = state.shape[0]
    if state.dim() != 2 or state.shape[1] != weights.state_size:
        raise ValueError(f"state must have shape [batch, {weights.state_size}], got {tuple(state.shape)}")
    for name, tensor in (("hidden", hidden), ("cell", cell)):
        if tuple(tensor.shape) != (batch, weights.lstm_hidden) or tensor.dtype != torch.float32:
            raise ValueError(
                f"{name} must be float32 of shape {(batch, weights.lstm_hidden)}, "
                f"got {tensor.dtype} {tuple(tensor.shape)}"
            )
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    for name, tensor, dtype in (
        ("uniform", uniform, torch.float32),
        ("p_continue", p_continue, torch.float32),
        ("continue_flags", continue_flags, torch.bool),
        ("active", active, torch.bool),
    ):
        if tensor is not None and (tuple(tensor.shape) != (batch,) or tensor.dtype != dtype):
            raise ValueError(f"{name} must be {dtype} of shape ({batch},), got {tensor.dtype} {tuple(tensor.shape)}")


def policy_step(
    state: torch.Tensor,  # [batch, state_size] float32
    hidden: torch.Tensor,  # [batch, lstm_hidden] float32, updated in place
    cell: torch.Tensor,  # [batch, lstm_hidden] float32, updated in place
    weights: PolicyStepWeights,
    threshold: float,
    uniform: torch.Tensor | None,  # [batch] float32 in [0, 1): sampled mode; None: threshold mode
    p_continue: torch.Tensor,  # [batch] float32 (output)
    continue_flags: torch.Tensor,  # [batch] bool (output)
    active: torch.Tensor | None = None,  # [batch] bool; inactive rows never continue
) -> None:
    """Run one stop-policy step for a batch on the device (Triton on CUDA, torch elsewhere)."""
    _check_args(state, hidden, cell, weights, uniform, p_continue, continue_flags, active)
    if use_triton(state, hidden, cell, weights.gate_state, uniform, p_continue, continue_flags, active):
        from .kernel import policy_step_triton

        policy_step_triton(state, hidden, cell, weights, threshold, uniform, p_continue, continue_flags, active)
    else:
        policy_step_reference(state, hidden, cell, weights, threshold, uniform, p_continue, continue_flags, active)
