"""Tree mask: packed ancestor bitmasks, depths (RoPE offsets) and optional dense mask in one launch.

See ``layout.py`` for the node numbering and the bitmask format. Trees of up to
``MAX_TREE_NODES`` (256) nodes are supported.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..dispatch import use_triton
from .layout import BITS_PER_WORD, MAX_TREE_NODES, NO_PARENT, num_mask_words
from .naive import tree_mask_reference

__all__ = [
    "BITS_PER_WORD",
    "MAX_TREE_NODES",
    "NO_PARENT",
    "TreeMask",
    "check_tree_parents",
    "num_mask_words",
    "tree_mask",
    "tree_mask_reference",
    "unpack_ancestor_bits",
]


class TreeMask(NamedTuple):
    ancestor_bits: torch.Tensor  # [batch, max_nodes, num_words] int64
    depth: torch.Tensor  # [batch, max_nodes] int32; 0 on padding rows
    dense_mask: torch.Tensor | None  # [batch, max_nodes, max_nodes] bool, or None


def check_tree_parents(parents: torch.Tensor, num_nodes: torch.Tensor) -> None:
    """Raise ValueError unless every real node's parent is NO_PARENT or an earlier node.

    Synchronizes with the host; meant for tests and debugging, not the decode loop.
    """
    batch, max_nodes = parents.shape
    if tuple(num_nodes.shape) != (batch,):
        raise ValueError(f"num_nodes must have shape ({batch},), got {tuple(num_nodes.shape)}")
    if bool(((num_nodes < 0) | (num_nodes > max_nodes)).any()):
        raise ValueError(f"num_nodes must be in [0, {max_nodes}], got {num_nodes.tolist()}")
    node = torch.arange(max_nodes, device=parents.device)
    valid = node[None, :] < num_nodes[:, None]
    bad = valid & ((parents < NO_PARENT) | (parents >= node[None, :]))
    if bool(bad.any()):
        b, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"parents[{b}, {i}] = {int(parents[b, i])}: a parent must be {NO_PARENT} or an earlier node index"
        )


def unpack_ancestor_bits(ancestor_bits: torch.Tensor, max_nodes: int) -> torch.Tensor:
    """Dense bool ``[..., max_nodes]`` from packed rows ``[..., num_words]`` int64."""
    shifts = torch.arange(BITS_PER_WORD, device=ancestor_bits.device, dtype=torch.int64)
    bits = (ancestor_bits.unsqueeze(-1) >> shifts) & 1  # [..., num_words, 64]
    return bits.flatten(-2)[..., :max_nodes].bool()


def tree_mask(
    parents: torch.Tensor,  # [batch, max_nodes] int32/int64
    num_nodes: torch.Tensor,  # [batch] int32/int64
    build_dense: bool = False,
    out: TreeMask | None = None,
) -> TreeMask:
    """Ancestor bitmasks, depths and (if ``build_dense``) the dense mask of a ragged tree batch.

    Rows at i >= num_nodes[b] are padding: zero bits, depth 0, all-False dense row. ``out`` may
    give preallocated outputs (for CUDA graphs). Parents that do not precede their child are
    treated as NO_PARENT; ``check_tree_parents`` validates them.
    """
    if parents.dim() != 2:
        raise ValueError(f"parents must have shape [batch, max_nodes], got {tuple(parents.shape)}")
    if parents.dtype not in (torch.int32, torch.int64) or num_nodes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"parents and num_nodes must be int32 or int64, got {parents.dtype} and {num_nodes.dtype}")
    batch, max_nodes = parents.shape
    if tuple(num_nodes.shape) != (batch,):
        raise ValueError(f"num_nodes must have shape ({batch},), got {tuple(num_nodes.shape)}")
    num_words = num_mask_words(max_nodes)
    if parents.stride(1) != 1:
        parents = parents.contiguous()
    num_nodes = num_nodes.contiguous()
    if out is None:
        device = parents.device
        out = TreeMask(
            torch.empty(batch, max_nodes, num_words, dtype=torch.int64, device=device),
            torch.empty(batch, max_nodes, dtype=torch.int32, device=device),
            torch.empty(batch, max_nodes, max_nodes, dtype=torch.bool, device=device) if build_dense else None,
        )
    else:
        expected = {
            "ancestor_bits": (out.ancestor_bits, (batch, max_nodes, num_words), torch.int64),
            "depth": (out.depth, (batch, max_nodes), torch.int32),
        }
        if build_dense:
            expected["dense_mask"] = (out.dense_mask, (batch, max_nodes, max_nodes), torch.bool)
        for name, (tensor, shape, dtype) in expected.items():
            if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != dtype or not tensor.is_contiguous():
                got = None if tensor is None else (tensor.dtype, tuple(tensor.shape))
                raise ValueError(f"out.{name} must be a contiguous {dtype} tensor of shape {shape}, got {got}")
        if not build_dense:
            out = out._replace(dense_mask=None)
    if use_triton(parents, num_nodes, out.ancestor_bits):
        from .kernel import tree_mask_triton

        tree_mask_triton(parents, num_nodes, out.ancestor_bits, out.depth, out.dense_mask)
    else:
        tree_mask_reference(parents, num_nodes, out.ancestor_bits, out.depth, out.dense_mask)
    return out
