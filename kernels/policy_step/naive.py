"""Torch reference of the fused stop-policy step (also the CPU fallback)."""
from __future__ import annotations

import torch

from .packing import PolicyStepWeights


def policy_step_reference(
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
    """One policy step for a batch; same contract as the Triton launcher."""
    s, h, m = weights.state_size, weights.lstm_hidden, weights.mlp_hidden
    x = state.float()
    gates = [
        x @ weights.gate_state[g, :s, :h] + hidden @ weights.gate_hidden[g, :h, :h] + weights.gate_bias[g, :h]
        for g in range(4)
    ]
    input_gate = torch.sigmoid(gates[0])
    forget_gate = torch.sigmoid(gates[1])
    cell_candidate = torch.tanh(gates[2])
    output_gate = torch.sigmoid(gates[3])
    new_cell = forget_gate * cell + input_gate * cell_candidate  # [batch, lstm_hidden]
    new_hidden = output_gate * torch.tanh(new_cell)  # [batch, lstm_hidden]
    mlp_out = torch.relu(
        new_hidden @ weights.mlp_hidden_weight[:h, :m] + x @ weights.mlp_state_weight[:s, :m] + weights.mlp_bias[:m]
    )  # [batch, mlp_hidden]
    logit_diff = mlp_out @ weights.logit_diff_weight[:m] + weights.logit_diff_bias  # [batch]
    prob = torch.sigmoid(logit_diff)
    decision = (uniform < prob) if uniform is not None else (prob >= threshold)
    if active is not None:
        decision = decision & active
    hidden.copy_(new_hidden)
    cell.copy_(new_cell)
    p_continue.copy_(prob)
    continue_flags.copy_(decision)
