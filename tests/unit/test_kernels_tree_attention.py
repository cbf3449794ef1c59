"""Paged tree attention: Triton (interpreter on CPU) against the torch reference, and the
reference against PyTorch SDPA on a contiguous copy of the KV with a dense mask."""
from __future__ import annotations

import math

import pytest
import torch

from radar_vllm.kernels.dispatch import force_backend, interpreter_enabled
from radar_vllm.kernels.fixtures import (
    assert_close_for_dtype,
    chain_parents,
    random_paged_kv,
    random_parents,
)
from radar_vllm.kernels.tree_attention import gather_request_kv, tree_attention
from radar_vllm.kernels.tree_mask import MAX_TREE_NODES, tree_mask

# Triton runs on CPU tensors only in its interpreter; tests/run.sh sets TRITON_INTERPRET=1.
pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1")


def build_case(
    context_lens: list[int],
    num_nodes: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    parents: torch.Tensor | None = None,
):
    g = torch.Generator().manual_seed(seed)
    kv = random_paged_kv(context_lens, num_nodes, num_kv_heads, head_dim, block_size, dtype, g)
    max_nodes = max(num_nodes)
    if parents is None:
        parents = random_parents(num_nodes, max_nodes, g)
    mask = tree_mask(parents, torch.tensor(num_nodes), build_dense=True)
    query = torch.randn(sum(num_nodes), num_kv_heads * group, head_dim, generator=g).to(dtype)
    return kv, mask, query


def attend(backend: str, kv, mask, query, scale: float, **kwargs) -> torch.Tensor:
    out = torch.full_like(query, float("nan"))  # poisoned: every row must be written
    with force_backend(backend):
        result = tree_attention(
            query, kv.key_cache, kv.value_cache, kv.block_table, kv.context_lens, kv.cu_num_nodes,
            mask.ancestor_bits, scale, out=out, **kwargs,
        )
    assert result is out
    assert not bool(out.isnan().any())
    return out


@pytest.mark.parametrize(
    "dtype, group, block_size, head_dim, context_lens, num_nodes, num_splits",
    [
        (torch.float16, 1, 16, 64, [37, 1, 70], [5, 1, 9], 1),  # contexts end mid-block; 1-node tree
        (torch.float16, 4, 32, 128, [45, 16], [12, 3], 1),
        (torch.bfloat16, 8, 16, 64, [19, 33], [4, 7], 1),
        (torch.bfloat16, 4, 32, 128, [50], [6], 2),  # split context
        # empty context, a request without nodes, splits past a short context
        (torch.float32, 4, 16, 64, [90, 3, 0, 12], [3, 2, 2, 0], 3),
        (torch.float16, 8, 32, 64, [130, 61], [2, 4], 2),
    ],
)
def test_triton_matches_reference(
    dtype: torch.dtype,
    group: int,
    block_size: int,
    head_dim: int,
    context_lens: list[int],
    num_nodes: list[int],
    num_splits: int,
) -> None:
    num_kv_heads = 2 if group < 8 else 1
    kv, mask, query = build_case(context_lens, num_nodes, num_kv_heads, group, head_dim, block_size, dtype, seed=group)
    scale = 1.0 / math.sqrt(head_dim)
    reference = attend("torch", kv, mask, query, scale)
    kernel = attend("triton", kv, mask, query, scale, num_splits=num_splits, max_context_len=max(context_lens))
    assert_close_for_dtype(kernel, reference, dtype)


def test_split_with_underestimated_max_context_len() -> None:
    """The last split takes whatever the others leave, so a low hint never drops context."""
    kv, mask, query = build_case([150, 20], [3, 2], 1, 4, 64, 32, torch.float32, seed=8)
    reference = attend("torch", kv, mask, query, 0.125)
    kernel = attend("triton", kv, mask, query, 0.125, num_splits=2, max_context_len=40)
    assert_close_for_dtype(kernel, reference, torch.float32)


def test_max_size_tree() -> None:
    n = MAX_TREE_NODES
    parents = torch.stack([chain_parents(n), random_parents([n], n, torch.Generator().manual_seed(1))[0]])
    kv, mask, query = build_case([21, 40], [n, n], 1, 1, 64, 16, torch.float16, seed=11, parents=parents)
    reference = attend("torch", kv, mask, query, 0.125)
    kernel = attend("triton", kv, mask, query, 0.125)
    assert_close_for_dtype(kernel, reference, torch.float16)


@pytest.mark.parametrize("group", [1, 4])
def test_reference_matches_sdpa_on_contiguous_kv(group: int) -> None:
    context_lens, num_nodes = [23, 40], [6, 11]
    kv, mask, query = build_case(context_lens, num_nodes, 2, group, 64, 16, torch.float32, seed=5)
    scale = 0.1
    reference = attend("torch", kv, mask, query, scale)
    cu = kv.cu_num_nodes.tolist()
    for b, (context, n) in enumerate(zip(context_lens, num_nodes)):
        keys = gather_request_kv(kv.key_cache, kv.block_table[b], context + n)  # [ctx + n, kv_heads, d]
        values = gather_request_kv(kv.value_cache, kv.block_table[b], context + n)
        allowed = torch.cat([torch.ones(n, context, dtype=torch.bool), mask.dense_mask[b, :n, :n]], dim=1)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[cu[b] : cu[b + 1]].transpose(0, 1),  # [heads, n, d]
            keys.transpose(0, 1).repeat_interleave(group, 0),
            values.transpose(0, 1).repeat_interleave(group, 0),
            attn_mask=allowed,
            scale=scale,
        ).transpose(0, 1)
        torch.testing.assert_close(reference[cu[b] : cu[b + 1]], expected, atol=2e-5, rtol=2e-5)


def test_tree_mask_changes_the_result() -> None:
    """Guard against a kernel that ignores the mask: a chain and a flat tree differ."""
    n = 5
    chain = chain_parents(n).unsqueeze(0)
    flat = torch.full((1, n), -1, dtype=torch.int32)
    kv, mask_chain, query = build_case([8], [n], 1, 2, 64, 16, torch.float32, seed=3, parents=chain)
    mask_flat = tree_mask(flat, torch.tensor([n]))
    out_chain = attend("triton", kv, mask_chain, query, 0.125)
    out_flat = attend("triton", kv, mask_flat, query, 0.125)
    assert torch.equal(out_chain[0], out_flat[0])  # node 0 sees the same keys in both trees
    assert not torch.allclose(out_chain[1:], out_flat[1:])


def test_bad_arguments() -> None:
    kv, mask, query = build_case([10], [3], 2, 2, 64, 16, torch.float16, seed=0)
    args = (kv.key_cache, kv.value_cache, kv.block_table, kv.context_lens, kv.cu_num_nodes, mask.ancestor_bits, 0.1)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tree_attention(query[:, :3], *args)
    with pytest.raises(ValueError, match="dtype"):
        tree_attention(query.float(), *args)
    with pytest.raises(ValueError, match="cu_num_nodes"):
        tree_attention(query, *args[:4], kv.cu_num_nodes[:1], *args[5:])
    with pytest.raises(ValueError, match="num_splits"):
        tree_attention(query, *args, num_splits=0)
