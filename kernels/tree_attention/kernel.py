"""Triton kernel of paged tree attention (verification pass).

Grid: (num_query_tiles * num_splits, batch, num_kv_heads). A query tile holds BLOCK_M rows,
each a (tree node, query head) pair of one KV-head group, so every key/value tile loaded from the
cache serves all query heads of its group (GQA). Keys and values are read token by token through
the block table (any cache block size). Online softmax in base 2 with float32 accumulation.

With num_splits > 1 (flash-decoding style, for small batches with long contexts) split s covers
context positions [s * split_len, (s + 1) * split_len) and the last split also the tree part;
each split writes unnormalised partial results that ``_merge_splits_kernel`` combines.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreter_enabled

BLOCK_N = 64  # keys per inner iteration
LOG2_E = 1.4426950408889634


@triton.jit
def _attend_tile(
    b_q, acc, m_i, l_i, b_k, b_v, allowed, scale_log2,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay at zero
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _tree_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, page, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, page, num_kv_heads, head_dim]
    block_table_ptr,  # [batch, max_blocks] int32
    context_lens_ptr,  # [batch] int32
    cu_ptr,  # [batch + 1] int32
    bits_ptr,  # [batch, max_nodes, NUM_WORDS] int64
    out_ptr,  # [num_tokens, num_heads, head_dim] (when NUM_SPLITS == 1)
    part_acc_ptr,  # [NUM_SPLITS, num_tokens, num_heads, HEAD_DIM] float32 (when NUM_SPLITS > 1)
    part_m_ptr,  # [NUM_SPLITS, num_tokens, num_heads] float32, base-2 running max
    part_l_ptr,  # [NUM_SPLITS, num_tokens, num_heads] float32, running sum
    scale_log2,
    num_tokens,
    max_nodes,
    split_len,  # context positions per split (a multiple of BLOCK_N)
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr,
    NUM_WORDS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0) // NUM_SPLITS
    split = tl.program_id(0) % NUM_SPLITS
    b = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_ptr + b).to(tl.int64)
    n = tl.minimum((tl.load(cu_ptr + b + 1) - q_start).to(tl.int32), max_nodes)  # never read past the bitmask
    if tile * BLOCK_M >= n * GROUP:
        return
    context = tl.load(context_lens_ptr + b).to(tl.int32)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    node = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    m_rows = node < n
    d = tl.arange(0, D_PAD)
    m_d = d < HEAD_DIM
    token = q_start + node.to(tl.int64)  # [BLOCK_M]
    p_q = q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    b_q = tl.load(p_q, mask=m_rows[:, None] & m_d[None, :], other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_KV)
    kv_head_k = kv_head.to(tl.int64) * stride_kh
    kv_head_v = kv_head.to(tl.int64) * stride_vh

    # context: every tree node sees all of it
    lo = split * split_len
    # the last split takes any remainder, so a low split_len costs speed, never correctness
    hi = tl.where(split == NUM_SPLITS - 1, context, tl.minimum(lo + split_len, context))
    for start in range(lo, hi, BLOCK_KV):
        pos = start + cols
        m_pos = pos < hi
        page = tl.load(block_table_ptr + b * stride_bt + pos // PAGE, mask=m_pos, other=0).to(tl.int64)
        slot = pos % PAGE
        b_k = tl.load(
            k_cache_ptr + page[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head_k + d[None, :],
            mask=m_pos[:, None] & m_d[None, :], other=0.0,
        )
        b_v = tl.load(
            v_cache_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head_v + d[None, :],
            mask=m_pos[:, None] & m_d[None, :], other=0.0,
        )
        acc, m_i, l_i = _attend_tile(b_q, acc, m_i, l_i, b_k, b_v, m_pos[None, :], scale_log2, UPCAST, DOT_PRECISION)

    # tree part: node j's entries sit at position context + j; row i sees j when bit j is set
    if split == NUM_SPLITS - 1:
        p_bits_row = bits_ptr + (b * max_nodes + node.to(tl.int64)) * NUM_WORDS  # [BLOCK_M]
        for start in range(0, n, BLOCK_KV):
            j = start + cols
            m_j = j < n
            pos = context + j
            page = tl.load(block_table_ptr + b * stride_bt + pos // PAGE, mask=m_j, other=0).to(tl.int64)
            slot = pos % PAGE
            b_k = tl.load(
                k_cache_ptr + page[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head_k + d[None, :],
                mask=m_j[:, None] & m_d[None, :], other=0.0,
            )
            b_v = tl.load(
                v_cache_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head_v + d[None, :],
                mask=m_j[:, None] & m_d[None, :], other=0.0,
            )
            m_pair = m_rows[:, None] & m_j[None, :]
            word = tl.load(p_bits_row[:, None] + (j // 64)[None, :], mask=m_pair, other=0)  # [BLOCK_M, BLOCK_KV]
            allowed = m_pair & (((word >> (j % 64).to(tl.int64)[None, :]) & 1) != 0)
            acc, m_i, l_i = _attend_tile(b_q, acc, m_i, l_i, b_k, b_v, allowed, scale_log2, UPCAST, DOT_PRECISION)

    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        b_o = acc / l_safe[:, None]
        p_o = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(p_o, b_o.to(out_ptr.dtype.element_ty), mask=m_rows[:, None] & m_d[None, :])
    else:
        row_index = (split * num_tokens + token) * NUM_HEADS + head  # [BLOCK_M]
        tl.store(part_m_ptr + row_index, m_i, mask=m_rows)
        tl.store(part_l_ptr + row_index, l_i, mask=m_rows)
        p_acc = part_acc_ptr + row_index[:, None] * HEAD_DIM + d[None, :]
        tl.store(p_acc, acc, mask=m_rows[:, None] & m_d[None, :])


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr,  # [NUM_SPLITS, num_tokens, NUM_HEADS, HEAD_DIM] float32
    part_m_ptr,  # [NUM_SPLITS, num_tokens, NUM_HEADS] float32
    part_l_ptr,  # [NUM_SPLITS, num_tokens, NUM_HEADS] float32
    out_ptr,  # [num_tokens, NUM_HEADS, HEAD_DIM]
    num_tokens,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    m_s = s < NUM_SPLITS
    d = tl.arange(0, D_PAD)
    m_d = d < HEAD_DIM
    row_index = (s * num_tokens + token) * NUM_HEADS + head  # [SPLITS_PAD]
    m_part = tl.load(part_m_ptr + row_index, mask=m_s, other=float("-inf"))
    l_part = tl.load(part_l_ptr + row_index, mask=m_s, other=0.0)
    m_all = tl.max(m_part, axis=0)
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
    weight = tl.exp2(m_part - m_use)  # [SPLITS_PAD]
    l_all = tl.sum(l_part * weight, axis=0)
    p_acc = part_acc_ptr + row_index[:, None] * HEAD_DIM + d[None, :]
    b_acc = tl.load(p_acc, mask=m_s[:, None] & m_d[None, :], other=0.0)  # [SPLITS_PAD, D_PAD]
    b_o = tl.sum(b_acc * weight[:, None], axis=0) / tl.where(l_all == 0.0, 1.0, l_all)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, b_o.to(out_ptr.dtype.element_ty), mask=m_d)


def tree_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    cu_num_nodes: torch.Tensor,
    ancestor_bits: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_splits: int = 1,
    max_context_len: int = 0,
) -> None:
    """Launch paged tree attention (arguments as ``radar_vllm.kernels.tree_attention``)."""
    num_tokens, num_heads, head_dim = query.shape
    batch = context_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    max_nodes, num_words = ancestor_bits.shape[1], ancestor_bits.shape[2]
    block_m = 64 if max_nodes * group > 16 else 16
    num_tiles = triton.cdiv(max_nodes * group, block_m)
    upcast = interpreter_enabled() and query.dtype == torch.bfloat16  # the interpreter has no bfloat16 arithmetic
    precision = "ieee" if (query.dtype == torch.float32 or upcast) else None
    split_len = triton.cdiv(triton.cdiv(max(max_context_len, 1), num_splits), BLOCK_N) * BLOCK_N
    if num_splits > 1:
        part_acc = torch.empty(num_splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=query.device)
        part_m = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out
    _tree_attention_kernel[(num_tiles * num_splits, batch, num_kv_heads)](
        query, key_cache, value_cache, block_table, context_lens, cu_num_nodes, ancestor_bits, out,
        part_acc, part_m, part_l,
        scale * LOG2_E,
        num_tokens,
        max_nodes,
        split_len,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        out.stride(0), out.stride(1),
        NUM_HEADS=num_heads,
        NUM_WORDS=num_words,
        GROUP=group,
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
        PAGE=key_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_KV=BLOCK_N,
        NUM_SPLITS=num_splits,
        UPCAST=upcast,
        DOT_PRECISION=precision,
        num_warps=8 if head_dim >= 128 else 4,
        num_stages=2,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_acc, part_m, part_l, out,
            num_tokens,
            out.stride(0), out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            D_PAD=triton.next_power_of_2(head_dim),
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
