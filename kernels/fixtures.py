"""Input builders and tolerances shared by the kernel tests and the kernel benchmark."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree_mask.layout import NO_PARENT

# (atol, rtol) for comparing a kernel with its float32-math torch reference, per input dtype.
# float16/bfloat16: the kernel rounds the softmax weights to the input dtype before the P @ V
# product (as flash attention does) and the output is rounded to the input dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def assert_close_for_dtype(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` from ``TOLERANCES``."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def random_parents(num_nodes: list[int], max_nodes: int, generator: torch.Generator) -> torch.Tensor:
    """Random topologically ordered trees, padded: ``[batch, max_nodes]`` int32.

    Node i's parent is NO_PARENT or a uniformly chosen earlier node; padding entries hold
    arbitrary garbage (they must be ignored).
    """
    batch = len(num_nodes)
    parents = torch.randint(-5, max_nodes + 5, (batch, max_nodes), generator=generator, dtype=torch.int32)
    for b, n in enumerate(num_nodes):
        for i in range(n):
            parents[b, i] = int(torch.randint(NO_PARENT, i, (1,), generator=generator)) if i > 0 else NO_PARENT
    return parents


def chain_parents(num_nodes: int) -> torch.Tensor:
    """The deepest tree: a chain, ``[num_nodes]`` int32 (node i's parent is i - 1)."""
    return torch.arange(-1, num_nodes - 1, dtype=torch.int32)


@dataclass
class PagedKV:
    """A paged KV cache holding the context and tree entries of a batch."""

    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor  # [batch, max_blocks] int32
    context_lens: torch.Tensor  # [batch] int32
    cu_num_nodes: torch.Tensor  # [batch + 1] int32


def random_paged_kv(
    context_lens: list[int],
    num_nodes: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    spare_blocks: int = 2,
) -> PagedKV:
    """Random keys/values in shuffled cache blocks. Slots past each request's sequence and the
    spare blocks hold NaN, so a kernel that reads beyond a sequence produces NaN."""
    seq_lens = [c + n for c, n in zip(context_lens, num_nodes)]
    blocks_per_request = [max(1, -(-s // block_size)) for s in seq_lens]
    total_blocks = sum(blocks_per_request) + spare_blocks
    shape = (total_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    order = torch.randperm(total_blocks, generator=generator)
    max_blocks = max(blocks_per_request) + 1
    block_table = torch.full((len(seq_lens), max_blocks), total_blocks + 7, dtype=torch.int32)  # out-of-range filler
    next_block = 0
    for b, seq in enumerate(seq_lens):
        ids = order[next_block : next_block + blocks_per_request[b]]
        next_block += blocks_per_request[b]
        block_table[b, : len(ids)] = ids.to(torch.int32)
        for p in range(seq):
            blk, slot = int(ids[p // block_size]), p % block_size
            key_cache[blk, slot] = torch.randn(num_kv_heads, head_dim, generator=generator).to(dtype)
            value_cache[blk, slot] = torch.randn(num_kv_heads, head_dim, generator=generator).to(dtype)
    cu = torch.zeros(len(num_nodes) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(num_nodes, dtype=torch.int32), 0)
    return PagedKV(
        key_cache.to(device),
        value_cache.to(device),
        block_table.to(device),
        torch.tensor(context_lens, dtype=torch.int32, device=device),
        cu.to(device),
    )
