"""Triton kernel of the fused stop-policy step.

One program handles ``BLOCK_B`` requests: the four LSTM gates as tile products of the state and
the previous hidden state with the prepacked gate matrices (TF32x3 tensor-core products), the cell update, the MLP head, the
continue probability and the decision. ``hidden``/``cell`` rows are read before they are
overwritten by the same program, so the in-place update is safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packing import PolicyStepWeights

BLOCK_B = 16  # requests per program; also the smallest tile a matrix product accepts
# Three TF32 tensor-core products per float32 product: float32-level accuracy (so decisions match
# the float32 torch policy) at tensor-core speed; plain "ieee" products run on the FMA units and
# take several times longer for the 128x128 recurrent matrix.
DOT_PRECISION = "tf32x3"


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _policy_step_kernel(
    state_ptr,  # [batch, STATE_SIZE] float32
    hidden_ptr,  # [batch, HIDDEN] float32 (in/out)
    cell_ptr,  # [batch, HIDDEN] float32 (in/out)
    gate_state_ptr,  # [4, S_PAD, H_PAD]
    gate_hidden_ptr,  # [4, H_PAD, H_PAD]
    gate_bias_ptr,  # [4, H_PAD]
    mlp_hidden_w_ptr,  # [H_PAD, M_PAD]
    mlp_state_w_ptr,  # [S_PAD, M_PAD]
    mlp_bias_ptr,  # [M_PAD]
    diff_w_ptr,  # [M_PAD]
    diff_b_ptr,  # [1]
    uniform_ptr,  # [batch] float32 (read when SAMPLED)
    active_ptr,  # [batch] bool (read when HAS_ACTIVE)
    p_out_ptr,  # [batch] float32 (output)
    flag_out_ptr,  # [batch] bool (output)
    batch,
    threshold,
    STATE_SIZE: tl.constexpr,
    HIDDEN: tl.constexpr,
    S_PAD: tl.constexpr,
    H_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    SAMPLED: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_rows = rows < batch
    rows64 = rows.to(tl.int64)
    s_idx = tl.arange(0, S_PAD)
    h_idx = tl.arange(0, H_PAD)
    m_idx = tl.arange(0, M_PAD)

    m_state = m_rows[:, None] & (s_idx[None, :] < STATE_SIZE)
    b_x = tl.load(state_ptr + rows64[:, None] * STATE_SIZE + s_idx[None, :], mask=m_state, other=0.0)
    m_hid = m_rows[:, None] & (h_idx[None, :] < HIDDEN)
    p_hid = rows64[:, None] * HIDDEN + h_idx[None, :]
    b_h = tl.load(hidden_ptr + p_hid, mask=m_hid, other=0.0)
    b_c = tl.load(cell_ptr + p_hid, mask=m_hid, other=0.0)

    off_sh = s_idx[:, None] * H_PAD + h_idx[None, :]
    off_hh = h_idx[:, None] * H_PAD + h_idx[None, :]
    # gates in PyTorch order: input, forget, cell candidate, output
    g_in = tl.dot(b_x, tl.load(gate_state_ptr + off_sh), input_precision=DOT_PRECISION)
    g_in += tl.dot(b_h, tl.load(gate_hidden_ptr + off_hh), input_precision=DOT_PRECISION)
    g_in += tl.load(gate_bias_ptr + h_idx)[None, :]
    g_fg = tl.dot(b_x, tl.load(gate_state_ptr + S_PAD * H_PAD + off_sh), input_precision=DOT_PRECISION)
    g_fg += tl.dot(b_h, tl.load(gate_hidden_ptr + H_PAD * H_PAD + off_hh), input_precision=DOT_PRECISION)
    g_fg += tl.load(gate_bias_ptr + H_PAD + h_idx)[None, :]
    g_cc = tl.dot(b_x, tl.load(gate_state_ptr + 2 * S_PAD * H_PAD + off_sh), input_precision=DOT_PRECISION)
    g_cc += tl.dot(b_h, tl.load(gate_hidden_ptr + 2 * H_PAD * H_PAD + off_hh), input_precision=DOT_PRECISION)
    g_cc += tl.load(gate_bias_ptr + 2 * H_PAD + h_idx)[None, :]
    g_out = tl.dot(b_x, tl.load(gate_state_ptr + 3 * S_PAD * H_PAD + off_sh), input_precision=DOT_PRECISION)
    g_out += tl.dot(b_h, tl.load(gate_hidden_ptr + 3 * H_PAD * H_PAD + off_hh), input_precision=DOT_PRECISION)
    g_out += tl.load(gate_bias_ptr + 3 * H_PAD + h_idx)[None, :]

    b_c_new = tl.sigmoid(g_fg) * b_c + tl.sigmoid(g_in) * _tanh(g_cc)  # [BLOCK, H_PAD]
    b_h_new = tl.sigmoid(g_out) * _tanh(b_c_new)  # [BLOCK, H_PAD]
    tl.store(hidden_ptr + p_hid, b_h_new, mask=m_hid)
    tl.store(cell_ptr + p_hid, b_c_new, mask=m_hid)

    off_hm = h_idx[:, None] * M_PAD + m_idx[None, :]
    off_sm = s_idx[:, None] * M_PAD + m_idx[None, :]
    b_z = tl.dot(b_h_new, tl.load(mlp_hidden_w_ptr + off_hm), input_precision=DOT_PRECISION)
    b_z += tl.dot(b_x, tl.load(mlp_state_w_ptr + off_sm), input_precision=DOT_PRECISION)
    b_z = tl.maximum(b_z + tl.load(mlp_bias_ptr + m_idx)[None, :], 0.0)  # [BLOCK, M_PAD]
    logit_diff = tl.sum(b_z * tl.load(diff_w_ptr + m_idx)[None, :], axis=1) + tl.load(diff_b_ptr)
    prob = tl.sigmoid(logit_diff)  # [BLOCK] = softmax(logits)[continue]
    if SAMPLED:
        decision = tl.load(uniform_ptr + rows64, mask=m_rows, other=1.0) < prob
    else:
        decision = prob >= threshold
    if HAS_ACTIVE:
        decision = decision & (tl.load(active_ptr + rows64, mask=m_rows, other=0) != 0)
    tl.store(p_out_ptr + rows64, prob, mask=m_rows)
    tl.store(flag_out_ptr + rows64, decision, mask=m_rows)


def policy_step_triton(
    state: torch.Tensor,
    hidden: torch.Tensor,
    cell: torch.Tensor,
    weights: PolicyStepWeights,
    threshold: float,
    uniform: torch.Tensor | None,
    p_continue: torch.Tensor,
    continue_flags: torch.Tensor,
    active: torch.Tensor | None = None,
) -> None:
    """Launch the fused step (arguments as ``radar_vllm.kernels.policy_step``)."""
    batch = state.shape[0]
    if batch == 0:
        return
    state = state.to(torch.float32).contiguous()
    grid = (triton.cdiv(batch, BLOCK_B),)
    _policy_step_kernel[grid](
        state,
        hidden,
        cell,
        weights.gate_state,
        weights.gate_hidden,
        weights.gate_bias,
        weights.mlp_hidden_weight,
        weights.mlp_state_weight,
        weights.mlp_bias,
        weights.logit_diff_weight,
        weights.logit_diff_bias,
        uniform if uniform is not None else p_continue,
        active if active is not None else continue_flags,
        p_continue,
        continue_flags,
        batch,
        float(threshold),
        STATE_SIZE=weights.state_size,
        HIDDEN=weights.lstm_hidden,
        S_PAD=weights.state_pad,
        H_PAD=weights.hidden_pad,
        M_PAD=weights.mlp_pad,
        BLOCK=BLOCK_B,
        SAMPLED=uniform is not None,
        HAS_ACTIVE=active is not None,
        DOT_PRECISION=DOT_PRECISION,
        num_warps=4,
    )
