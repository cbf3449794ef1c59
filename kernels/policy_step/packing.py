"""Stop-policy weights prepacked once for the fused policy step.

The layout is shared by the Triton kernel and the torch reference. Every matrix is stored
transposed (input dimension first) and zero-padded to power-of-two sizes of at least 16, so that
the kernel can multiply whole tiles without masks: padded rows and columns are zero and add
nothing. The LSTM gates keep PyTorch's order (input, forget, cell, output).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_LSTM_GATES = 4
MIN_TILE = 16  # smallest tile edge a Triton matrix product accepts


def padded_size(size: int) -> int:
    """The power of two >= max(size, 16) used to pad a weight dimension."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return max(MIN_TILE, 1 << (size - 1).bit_length())


@dataclass(frozen=True)
class PolicyStepWeights:
    """Stop-policy weights in the fused-step layout (float32, contiguous, on one device)."""

    state_size: int
    lstm_hidden: int
    mlp_hidden: int
    # [4, state_pad, hidden_pad]: gate g of x @ W_ih^T is state @ gate_state[g]
    gate_state: torch.Tensor
    # [4, hidden_pad, hidden_pad]: gate g of h @ W_hh^T is hidden @ gate_hidden[g]
    gate_hidden: torch.Tensor
    # [4, hidden_pad]: b_ih + b_hh per gate
    gate_bias: torch.Tensor
    # [hidden_pad, mlp_pad]: first MLP layer, columns fed by the LSTM output
    mlp_hidden_weight: torch.Tensor
    # [state_pad, mlp_pad]: first MLP layer, columns fed by the state
    mlp_state_weight: torch.Tensor
    # [mlp_pad]
    mlp_bias: torch.Tensor
    # [mlp_pad]: output row (continue) minus output row (stop); the continue probability is
    # sigmoid(relu(...) @ logit_diff_weight + logit_diff_bias) = softmax(logits)[continue]
    logit_diff_weight: torch.Tensor
    # [1]
    logit_diff_bias: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.gate_state.device

    @property
    def state_pad(self) -> int:
        return self.gate_state.shape[1]

    @property
    def hidden_pad(self) -> int:
        return self.gate_hidden.shape[1]

    @property
    def mlp_pad(self) -> int:
        return self.mlp_bias.shape[0]


def pack_policy_weights(
    weight_ih: torch.Tensor,  # [4 * hidden, state]
    weight_hh: torch.Tensor,  # [4 * hidden, hidden]
    bias_ih: torch.Tensor,  # [4 * hidden]
    bias_hh: torch.Tensor,  # [4 * hidden]
    mlp_weight: torch.Tensor,  # [mlp, hidden + state]; input is concat(lstm_out, state)
    mlp_bias: torch.Tensor,  # [mlp]
    out_weight: torch.Tensor,  # [2, mlp]; row 0 = stop, row 1 = continue
    out_bias: torch.Tensor,  # [2]
    device: torch.device | str | None = None,
) -> PolicyStepWeights:
    """Repack the stop-policy tensors (PyTorch LSTM + two linear layers) for the fused step."""
    gates_rows, state_size = weight_ih.shape
    if gates_rows % NUM_LSTM_GATES != 0:
        raise ValueError(f"weight_ih must have 4 * hidden rows, got shape {tuple(weight_ih.shape)}")
    hidden = gates_rows // NUM_LSTM_GATES
    mlp = mlp_weight.shape[0]
    expected = {
        "weight_hh": (weight_hh, (4 * hidden, hidden)),
        "bias_ih": (bias_ih, (4 * hidden,)),
        "bias_hh": (bias_hh, (4 * hidden,)),
        "mlp_weight": (mlp_weight, (mlp, hidden + state_size)),
        "mlp_bias": (mlp_bias, (mlp,)),
        "out_weight": (out_weight, (2, mlp)),
        "out_bias": (out_bias, (2,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    device = torch.device(device) if device is not None else weight_ih.device
    s_pad, h_pad, m_pad = padded_size(state_size), padded_size(hidden), padded_size(mlp)

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=torch.float32)

    gate_state = torch.zeros(NUM_LSTM_GATES, s_pad, h_pad, device=device)
    gate_state[:, :state_size, :hidden] = f32(weight_ih).view(NUM_LSTM_GATES, hidden, state_size).transpose(1, 2)
    gate_hidden = torch.zeros(NUM_LSTM_GATES, h_pad, h_pad, device=device)
    gate_hidden[:, :hidden, :hidden] = f32(weight_hh).view(NUM_LSTM_GATES, hidden, hidden).transpose(1, 2)
    gate_bias = torch.zeros(NUM_LSTM_GATES, h_pad, device=device)
    gate_bias[:, :hidden] = (f32(bias_ih) + f32(bias_hh)).view(NUM_LSTM_GATES, hidden)
    w1 = f32(mlp_weight)
    mlp_hidden_weight = torch.zeros(h_pad, m_pad, device=device)
    mlp_hidden_weight[:hidden, :mlp] = w1[:, :hidden].t()
    mlp_state_weight = torch.zeros(s_pad, m_pad, device=device)
    mlp_state_weight[:state_size, :mlp] = w1[:, hidden:].t()
    b1 = torch.zeros(m_pad, device=device)
    b1[:mlp] = f32(mlp_bias)
    w2 = f32(out_weight)
    logit_diff_weight = torch.zeros(m_pad, device=device)
    logit_diff_weight[:mlp] = w2[1] - w2[0]
    b2 = f32(out_bias)
    logit_diff_bias = (b2[1] - b2[0]).reshape(1).clone()
    return PolicyStepWeights(
        state_size=state_size,
        lstm_hidden=hidden,
        mlp_hidden=mlp,
        gate_state=gate_state.contiguous(),
        gate_hidden=gate_hidden.contiguous(),
        gate_bias=gate_bias.contiguous(),
        mlp_hidden_weight=mlp_hidden_weight.contiguous(),
        mlp_state_weight=mlp_state_weight.contiguous(),
        mlp_bias=b1,
        logit_diff_weight=logit_diff_weight,
        logit_diff_bias=logit_diff_bias,
    )
