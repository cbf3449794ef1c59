"""Triton kernel of the tree mask: ancestor bitmasks, depths and optional dense mask.

Grid: (batch, cdiv(max_nodes, BLOCK_ROWS)). Each program walks the parent chains of its rows
up to the root together, one level per iteration, setting one bit per row and level; the loop
ends when every chain reached the root, so it runs (tree depth) iterations. A parent index that
does not precede its child is treated as NO_PARENT, so every chain strictly decreases and the
walk always ends.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 32  # node rows per program


@triton.jit
def _tree_mask_kernel(
    parents_ptr,  # [batch, max_nodes] int32/int64
    num_nodes_ptr,  # [batch]
    bits_ptr,  # [batch, max_nodes, NUM_WORDS] int64 (output)
    depth_ptr,  # [batch, max_nodes] int32 (output)
    dense_ptr,  # [batch, max_nodes, max_nodes] bool (output, when WRITE_DENSE)
    max_nodes,
    stride_parents_b,
    NUM_WORDS: tl.constexpr,
    WORDS_PAD: tl.constexpr,
    NODES_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    WRITE_DENSE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    n = tl.load(num_nodes_ptr + b).to(tl.int32)
    in_range = rows < max_nodes
    valid = (rows < n) & in_range
    words = tl.arange(0, WORDS_PAD)  # [WORDS_PAD]
    one = tl.full([BLOCK, WORDS_PAD], 1, tl.int64)

    current = tl.where(valid, rows, -1)
    live = valid
    depth = tl.zeros([BLOCK], dtype=tl.int32)
    b_bits = tl.where(
        (words[None, :] == (rows // 64)[:, None]) & valid[:, None], one << (rows % 64).to(tl.int64)[:, None], 0
    )  # [BLOCK, WORDS_PAD]
    if WRITE_DENSE:
        cols = tl.arange(0, NODES_PAD)
        b_dense = (cols[None, :] == rows[:, None]) & valid[:, None]  # [BLOCK, NODES_PAD]
    go = tl.max(live.to(tl.int32), axis=0)
    while go > 0:
        depth += live.to(tl.int32)
        up = tl.load(parents_ptr + b * stride_parents_b + current, mask=live, other=-1).to(tl.int32)
        live = live & (up >= 0) & (up < current)
        current = tl.where(live, up, -1)
        hit = (words[None, :] == (current // 64)[:, None]) & live[:, None]
        b_bits = b_bits | tl.where(hit, one << (current % 64).to(tl.int64)[:, None], 0)
        if WRITE_DENSE:
            b_dense = b_dense | ((cols[None, :] == current[:, None]) & live[:, None])
        go = tl.max(live.to(tl.int32), axis=0)

    rows64 = rows.to(tl.int64)
    p_bits = bits_ptr + (b * max_nodes + rows64)[:, None] * NUM_WORDS + words[None, :]
    tl.store(p_bits, b_bits, mask=in_range[:, None] & (words[None, :] < NUM_WORDS))
    tl.store(depth_ptr + b * max_nodes + rows64, depth, mask=in_range)
    if WRITE_DENSE:
        p_dense = dense_ptr + (b * max_nodes + rows64)[:, None] * max_nodes + cols[None, :]
        tl.store(p_dense, b_dense, mask=in_range[:, None] & (cols[None, :] < max_nodes))


def tree_mask_triton(
    parents: torch.Tensor,
    num_nodes: torch.Tensor,
    ancestor_bits: torch.Tensor,
    depth: torch.Tensor,
    dense_mask: torch.Tensor | None = None,
) -> None:
    """Launch the tree-mask kernel (arguments as ``radar_vllm.kernels.tree_mask``)."""
    batch, max_nodes = parents.shape
    if batch == 0:
        return
    num_words = ancestor_bits.shape[2]
    grid = (batch, triton.cdiv(max_nodes, BLOCK_ROWS))
    _tree_mask_kernel[grid](
        parents,
        num_nodes,
        ancestor_bits,
        depth,
        dense_mask if dense_mask is not None else depth,
        max_nodes,
        parents.stride(0),
        NUM_WORDS=num_words,
        WORDS_PAD=triton.next_power_of_2(num_words),
        NODES_PAD=triton.next_power_of_2(max_nodes),
        BLOCK=BLOCK_ROWS,
        WRITE_DENSE=dense_mask is not None,
        num_warps=4,
    )
