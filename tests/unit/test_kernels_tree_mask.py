"""Tree-mask kernel: Triton (interpreter on CPU) against the torch reference and a brute force."""
from __future__ import annotations

import pytest
import torch

from radar_vllm.kernels.dispatch import force_backend, interpreter_enabled
from radar_vllm.kernels.fixtures import chain_parents, random_parents
from radar_vllm.kernels.tree_mask import (
    MAX_TREE_NODES,
    NO_PARENT,
    TreeMask,
    check_tree_parents,
    num_mask_words,
    tree_mask,
    unpack_ancestor_bits,
)

POISON_INT = -123_456_789

# Triton runs on CPU tensors only in its interpreter; tests/run.sh sets TRITON_INTERPRET=1.
pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1")


def brute_force(parents: torch.Tensor, num_nodes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ancestor-or-self relation and depth by walking each node's parent chain in Python."""
    batch, max_nodes = parents.shape
    dense = torch.zeros(batch, max_nodes, max_nodes, dtype=torch.bool)
    depth = torch.zeros(batch, max_nodes, dtype=torch.int32)
    for b, n in enumerate(num_nodes):
        for i in range(n):
            j = i
            while j != NO_PARENT:
                dense[b, i, j] = True
                depth[b, i] += 1
                j = int(parents[b, j])
    return dense, depth


def poisoned(batch: int, max_nodes: int) -> TreeMask:
    return TreeMask(
        torch.full((batch, max_nodes, num_mask_words(max_nodes)), POISON_INT, dtype=torch.int64),
        torch.full((batch, max_nodes), POISON_INT, dtype=torch.int32),
        torch.ones(batch, max_nodes, max_nodes, dtype=torch.bool),
    )


def run_both(parents: torch.Tensor, num_nodes: list[int]) -> tuple[TreeMask, TreeMask]:
    counts = torch.tensor(num_nodes, dtype=torch.int32)
    batch, max_nodes = parents.shape
    with force_backend("torch"):
        reference = tree_mask(parents, counts, build_dense=True, out=poisoned(batch, max_nodes))
    with force_backend("triton"):
        kernel = tree_mask(parents, counts, build_dense=True, out=poisoned(batch, max_nodes))
    return reference, kernel


def assert_matches_brute_force(result: TreeMask, parents: torch.Tensor, num_nodes: list[int]) -> None:
    dense, depth = brute_force(parents, num_nodes)
    max_nodes = parents.shape[1]
    assert torch.equal(result.dense_mask, dense)
    assert torch.equal(result.depth, depth)
    assert torch.equal(unpack_ancestor_bits(result.ancestor_bits, max_nodes), dense)
    # bits past max_nodes in the last word are clear
    words = num_mask_words(max_nodes)
    assert torch.equal(
        unpack_ancestor_bits(result.ancestor_bits, words * 64)[..., max_nodes:],
        torch.zeros(*result.depth.shape, words * 64 - max_nodes, dtype=torch.bool),
    )


def test_worked_example_from_layout_doc() -> None:
    parents = torch.tensor([[-1, -1, 0, 2]], dtype=torch.int32)
    for backend in ("torch", "triton"):
        with force_backend(backend):
            result = tree_mask(parents, torch.tensor([4]))
        assert torch.equal(result.depth, torch.tensor([[1, 1, 2, 3]], dtype=torch.int32))
        assert torch.equal(result.ancestor_bits[0, :, 0], torch.tensor([0b0001, 0b0010, 0b0101, 0b1101]))
        assert result.dense_mask is None


@pytest.mark.parametrize(
    "num_nodes, max_nodes, seed",
    [
        ([1], 1, 0),  # a single node
        ([5, 60, 1, 0, 33], 60, 1),  # ragged batch with an empty request, the default tree size
        ([64, 63], 64, 2),  # one full int64 word
        ([100, 7], 130, 3),  # three words, last one partial
    ],
)
def test_random_trees_match_reference_and_brute_force(num_nodes: list[int], max_nodes: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    parents = random_parents(num_nodes, max_nodes, g)
    reference, kernel = run_both(parents, num_nodes)
    assert_matches_brute_force(reference, parents, num_nodes)
    assert torch.equal(kernel.ancestor_bits, reference.ancestor_bits)
    assert torch.equal(kernel.depth, reference.depth)
    assert torch.equal(kernel.dense_mask, reference.dense_mask)


def test_max_size_chain_sets_the_sign_bit_and_full_depth() -> None:
    n = MAX_TREE_NODES
    parents = torch.stack([chain_parents(n), torch.full((n,), NO_PARENT, dtype=torch.int32)])  # chain + flat
    reference, kernel = run_both(parents, [n, n])
    assert_matches_brute_force(reference, parents, [n, n])
    assert torch.equal(kernel.ancestor_bits, reference.ancestor_bits)
    assert torch.equal(kernel.depth, reference.depth)
    assert torch.equal(kernel.dense_mask, reference.dense_mask)
    assert torch.equal(kernel.depth[0], torch.arange(1, n + 1, dtype=torch.int32))
    assert int(kernel.ancestor_bits[0, n - 1, 3]) == -1  # all 64 bits of the last word set
    assert int(kernel.ancestor_bits[0, 63, 0]) == -1


def test_int64_parents_and_default_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(True) if t.dtype == torch.bool else t.fill_(POISON_INT)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    g = torch.Generator().manual_seed(5)
    num_nodes = [9, 3]
    parents = random_parents(num_nodes, 12, g).long()
    with force_backend("triton"):
        result = tree_mask(parents, torch.tensor(num_nodes), build_dense=True)
    assert_matches_brute_force(result, parents, num_nodes)


def test_parent_not_preceding_child_is_treated_as_root_child() -> None:
    parents = torch.tensor([[-1, 3, 1, 0]], dtype=torch.int32)  # node 1 names a later node
    reference, kernel = run_both(parents, [4])
    assert torch.equal(kernel.depth, torch.tensor([[1, 1, 2, 2]], dtype=torch.int32))
    assert torch.equal(reference.depth, kernel.depth)
    with pytest.raises(ValueError, match=r"parents\[0, 1\] = 3"):
        check_tree_parents(parents, torch.tensor([4]))


def test_bad_arguments() -> None:
    parents = torch.full((2, 4), NO_PARENT, dtype=torch.int32)
    with pytest.raises(ValueError, match="num_nodes"):
        tree_mask(parents, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="max_nodes"):
        tree_mask(torch.full((1, MAX_TREE_NODES + 1), NO_PARENT), torch.tensor([1]))
    with pytest.raises(ValueError, match="int32 or int64"):
        tree_mask(parents.float(), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="out.ancestor_bits"):
        tree_mask(parents, torch.tensor([1, 2]), out=poisoned(2, 5))
    with pytest.raises(ValueError, match="num_nodes"):
        check_tree_parents(parents, torch.tensor([1, 5]))
