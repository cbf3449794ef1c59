"""Tree verification: greedy vs brute force, lossless sampling (chi-square), acceptance-length law."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radar_vllm.core.config import TreeConfig
from radar_vllm.core.tree import NO_PARENT, PADDING_TOKEN, DraftTree, DraftTreeBuilder, build_tree_from_parents
from radar_vllm.core.verify import (
    acceptance_length_distribution,
    acceptance_length_distribution_from_token_probs,
    gather_node_token_probs,
    greedy_verify,
    mean_acceptance_length,
    sample_verify,
    shape_probs,
)

# Statistical tests use fixed seeds and reject at significance 0.001: a correct sampler fails a
# given seed with probability 0.001, a biased one is caught with near certainty at these sizes.
SIGNIFICANCE = 1e-3
TRIALS = 20_000


# --------------------------------------------------------------------------- helpers


def toy_target(context: tuple[int, ...], vocab: int, seed: int = 0) -> torch.Tensor:
    """A deterministic 'target model': next-token probabilities as a function of the context."""
    key = seed
    for token in context:
        key = (key * 1_000_003 + token + 1) % (2**31 - 1)
    generator = torch.Generator().manual_seed(key)
    return (torch.randn(vocab, generator=generator) * 1.5).softmax(dim=-1)


def node_contexts(request: dict, prefix: tuple[int, ...]) -> list[tuple[int, ...]]:
    contexts: list[tuple[int, ...]] = []
    for i, parent in enumerate(request["parents"]):
        base = contexts[parent] if parent != NO_PARENT else prefix
        contexts.append(base + (request["target_tokens"][i],))
    return contexts


def toy_rows(tree: DraftTree, prefix: tuple[int, ...], vocab: int) -> torch.Tensor:
    """[batch, max_nodes + 1, vocab] toy-target rows: root, then after each node (uniform padding)."""
    rows = torch.full((tree.batch_size, tree.max_nodes + 1, vocab), 1.0 / vocab)
    for b, request in enumerate(tree.to_lists()):
        rows[b, 0] = toy_target(prefix, vocab)
        for i, context in enumerate(node_contexts(request, prefix)):
            rows[b, i + 1] = toy_target(context, vocab)
    return rows


def toy_tree(config: TreeConfig, prefix: tuple[int, ...], vocab: int, stop: int, noise: float) -> DraftTree:
    """Grow a tree whose drafter is the toy target plus noise, so that acceptance is common."""
    generator = torch.Generator().manual_seed(len(prefix) + 17)

    def draft(context: tuple[int, ...]) -> torch.Tensor:
        logits = toy_target(context, vocab).log() + noise * torch.randn(vocab, generator=generator)
        return logits.log_softmax(dim=-1)

    builder = DraftTreeBuilder(config, 1)
    builder.start(draft(prefix).unsqueeze(0))
    # frontier contexts: path of candidate ids -> tokens
    for _ in range(2, stop + 1):
        paths = builder.ancestor_path(builder.frontier_node_ids)[0]
        rows = []
        for slot in range(config.top_k):
            ids = [i for i in paths[slot].tolist() if i != NO_PARENT]
            tokens = tuple(int(builder.candidate_tokens[0, i]) for i in ids)
            rows.append(draft(prefix + tokens))
        builder.extend(torch.stack(rows).unsqueeze(0))
    return builder.finalize()


def repeat_tree(tree: DraftTree, count: int) -> DraftTree:
    """The batch-1 tree ``tree`` repeated ``count`` times along the batch."""
    fields = {}
    for name in ("target_tokens", "draft_tokens", "parents", "depths", "scores", "num_nodes", "stop_depth"):
        value = getattr(tree, name)
        fields[name] = value.expand(count, *value.shape[1:]).contiguous()
    return DraftTree(max_depth=tree.max_depth, **fields)


def chi_square_p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square p-value; cells with expected count < 5 are pooled into one cell."""
    total = float(observed.sum())
    expected = expected_probs.double() * total
    observed = observed.double()
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expected > 0
    assert float(observed[~keep].sum()) == 0.0, "observed an event of probability 0"
    observed, expected = observed[keep], expected[keep]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    degrees = observed.numel() - 1
    if degrees == 0:
        return 1.0
    half = torch.tensor([degrees / 2.0, statistic / 2.0], dtype=torch.float64)
    return float(torch.special.gammaincc(half[0], half[1]))  # upper tail of chi-square(degrees)


def brute_force_greedy(request: dict, argmax: list[int]) -> list[int]:
    """Accepted tokens + bonus by enumerating every root-to-node path."""
    best_path: list[int] = []
    paths: list[list[int]] = []
    for i, parent in enumerate(request["parents"]):
        paths.append((paths[parent] if parent != NO_PARENT else []) + [i])
    for path in paths:
        rows = [0] + [j + 1 for j in path[:-1]]
        if all(request["target_tokens"][j] == argmax[row] for j, row in zip(path, rows)):
            if len(path) > len(best_path):
                best_path = path
    bonus_row = best_path[-1] + 1 if best_path else 0
    return [request["target_tokens"][j] for j in best_path] + [argmax[bonus_row]]


def sequential_rejection_law(request: dict, rows: torch.Tensor, max_depth: int) -> list[float]:
    """Exact acceptance-length law of the sequential rejection scheme, by recursion (no formula)."""
    law = [0.0] * (max_depth + 1)
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(request["parents"]):
        children.setdefault(parent, []).append(i)

    def visit(node: int, depth: int, reach: float) -> None:
        residual = rows[node + 1 if node != NO_PARENT else 0].double().tolist()
        not_taken = reach
        for child in children.get(node, []):
            token = request["target_tokens"][child]
            mass = sum(residual)
            accept = residual[token] / mass if mass > 0 else 0.0
            if accept > 0:
                visit(child, depth + 1, not_taken * accept)
            not_taken *= 1.0 - accept
            residual[token] = 0.0
        law[depth] += not_taken

    visit(NO_PARENT, 0, 1.0)
    return law


random_trees = st.integers(1, 9).flatmap(
    lambda n: st.tuples(
        st.tuples(*[st.integers(-1, i - 1) for i in range(n)]),
        st.lists(st.integers(0, 2), min_size=n, max_size=n),
    )
)


# --------------------------------------------------------------------------- greedy


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.lists(random_trees, min_size=1, max_size=3), st.integers(0, 2**31 - 1))
def test_greedy_matches_brute_force(trees: list, seed: int) -> None:
    # tiny vocabulary and duplicate sibling tokens allowed: many accepted paths and ties
    tree = build_tree_from_parents([list(p) for p, _ in trees], [t for _, t in trees])
    generator = torch.Generator().manual_seed(seed)
    argmax = torch.randint(0, 3, (tree.batch_size, tree.max_nodes + 1), generator=generator)
    result = greedy_verify(tree, argmax)
    for b, request in enumerate(tree.to_lists()):
        expected = brute_force_greedy(request, argmax[b].tolist())
        assert int(result.num_accepted[b]) == len(expected) - 1
        assert result.output_tokens[b].tolist() == expected + [PADDING_TOKEN] * (tree.max_depth + 1 - len(expected))
        assert int(result.bonus_token[b]) == expected[-1]
        accepted = [i for i in result.accepted_nodes[b].tolist() if i != NO_PARENT]
        assert [request["target_tokens"][i] for i in accepted] == expected[:-1]
        assert int(result.last_node[b]) == (accepted[-1] if accepted else NO_PARENT)


@pytest.mark.parametrize("prefix", [(1,), (2, 3), (0, 0, 4)])
def test_greedy_equals_target_only_decoding(prefix: tuple[int, ...]) -> None:
    vocab = 5
    config = TreeConfig(top_k=2, max_depth=4, total_tokens=12)
    tree = toy_tree(config, prefix, vocab, stop=4, noise=0.5)
    argmax = toy_rows(tree, prefix, vocab).argmax(dim=-1)
    result = greedy_verify(tree, argmax)
    # target-only greedy decoding
    context, decoded = prefix, []
    for _ in range(config.max_depth + 1):
        token = int(toy_target(context, vocab).argmax())
        decoded.append(token)
        context = context + (token,)
    emitted = int(result.num_accepted[0]) + 1
    assert result.output_tokens[0, :emitted].tolist() == decoded[:emitted]
    # and nothing longer was available: the next greedy token is not a child of the last node
    request = tree.to_lists()[0]
    last = int(result.last_node[0])
    children = [request["target_tokens"][i] for i, p in enumerate(request["parents"]) if p == last]
    assert decoded[emitted - 1] not in children


def test_sampling_with_one_hot_rows_is_greedy() -> None:
    config = TreeConfig(top_k=3, max_depth=3, total_tokens=16)
    generator = torch.Generator().manual_seed(21)
    builder = DraftTreeBuilder(config, 4)
    builder.start(torch.randn(4, 4, generator=generator).log_softmax(-1))
    for _ in range(2):
        builder.extend(torch.randn(4, 3, 4, generator=generator).log_softmax(-1))
    tree = builder.finalize()
    argmax = torch.randint(0, 4, (4, config.max_nodes + 1), generator=generator)
    one_hot = torch.nn.functional.one_hot(argmax, 4).float()
    greedy = greedy_verify(tree, argmax)
    sampled = sample_verify(tree, one_hot, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.output_tokens, sampled.output_tokens)
    assert torch.equal(greedy.accepted_nodes, sampled.accepted_nodes)
    law = acceptance_length_distribution(tree, one_hot)
    assert torch.equal(law, torch.nn.functional.one_hot(greedy.num_accepted, config.max_depth + 1).float())


# --------------------------------------------------------------------------- sampling is lossless


def test_first_token_follows_target_distribution() -> None:
    vocab = 6
    config = TreeConfig(top_k=3, max_depth=2, total_tokens=8)
    prefix = (3,)
    tree = toy_tree(config, prefix, vocab, stop=2, noise=1.0)
    rows = toy_rows(tree, prefix, vocab)
    batch_tree = repeat_tree(tree, TRIALS)
    result = sample_verify(batch_tree, rows.expand(TRIALS, -1, -1), generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(result.output_tokens[:, 0], minlength=vocab)
    assert chi_square_p_value(counts, rows[0, 0]) > SIGNIFICANCE
    # the tree really was used: some requests accepted at least one draft token
    assert int((result.num_accepted > 0).sum()) > TRIALS // 4


def test_first_two_tokens_follow_target_distribution() -> None:
    vocab = 4
    config = TreeConfig(top_k=2, max_depth=3, total_tokens=7)
    prefix = (1, 2)
    tree = toy_tree(config, prefix, vocab, stop=3, noise=0.3)
    rows = toy_rows(tree, prefix, vocab)
    generator = torch.Generator().manual_seed(2)
    result = sample_verify(repeat_tree(tree, TRIALS), rows.expand(TRIALS, -1, -1), generator=generator)
    first = result.output_tokens[:, 0]
    # where only one token came out, continue with plain target sampling
    after_first = torch.stack([toy_target(prefix + (t,), vocab) for t in range(vocab)])  # [vocab, vocab]
    continued = torch.multinomial(after_first[first], 1, generator=generator).squeeze(1)
    second = torch.where(result.num_accepted > 0, result.output_tokens[:, 1], continued)
    counts = torch.bincount(first * vocab + second, minlength=vocab * vocab)
    joint = (toy_target(prefix, vocab).unsqueeze(1) * after_first).flatten()
    assert chi_square_p_value(counts, joint) > SIGNIFICANCE
    assert int((result.num_accepted >= 2).sum()) > TRIALS // 20


def test_biased_sampler_would_be_caught() -> None:
    # the chi-square check has power: drawing from the draft instead of the target fails it
    vocab = 6
    target = toy_target((3,), vocab)
    biased = (target.log() + 0.3 * torch.randn(vocab, generator=torch.Generator().manual_seed(5))).softmax(-1)
    draws = torch.multinomial(biased, TRIALS, replacement=True, generator=torch.Generator().manual_seed(6))
    counts = torch.bincount(draws, minlength=vocab)
    assert chi_square_p_value(counts, target) < SIGNIFICANCE


def test_monte_carlo_acceptance_lengths_match_exact_law() -> None:
    vocab = 5
    config = TreeConfig(top_k=3, max_depth=3, total_tokens=14)
    prefix = (0, 4)
    tree = toy_tree(config, prefix, vocab, stop=3, noise=0.4)
    # sampling-shaped rows: temperature 0.8, top-p 0.9 on the toy logits
    rows = shape_probs(toy_rows(tree, prefix, vocab).log(), temperature=0.8, top_p=0.9)
    law = acceptance_length_distribution(tree, rows)[0]
    generator = torch.Generator().manual_seed(3)
    result = sample_verify(repeat_tree(tree, TRIALS), rows.expand(TRIALS, -1, -1), generator=generator)
    counts = torch.bincount(result.num_accepted, minlength=config.max_depth + 1)
    assert chi_square_p_value(counts, law) > SIGNIFICANCE
    assert float(law[1:].sum()) > 0.3  # nontrivial acceptance


# --------------------------------------------------------------------------- acceptance-length law


def test_acceptance_law_hand_example() -> None:
    # root -> {a=0, b=1}, a -> {c=2}; p_root(a)=.5, p_root(b)=.3, p_a(c)=.4
    tree = build_tree_from_parents([[-1, -1, 0]], [[0, 1, 2]])
    rows = torch.tensor([[[0.5, 0.3, 0.2], [0.3, 0.3, 0.4], [1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]]])
    law = acceptance_length_distribution(tree, rows)
    # L=0: 1-.5-.3; L=1: .5*(1-.4) + .3; L=2: .5*.4
    assert torch.allclose(law, torch.tensor([[0.2, 0.6, 0.2]]))
    assert torch.allclose(mean_acceptance_length(law), torch.tensor([1.0]))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(random_trees, st.integers(0, 2**31 - 1))
def test_law_formula_equals_sequential_rejection(tree_spec: tuple, seed: int) -> None:
    parents, tokens = tree_spec
    tree = build_tree_from_parents([list(parents)], [tokens])
    generator = torch.Generator().manual_seed(seed)
    rows = (torch.randn(1, tree.max_nodes + 1, 3, generator=generator) * 2).softmax(-1)
    law = acceptance_length_distribution(tree, rows)[0]
    expected = sequential_rejection_law(tree.to_lists()[0], rows[0], tree.max_depth)
    assert torch.allclose(law.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert abs(float(law.sum()) - 1.0) < 1e-5


def test_law_from_gathered_token_probs_matches() -> None:
    config = TreeConfig(top_k=3, max_depth=3, total_tokens=12)
    generator = torch.Generator().manual_seed(7)
    builder = DraftTreeBuilder(config, 3)
    builder.start(torch.randn(3, 6, generator=generator).log_softmax(-1))
    builder.extend(torch.randn(3, 3, 6, generator=generator).log_softmax(-1), torch.tensor([True, True, False]))
    builder.extend(torch.randn(3, 3, 6, generator=generator).log_softmax(-1))
    tree = builder.finalize()
    rows = torch.randn(3, config.max_nodes + 1, 6, generator=generator).softmax(-1)
    full = acceptance_length_distribution(tree, rows)
    cheap = acceptance_length_distribution_from_token_probs(tree, gather_node_token_probs(tree, rows))
    assert torch.allclose(full, cheap, atol=1e-6)
    assert torch.allclose(full.sum(-1), torch.ones(3), atol=1e-5)
    assert float(full[2, 2:].sum()) == 0.0  # stopped after the first call: at most 1 accepted


# --------------------------------------------------------------------------- shape_probs


def test_shape_probs_greedy_and_temperature() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=generator)
    probs = shape_probs(logits, temperature=torch.tensor([0.0, 0.7]))
    assert torch.equal(probs[0], torch.nn.functional.one_hot(logits[0].argmax(-1), 7).float())
    assert torch.allclose(probs[1], (logits[1] / 0.7).softmax(-1))


def test_shape_probs_top_k_and_top_p() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).log_softmax(-1).exp().log()
    base = logits.softmax(-1)[0].tolist()  # descending already
    # top-k 2 keeps the two largest
    probs = shape_probs(logits, 1.0, top_k=2)[0]
    assert torch.equal(probs > 0, torch.tensor([True, True, False, False, False]))
    # top-p: smallest prefix whose mass reaches p
    for p in (0.3, base[0] + base[1] - 1e-4, base[0] + base[1] + 1e-4, 1.0):
        kept = next(i for i in range(1, 6) if sum(base[:i]) >= p)
        probs = shape_probs(logits, 1.0, top_p=p)[0]
        assert int((probs > 0).sum()) == kept, p
        assert torch.allclose(probs[:kept], torch.tensor(base[:kept]) / sum(base[:kept]))
    # disabled top-k (0) and per-request parameters
    two = logits.expand(2, -1)
    probs = shape_probs(two, torch.tensor([1.0, 1.0]), top_p=torch.tensor([1.0, 0.3]), top_k=torch.tensor([0, 3]))
    assert torch.allclose(probs[0], logits.softmax(-1)[0])
    assert int((probs[1] > 0).sum()) == 1


def test_shape_probs_rejects_bad_parameters() -> None:
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="temperature"):
        shape_probs(logits, -1.0)
    with pytest.raises(ValueError, match="top_p"):
        shape_probs(logits, 1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        shape_probs(logits, 1.0, top_k=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        shape_probs(logits, torch.ones(3))


# --------------------------------------------------------------------------- bad input


def test_verify_rejects_mismatched_shapes() -> None:
    tree = build_tree_from_parents([[-1, 0], [-1]], [[1, 2], [3]])
    with pytest.raises(ValueError, match="target_argmax"):
        greedy_verify(tree, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target_probs"):
        sample_verify(tree, torch.ones(1, 3, 4))
    with pytest.raises(ValueError, match="target_probs"):
        acceptance_length_distribution(tree, torch.ones(2, 3))
    with pytest.raises(ValueError, match="node_token_probs"):
        acceptance_length_distribution_from_token_probs(tree, torch.ones(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_verify_on_cuda() -> None:
    tree = build_tree_from_parents([[-1, 0, -1]], [[1, 2, 0]], device="cuda")
    rows = torch.full((1, 4, 3), 1 / 3, device="cuda")
    result = sample_verify(tree, rows, generator=torch.Generator(device="cuda").manual_seed(0))
    assert result.output_tokens.device.type == "cuda"
    greedy = greedy_verify(tree, torch.tensor([[1, 2, 0, 0]], device="cuda"))
    assert greedy.output_tokens[0].tolist() == [1, 2, 0]
    assert acceptance_length_distribution(tree, rows).device.type == "cuda"
