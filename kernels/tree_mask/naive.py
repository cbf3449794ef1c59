"""Torch reference of the tree-mask kernel (also the CPU fallback)."""
from __future__ import annotations

import torch

from .layout import BITS_PER_WORD, NO_PARENT


def tree_mask_reference(
    parents: torch.Tensor,  # [batch, max_nodes] int32/int64
    num_nodes: torch.Tensor,  # [batch] int32/int64
    ancestor_bits: torch.Tensor,  # [batch, max_nodes, num_words] int64 (output)
    depth: torch.Tensor,  # [batch, max_nodes] int32 (output)
    dense_mask: torch.Tensor | None = None,  # [batch, max_nodes, max_nodes] bool (output)
) -> None:
    """Same contract as the Triton kernel; loops over tree depth, not over nodes."""
    batch, max_nodes = parents.shape
    num_words = ancestor_bits.shape[2]
    device = parents.device
    node = torch.arange(max_nodes, device=device)  # [max_nodes]
    valid = node[None, :] < num_nodes[:, None].long()  # [batch, max_nodes]
    parent = parents.long()
    # a parent must precede its child; anything else counts as a child of the root
    parent = torch.where(valid & (parent >= 0) & (parent < node[None, :]), parent, NO_PARENT)
    width = num_words * BITS_PER_WORD
    # one spare column past the packed width absorbs the writes of finished chains
    relation = torch.zeros(batch, max_nodes, width + 1, dtype=torch.bool, device=device)
    relation[:, node, node] = valid  # every node sees itself
    node_depth = torch.zeros(batch, max_nodes, dtype=torch.int32, device=device)
    current = torch.where(valid, node[None, :].expand(batch, -1), NO_PARENT)  # [batch, max_nodes]
    live = valid
    while bool(live.any()):
        node_depth += live.to(torch.int32)
        up = torch.gather(parent, 1, current.clamp(min=0))
        live = live & (up >= 0)
        current = torch.where(live, up, NO_PARENT)
        relation.scatter_(2, torch.where(live, current, width).unsqueeze(2), True)
    relation = relation[:, :, :width]
    weights = torch.ones(BITS_PER_WORD, dtype=torch.int64, device=device) << torch.arange(
        BITS_PER_WORD, dtype=torch.int64, device=device
    )  # [64]; the last one is the sign bit
    words = (relation.view(batch, max_nodes, num_words, BITS_PER_WORD).long() * weights).sum(-1)
    ancestor_bits.copy_(words)
    depth.copy_(node_depth)
    if dense_mask is not None:
        dense_mask.copy_(relation[:, :, :max_nodes])
