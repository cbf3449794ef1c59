"""Tree layout shared by the tree-mask kernel, its reference and the tree-attention kernel.

Per request, the draft-tree nodes are numbered 0..n-1 in topological order (a parent before its
children). ``parents[b, i]`` is the index of node i's parent in the same request, or
``NO_PARENT`` (-1) when node i is a child of the root; the root (the last accepted token, already
in the context) is not a node. Depth is 1-based: a child of the root has depth 1, and the RoPE
position of node i is the root's position + depth[i].

Ragged batches use padded ``[batch, max_nodes]`` parents with ``num_nodes [batch]``; entries at
i >= num_nodes[b] are ignored. The ancestor relation is returned as packed bitmasks
``[batch, max_nodes, num_words]`` int64: bit j of row i (word j // 64, bit j % 64) is set when
node j is node i itself or one of its ancestors. Worked example, parents [-1, -1, 0, 2]:
depth [1, 1, 2, 3], rows 0b0001, 0b0010, 0b0101, 0b1101.
"""
from __future__ import annotations

from radar_vllm.core.tree import NO_PARENT  # noqa: F401  (the draft tree's convention, re-exported)

BITS_PER_WORD = 64
MAX_TREE_NODES = 256  # four int64 words per row


def num_mask_words(max_nodes: int) -> int:
    """Number of int64 words in one bitmask row of a tree with up to ``max_nodes`` nodes."""
    if not 1 <= max_nodes <= MAX_TREE_NODES:
        raise ValueError(f"max_nodes must be in [1, {MAX_TREE_NODES}], got {max_nodes}")
    return (max_nodes + BITS_PER_WORD - 1) // BITS_PER_WORD
