"""Paged tree attention for the verification pass.

Layout:
  * ``query [num_tokens, num_heads, head_dim]``: the tree nodes of all requests, flattened;
    request b owns rows ``cu_num_nodes[b]:cu_num_nodes[b + 1]`` in node order (see
    ``radar_vllm.kernels.tree_mask.layout``).
  * ``key_cache``/``value_cache [num_blocks, block_size, num_kv_heads, head_dim]``: vLLM's paged
    layout of the CUDA flash-attention backends (one tensor each; the last dim contiguous).
    Request b's logical position p lives in block ``block_table[b, p // block_size]``, slot
    ``p % block_size``.
  * The context of request b is positions ``0 .. context_lens[b] - 1`` (the root, i.e. the last
    accepted token, included). The tree nodes' own keys/values are read from the cache at
    positions ``context_lens[b] + i`` (vLLM writes them there before attention runs), so
    ``context_lens[b] + num_nodes[b]`` is the request's sequence length.
  * Node i attends to the whole context and to node j iff bit j of ``ancestor_bits[b, i]`` is set
    (its ancestors and itself; from ``tree_mask``). A row that may attend to nothing yields zeros.
    Every request must have ``num_nodes[b] <= ancestor_bits.shape[1]``.

GQA: ``num_heads`` must be a multiple of ``num_kv_heads``. Inputs float16/bfloat16 (or float32),
float32 accumulation, online softmax, ragged context lengths and tree sizes in one launch (two with
``num_splits > 1``: the split-context pass and a merge).
"""
from __future__ import annotations

import functools

import torch

from ..dispatch import use_triton
from ..tree_mask.layout import num_mask_words
from .naive import gather_request_kv, tree_attention_reference

__all__ = ["choose_num_splits", "gather_request_kv", "tree_attention", "tree_attention_reference"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SPLITS = 16
MIN_SPLIT_TOKENS = 256  # a split should cover at least this many context tokens


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(
    batch: int, num_kv_heads: int, max_nodes: int, group: int, max_context_len: int, device: torch.device
) -> int:
    """Context splits so that small batches with long contexts still fill the GPU (1 on CPU)."""
    if device.type != "cuda" or max_context_len <= 0:
        return 1
    block_m = 64 if max_nodes * group > 16 else 16
    programs = batch * num_kv_heads * -(-max_nodes * group // block_m)
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= target:
        return 1
    by_length = max(1, max_context_len // MIN_SPLIT_TOKENS)
    return max(1, min(MAX_SPLITS, -(-target // programs), by_length))


def tree_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [batch, max_blocks] int32
    context_lens: torch.Tensor,  # [batch] int32
    cu_num_nodes: torch.Tensor,  # [batch + 1] int32
    ancestor_bits: torch.Tensor,  # [batch, max_nodes, num_words] int64
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    num_splits: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Tree attention of every node of every request; returns ``out`` ``[num_tokens, num_heads, head_dim]``.

    ``max_context_len`` (host int, >= most context lengths) lets the launcher split long contexts
    across programs when the batch is small; ``num_splits`` overrides that choice. Neither changes
    the result beyond rounding.
    """
    if query.dim() != 3:
        raise ValueError(f"query must have shape [num_tokens, num_heads, head_dim], got {tuple(query.shape)}")
    num_tokens, num_heads, head_dim = query.shape
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache and value_cache must both have shape [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"key_cache head_dim {key_cache.shape[3]} != query head_dim {head_dim}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if query.dtype not in SUPPORTED_DTYPES or key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise ValueError(
            f"query/key_cache/value_cache must share one dtype of {SUPPORTED_DTYPES}, "
            f"got {query.dtype}, {key_cache.dtype}, {value_cache.dtype}"
        )
    if query.stride(2) != 1 or key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("query, key_cache and value_cache must be contiguous in head_dim")
    batch = context_lens.shape[0]
    if tuple(cu_num_nodes.shape) != (batch + 1,):
        raise ValueError(f"cu_num_nodes must have shape ({batch + 1},), got {tuple(cu_num_nodes.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must have shape [{batch}, max_blocks], got {tuple(block_table.shape)}")
    if ancestor_bits.dim() != 3 or ancestor_bits.shape[0] != batch or ancestor_bits.dtype != torch.int64:
        raise ValueError(
            f"ancestor_bits must be int64 of shape [{batch}, max_nodes, num_words], "
            f"got {ancestor_bits.dtype} {tuple(ancestor_bits.shape)}"
        )
    if ancestor_bits.shape[2] != num_mask_words(ancestor_bits.shape[1]):
        raise ValueError(f"ancestor_bits has {ancestor_bits.shape[2]} words per row for {ancestor_bits.shape[1]} nodes")
    for name, tensor in (("block_table", block_table), ("context_lens", context_lens), ("cu_num_nodes", cu_num_nodes)):
        if tensor.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {tensor.dtype}")
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(2) != 1:
        raise ValueError(
            f"out must match query ({query.dtype} {tuple(query.shape)}), got {out.dtype} {tuple(out.shape)}"
        )
    ancestor_bits = ancestor_bits.contiguous()
    block_table = block_table.contiguous()
    context_lens = context_lens.contiguous()
    cu_num_nodes = cu_num_nodes.contiguous()
    max_nodes = ancestor_bits.shape[1]
    if num_splits is None:
        num_splits = choose_num_splits(
            batch, num_kv_heads, max_nodes, num_heads // num_kv_heads, max_context_len or 0, query.device
        )
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    args = (query, key_cache, value_cache, block_table, context_lens, cu_num_nodes, ancestor_bits, float(scale), out)
    if use_triton(query, key_cache, value_cache, block_table, context_lens, cu_num_nodes, ancestor_bits, out):
        from .kernel import tree_attention_triton

        tree_attention_triton(*args, num_splits=num_splits, max_context_len=max_context_len or 0)
    else:
        tree_attention_reference(*args, num_splits=num_splits, max_context_len=max_context_len or 0)
    return out
