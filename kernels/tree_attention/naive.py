"""Torch reference of paged tree attention (also the CPU fallback)."""
from __future__ import annotations

import torch

from ..tree_mask.layout import BITS_PER_WORD


def gather_request_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_row: torch.Tensor,  # [max_blocks]
    length: int,
) -> torch.Tensor:
    """The first ``length`` cache entries of one request, contiguous: [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    pages = cache[block_table_row[:num_blocks].long()]  # [num_blocks, block_size, kv_heads, head_dim]
    return pages.reshape(-1, cache.shape[2], cache.shape[3])[:length]


def tree_attention_reference(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [batch, max_blocks] int32
    context_lens: torch.Tensor,  # [batch] int32
    cu_num_nodes: torch.Tensor,  # [batch + 1] int32
    ancestor_bits: torch.Tensor,  # [batch, max_nodes, num_words] int64
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim] (output)
    num_splits: int = 1,
    max_context_len: int = 0,
) -> None:
    """Same contract as the Triton kernel; float32 math per request. The split arguments only
    shape the kernel's work division and are ignored here."""
    num_heads = query.shape[1]
    group = num_heads // key_cache.shape[2]
    shifts = torch.arange(BITS_PER_WORD, device=query.device, dtype=torch.int64)
    cu = cu_num_nodes.tolist()
    for b, context in enumerate(context_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        n = end - start
        if n == 0:
            continue
        keys = gather_request_kv(key_cache, block_table[b], context + n).float()  # [ctx + n, kv_heads, d]
        values = gather_request_kv(value_cache, block_table[b], context + n).float()
        keys = keys.repeat_interleave(group, dim=1)  # [ctx + n, heads, d]
        values = values.repeat_interleave(group, dim=1)
        tree = ((ancestor_bits[b, :n].unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :n].bool()  # [n, n]
        allowed = torch.cat([torch.ones(n, context, dtype=torch.bool, device=query.device), tree], dim=1)
        scores = torch.einsum("nhd,thd->hnt", query[start:end].float(), keys) * scale  # [heads, n, ctx + n]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see nothing -> 0
        out[start:end] = torch.einsum("hnt,thd->nhd", probs, values).to(out.dtype)
