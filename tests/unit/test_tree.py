"""Dynamic draft tree: growth, rerank, structure invariants, against a plain-Python reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radar_vllm.core.config import TreeConfig
from radar_vllm.core.tree import (
    NO_PARENT,
    PADDING_TOKEN,
    DraftTree,
    DraftTreeBuilder,
    build_tree_from_parents,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------- helpers


def random_logprobs(generator: torch.Generator, *shape: int, ties: bool = False) -> torch.Tensor:
    """Log-probs over the last dim; with ties=True logits come from a 3-value set (many exact ties)."""
    if ties:
        logits = torch.randint(0, 3, shape, generator=generator).float()
    else:
        logits = torch.randn(shape, generator=generator) * 2.0
    return logits.log_softmax(dim=-1)


def grow(
    config: TreeConfig,
    stops: list[int],
    vocab: int,
    seed: int,
    ties: bool = False,
    d2t: torch.Tensor | None = None,
    device: str = "cpu",
) -> tuple[DraftTreeBuilder, DraftTree, torch.Tensor, list[torch.Tensor]]:
    """Grow one round where request b makes stops[b] draft calls; returns the inputs too."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(stops)
    builder = DraftTreeBuilder(config, batch, device, d2t=d2t)
    root = random_logprobs(generator, batch, vocab, ties=ties)
    builder.start(root.to(device))
    children = []
    stop_tensor = torch.tensor(stops, device=device)
    for depth in range(2, max(stops) + 1):
        child = random_logprobs(generator, batch, config.top_k, vocab, ties=ties)
        children.append(child)
        builder.extend(child.to(device), stop_tensor >= depth)
    return builder, builder.finalize(), root, children


def reference_tree(
    config: TreeConfig, root: list[float], children: list[list[list[float]]], stop: int
) -> list[tuple[tuple[int, ...], float]]:
    """Plain-Python EAGLE growth and rerank for one request: kept (token path, score), best first.

    Float32 arithmetic as in the library; assumes no ties (continuous random inputs).
    """
    top_k, vocab = config.top_k, len(root)

    def best(values: list[float], count: int) -> list[int]:
        return sorted(range(vocab), key=lambda t: -values[t])[:count]

    root32 = [np.float32(v) for v in root]
    if stop == 1:
        return [((t,), float(root32[t])) for t in best(root, min(config.max_nodes, vocab))]
    frontier = [((t,), root32[t]) for t in best(root, top_k)]
    candidates = list(frontier)
    for depth in range(2, stop + 1):
        rows = children[depth - 2]
        new = []
        for slot, (path, score) in enumerate(frontier):
            for t in best(rows[slot], top_k):
                new.append((path + (t,), np.float32(score + np.float32(rows[slot][t]))))
        candidates += new
        frontier = sorted(new, key=lambda c: -c[1])[:top_k]
    kept = sorted(candidates, key=lambda c: -c[1])[: config.max_nodes]
    return [(path, float(score)) for path, score in kept]


def token_paths(tree_lists: dict) -> list[tuple[int, ...]]:
    paths = []
    for i, parent in enumerate(tree_lists["parents"]):
        prefix = paths[parent] if parent != NO_PARENT else ()
        paths.append(prefix + (tree_lists["draft_tokens"][i],))
    return paths


def check_invariants(tree: DraftTree) -> None:
    """Structure invariants, checked in plain Python against the tensors."""
    n_max = tree.max_nodes
    assert tree.target_tokens.shape == (tree.batch_size, n_max)
    mask = tree.ancestor_mask().cpu()
    node_paths = tree.node_paths().cpu()
    leaf = tree.leaf_mask.cpu()
    for b, request in enumerate(tree.to_lists()):
        n = len(request["parents"])
        assert n == int(tree.num_nodes[b]) <= n_max
        ancestors: list[set[int]] = []
        for i, parent in enumerate(request["parents"]):
            # connected, parents precede children, depth = parent depth + 1
            assert parent == NO_PARENT or 0 <= parent < i
            expected_depth = 1 if parent == NO_PARENT else request["depths"][parent] + 1
            assert request["depths"][i] == expected_depth
            assert 1 <= request["depths"][i] <= tree.max_depth
            # scores never increase along a path
            if parent != NO_PARENT:
                assert request["scores"][i] <= request["scores"][parent]
            ancestors.append({i} | (ancestors[parent] if parent != NO_PARENT else set()))
        # ancestor mask = transitive closure of the parent relation, padding rows/cols empty
        expected_mask = torch.zeros(n_max, n_max, dtype=torch.bool)
        for i, closure in enumerate(ancestors):
            expected_mask[i, sorted(closure)] = True
        assert torch.equal(mask[b], expected_mask)
        # node paths list the ancestors by depth
        for i in range(n):
            chain = sorted(ancestors[i], key=lambda j: request["depths"][j])
            expected_path = chain + [NO_PARENT] * (tree.max_depth - len(chain))
            assert node_paths[b, i].tolist() == expected_path
        has_child = {p for p in request["parents"] if p != NO_PARENT}
        assert leaf[b].tolist() == [i < n and i not in has_child for i in range(n_max)]
        # padding
        assert (tree.target_tokens[b, n:] == PADDING_TOKEN).all()
        assert (tree.parents[b, n:] == NO_PARENT).all()
        assert (tree.depths[b, n:] == 0).all()


tree_params = st.integers(1, 4).flatmap(
    lambda top_k: st.integers(1, 4).flatmap(
        lambda max_depth: st.tuples(
            st.just(top_k),
            st.just(max_depth),
            st.integers(2, top_k * (1 + top_k * (max_depth - 1)) + 1),
            st.lists(st.integers(1, max_depth), min_size=1, max_size=4),
            st.integers(0, 6),
            st.integers(0, 2**31 - 1),
        )
    )
)


# --------------------------------------------------------------------------- growth and rerank


@settings(max_examples=60, deadline=None, derandomize=True)
@given(tree_params)
def test_tree_matches_python_reference(params: tuple) -> None:
    top_k, max_depth, total_tokens, stops, extra_vocab, seed = params
    config = TreeConfig(top_k=top_k, max_depth=max_depth, total_tokens=total_tokens)
    vocab = top_k + extra_vocab
    _, tree, root, children = grow(config, stops, vocab, seed)
    check_invariants(tree)
    assert tree.stop_depth.tolist() == stops
    for b, request in enumerate(tree.to_lists()):
        expected = reference_tree(
            config, root[b].tolist(), [c[b].tolist() for c in children], stops[b]
        )
        got = list(zip(token_paths(request), request["scores"]))
        assert [path for path, _ in got] == [path for path, _ in expected]
        assert [score for _, score in got] == [score for _, score in expected]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(tree_params)
def test_invariants_hold_with_many_ties(params: tuple) -> None:
    top_k, max_depth, total_tokens, stops, extra_vocab, seed = params
    config = TreeConfig(top_k=top_k, max_depth=max_depth, total_tokens=total_tokens)
    _, tree, _, _ = grow(config, stops, top_k + extra_vocab, seed, ties=True)
    check_invariants(tree)
    # with ties the kept set may differ from a reference, but the budget is still used in full
    for b, stop in enumerate(stops):
        available = min(config.max_nodes, top_k + extra_vocab) if stop == 1 else config.num_candidates_at_depth(stop)
        assert int(tree.num_nodes[b]) == min(config.max_nodes, available)


def test_certain_children_tie_with_their_parents() -> None:
    # log-prob 0 children (probability 1) tie with their parent: the parent must still come first
    config = TreeConfig(top_k=2, max_depth=3, total_tokens=8)
    builder = DraftTreeBuilder(config, 1)
    root = torch.full((1, 4), float("-inf"))
    root[0, 1] = 0.0
    builder.start(root)
    for _ in range(2):
        child = torch.full((1, 2, 4), float("-inf"))
        child[:, :, 3] = 0.0
        builder.extend(child)
    tree = builder.finalize()
    check_invariants(tree)
    assert tree.to_lists()[0]["draft_tokens"][:3] == [1, 3, 3]
    assert tree.depths[0, :3].tolist() == [1, 2, 3]


def test_docstring_example() -> None:
    # top_k=2, one extend, max_nodes=3; scores per candidate id [-0.1, -1.0, -0.3, -2.0, -1.5, -4.0]
    config = TreeConfig(top_k=2, max_depth=2, total_tokens=4)
    builder = DraftTreeBuilder(config, 1)
    root = torch.tensor([[-0.1, -1.0, -9.0]])
    builder.start(root)
    child = torch.tensor([[[-9.0, -0.2, -1.9], [-0.5, -9.0, -3.0]]])
    builder.extend(child)
    assert torch.allclose(builder.candidate_scores[0], torch.tensor([-0.1, -1.0, -0.3, -2.0, -1.5, -4.0]))
    tree = builder.finalize()
    assert tree.to_lists()[0]["parents"] == [NO_PARENT, 0, NO_PARENT]
    assert tree.to_lists()[0]["draft_tokens"] == [0, 1, 1]


def test_frontier_is_best_children_sorted() -> None:
    config = TreeConfig(top_k=3, max_depth=3, total_tokens=20)
    builder, _, _, _ = grow(config, [3, 3], vocab=7, seed=5)
    scores = builder.frontier_scores
    assert torch.equal(scores, scores.sort(dim=1, descending=True).values)
    depth3 = builder.candidate_depths == 3
    best = builder.candidate_scores[:, depth3].topk(3, dim=1).values
    assert torch.equal(scores, best)
    ids = builder.frontier_node_ids
    assert torch.equal(builder.candidate_scores.gather(1, ids), scores)
    assert torch.equal(builder.candidate_tokens.gather(1, ids), builder.frontier_tokens)
    # frontier parents sit in the previous frontier slot that frontier_parent_slots names
    paths = builder.ancestor_path(ids)
    assert paths.shape == (2, 3, 3)
    assert torch.equal(paths[:, :, 2], ids)
    assert torch.equal(builder.candidate_parents.gather(1, ids), paths[:, :, 1])


def test_ragged_stops_and_no_resume() -> None:
    config = TreeConfig(top_k=2, max_depth=4, total_tokens=12)
    generator = torch.Generator().manual_seed(3)
    builder = DraftTreeBuilder(config, 3)
    builder.start(random_logprobs(generator, 3, 6))
    builder.extend(random_logprobs(generator, 3, 2, 6), torch.tensor([True, False, True]))
    frozen_scores = builder.frontier_scores[1].clone()
    # request 1 asks to resume: it must stay stopped
    builder.extend(random_logprobs(generator, 3, 2, 6), torch.tensor([True, True, False]))
    assert builder.num_calls.tolist() == [3, 1, 2]
    assert builder.active.tolist() == [True, False, False]
    assert torch.equal(builder.frontier_scores[1], frozen_scores)
    tree = builder.finalize()
    check_invariants(tree)
    assert tree.stop_depth.tolist() == [3, 1, 2]
    assert int(tree.depths[0].max()) <= 3 and int(tree.depths[1].max()) == 1 and int(tree.depths[2].max()) <= 2


def test_top_k_one_gives_a_chain() -> None:
    config = TreeConfig(top_k=1, max_depth=5, total_tokens=6)
    builder, tree, root, children = grow(config, [5, 5], vocab=9, seed=11)
    for b, request in enumerate(tree.to_lists()):
        assert request["parents"] == [NO_PARENT, 0, 1, 2, 3]
        assert request["depths"] == [1, 2, 3, 4, 5]
        expected = [int(root[b].argmax())] + [int(c[b, 0].argmax()) for c in children]
        assert request["draft_tokens"] == expected


def test_stop_after_first_call_gives_flat_tree_from_full_root() -> None:
    config = TreeConfig(top_k=2, max_depth=3, total_tokens=6)  # 5 nodes > top_k
    builder, tree, root, _ = grow(config, [1, 1], vocab=8, seed=2)
    expected_tokens = root.topk(5, dim=1).indices
    assert torch.equal(tree.draft_tokens, expected_tokens)
    assert torch.equal(tree.parents, torch.full((2, 5), NO_PARENT))
    assert torch.equal(tree.depths, torch.ones(2, 5, dtype=torch.long))
    # the frontier still holds only top_k root tokens
    assert torch.equal(builder.frontier_tokens, expected_tokens[:, :2])


def test_flat_tree_when_vocab_smaller_than_budget() -> None:
    config = TreeConfig(top_k=2, max_depth=3, total_tokens=9)
    _, tree, _, _ = grow(config, [1], vocab=3, seed=0)
    assert tree.num_nodes.tolist() == [3]
    check_invariants(tree)


def test_finalize_after_every_call_does_not_disturb_growth() -> None:
    config = TreeConfig(top_k=3, max_depth=3, total_tokens=10)
    generator = torch.Generator().manual_seed(9)
    root = random_logprobs(generator, 2, 6)
    children = [random_logprobs(generator, 2, 3, 6) for _ in range(2)]
    probing = DraftTreeBuilder(config, 2)
    plain = DraftTreeBuilder(config, 2)
    probing.start(root)
    plain.start(root)
    counterfactual = [probing.finalize()]
    for child in children:
        probing.extend(child)
        plain.extend(child)
        counterfactual.append(probing.finalize())
    final = plain.finalize()
    assert torch.equal(counterfactual[-1].target_tokens, final.target_tokens)
    assert torch.equal(counterfactual[-1].parents, final.parents)
    assert [int(t.stop_depth[0]) for t in counterfactual] == [1, 2, 3]


def test_d2t_maps_draft_to_target_tokens() -> None:
    config = TreeConfig(top_k=2, max_depth=2, total_tokens=5)
    d2t = torch.tensor([10, 10, 20, 30, 30])
    builder, tree, _, _ = grow(config, [2, 1], vocab=5, seed=4, d2t=d2t)
    valid = tree.node_mask
    expected = tree.draft_tokens + d2t[tree.draft_tokens.clamp(min=0)]
    assert torch.equal(tree.target_tokens[valid], expected[valid])
    assert (tree.target_tokens[~valid] == PADDING_TOKEN).all()
    assert torch.equal(builder.frontier_target_tokens, builder.frontier_tokens + d2t[builder.frontier_tokens])


# --------------------------------------------------------------------------- DraftTree methods


def test_truncate_keeps_valid_best_prefix() -> None:
    config = TreeConfig(top_k=3, max_depth=4, total_tokens=25)
    _, tree, _, _ = grow(config, [4, 2, 1], vocab=7, seed=8)
    short = tree.truncate(torch.tensor([5, 30, 0]))
    check_invariants(short)
    # request 1 stopped at depth 2: only 3 + 9 candidates exist, fewer than the budget
    assert short.num_nodes.tolist() == [5, config.num_candidates_at_depth(2), 0]
    assert torch.equal(short.target_tokens[0, :5], tree.target_tokens[0, :5])
    assert torch.equal(short.parents[1], tree.parents[1])
    assert torch.equal(tree.truncate(3).num_nodes, torch.tensor([3, 3, 3]))
    with pytest.raises(ValueError, match="num_nodes_per_request"):
        tree.truncate(-1)
    with pytest.raises(ValueError, match="num_nodes_per_request"):
        tree.truncate(torch.tensor([1, 2]))


def test_paths_lists_each_leaf_once() -> None:
    tree = build_tree_from_parents([[-1, 0, 0, 1, -1], [-1]], [[5, 6, 7, 8, 9], [4]], max_depth=3)
    paths = tree.paths()
    assert paths.shape == (2, 3, 3)
    assert paths[0].tolist() == [[0, 2, -1], [0, 1, 3], [4, -1, -1]]
    assert paths[1].tolist() == [[0, -1, -1], [-1, -1, -1], [-1, -1, -1]]
    assert tree.num_leaves.tolist() == [3, 1]


def test_paths_of_grown_trees_end_at_leaves() -> None:
    config = TreeConfig(top_k=3, max_depth=3, total_tokens=15)
    _, tree, _, _ = grow(config, [3, 2], vocab=6, seed=13)
    paths = tree.paths()
    leaf = tree.leaf_mask
    for b in range(2):
        rows = [row for row in paths[b].tolist() if row[0] != NO_PARENT]
        ends = sorted(max(i for i in row if i != NO_PARENT) for row in rows)
        assert ends == torch.nonzero(leaf[b]).flatten().tolist()


def test_build_tree_from_parents_validates() -> None:
    with pytest.raises(ValueError, match="parents\\[1\\]=1"):
        build_tree_from_parents([[-1, 1]], [[1, 2]])
    with pytest.raises(ValueError, match="tokens has 1"):
        build_tree_from_parents([[-1, 0]], [[1]])
    with pytest.raises(ValueError, match="max_nodes=1"):
        build_tree_from_parents([[-1, 0]], [[1, 2]], max_nodes=1)
    with pytest.raises(ValueError, match="max_depth=1"):
        build_tree_from_parents([[-1, 0]], [[1, 2]], max_depth=1)


# --------------------------------------------------------------------------- bad input


def test_builder_rejects_bad_input() -> None:
    config = TreeConfig(top_k=3, max_depth=2, total_tokens=6)
    with pytest.raises(ValueError, match="batch_size"):
        DraftTreeBuilder(config, 0)
    with pytest.raises(ValueError, match="d2t"):
        DraftTreeBuilder(config, 1, d2t=torch.zeros(2, 2, dtype=torch.long))
    builder = DraftTreeBuilder(config, 2)
    with pytest.raises(RuntimeError, match="start"):
        builder.extend(torch.zeros(2, 3, 5))
    with pytest.raises(RuntimeError, match="start"):
        _ = builder.frontier_scores
    with pytest.raises(ValueError, match="root_logprobs"):
        builder.start(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="top_k=3"):
        builder.start(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="d2t"):
        DraftTreeBuilder(config, 2, d2t=torch.zeros(4, dtype=torch.long)).start(torch.zeros(2, 5))
    builder.start(torch.zeros(2, 5).log_softmax(-1))
    with pytest.raises(ValueError, match="child_logprobs"):
        builder.extend(torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match="active"):
        builder.extend(torch.zeros(2, 3, 5), torch.tensor([1, 0]))
    builder.extend(torch.zeros(2, 3, 5).log_softmax(-1))
    with pytest.raises(RuntimeError, match="max_depth=2"):
        builder.extend(torch.zeros(2, 3, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_tensors_stay_on_device(device: str) -> None:
    config = TreeConfig(top_k=2, max_depth=3, total_tokens=7)
    d2t = torch.zeros(5, dtype=torch.long, device=device)
    builder, tree, _, _ = grow(config, [3, 2], vocab=5, seed=1, d2t=d2t, device=device)
    for tensor in (tree.target_tokens, tree.parents, tree.ancestor_mask(), builder.frontier_scores):
        assert tensor.device.type == device
    check_invariants(tree)
