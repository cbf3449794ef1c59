"""Pure parts of tree verification inside vLLM: positions, path rounds, acceptance rows,
compaction, drafter restart, spine trees, test oracle trees. No engine needed."""
from __future__ import annotations

import random

import pytest
import torch

from oracle_drafter import plant, random_tree

from radar_vllm.core.config import RadarConfig, ValidatedRadar
from radar_vllm.core.growth import ChainGrowth, FrontierGrowth
from radar_vllm.core.tree import (
    NO_PARENT,
    build_tree_from_parents,
    causal_exact_nodes,
    chain_parents,
    check_parents,
    cut_tree,
    is_chain,
    node_depths,
    node_path,
    recompute_paths,
    segment_positions,
)
from radar_vllm.core.config import TreeConfig
from radar_vllm.core.verify import (
    OUTPUT_PADDING,
    accept_tree,
    accept_trees,
    compaction_moves,
    output_rows,
    restart_order,
)
from radar_vllm.vllm.attention import (
    TreeVerifyPlan,
    frontier_scratch_rounds,
    max_scratch_blocks_per_job,
    path_rounds,
    scratch_blocks_per_job,
    scratch_compaction,
    scratch_rounds,
    scratch_tables,
)
from radar_vllm.vllm.proposer import tree_eligible


def _tree(parents, tokens):
    """One request's tree (batch of one) from a parent list."""
    return build_tree_from_parents([parents], [tokens], max_nodes=max(len(parents), 1),
                                   max_depth=max(node_depths(parents), default=1))


EXAMPLE = [-1, 0, -1, 1, 0]  # the worked example of tree_verify's docstring


def test_worked_example():
    assert node_depths(EXAMPLE) == [1, 2, 1, 3, 2]
    assert segment_positions(10, EXAMPLE) == [10, 11, 12, 11, 13, 12]
    assert causal_exact_nodes(EXAMPLE) == [True, True, False, False, False]
    assert node_path(EXAMPLE, 3) == [0, 1, 3]
    assert compaction_moves(0, [0, 4]) == [(5, 2)]
    assert restart_order(5, [0, 4]) == [0, 1, 5, 2, 3, 4]


def test_chain_helpers_and_validation():
    assert chain_parents(3) == [-1, 0, 1]
    assert chain_parents(0) == []
    assert is_chain([-1, 0, 1]) and not is_chain(EXAMPLE)
    check_parents(EXAMPLE)
    with pytest.raises(ValueError, match=r"parents\[1\]=1"):
        check_parents([-1, 1])
    assert cut_tree(EXAMPLE, 3) == [-1, 0, -1]
    with pytest.raises(ValueError, match="num_nodes"):
        cut_tree(EXAMPLE, 6)


def test_every_prefix_of_a_tree_is_a_tree():
    rng = random.Random(3)
    for _ in range(50):
        parents = random_tree(rng, rng.randint(1, 12), max_depth=4)
        assert max(node_depths(parents)) <= 4
        for n in range(len(parents) + 1):
            check_parents(cut_tree(parents, n))


def test_path_rounds_batch_one_node_per_request_per_round():
    # request 0 at rows 0..5 (context 10), request 1 at rows 6..8 (context 4, a chain: no rounds)
    rounds = path_rounds([(0, 0, 10, EXAMPLE), (1, 6, 4, [-1, 0]), (2, 9, 7, [-1, -1])])
    assert len(rounds) == 3
    first = rounds[0]
    # request 0 recomputes node 2 (row 3), request 2 its node 1 (row 11)
    assert torch.equal(first.query_rows, torch.tensor([3, 11]))
    assert torch.equal(first.request_indices, torch.tensor([0, 2]))
    assert torch.equal(first.seq_lens, torch.tensor([12, 9], dtype=torch.int32))
    # node 2's path [2] goes to row 1; request 2's node 1 path [1] goes to row 10
    assert torch.equal(first.source_rows, torch.tensor([3, 11]))
    assert torch.equal(first.destination_rows, torch.tensor([1, 10]))
    second = rounds[1]  # node 3, path [0, 1, 3] -> rows 1, 2, 4 written to rows 1, 2, 3
    assert torch.equal(second.query_rows, torch.tensor([4]))
    assert torch.equal(second.seq_lens, torch.tensor([14], dtype=torch.int32))
    assert torch.equal(second.source_rows, torch.tensor([1, 2, 4]))
    assert torch.equal(second.destination_rows, torch.tensor([1, 2, 3]))


def _paged_batch(rng, block_size, num_requests):
    """Requests with random trees laid out as vLLM does: rows of the step, block tables, a cache of labels.

    Label of a cache entry: ("ctx", request, position) for context tokens and the root, ("node", request, i)
    for tree node i (written by the platform into the slot of its segment row 1 + i)."""
    segments, labels_of_rows = [], {}
    cache = {}  # (block, offset) -> label
    tables = []
    next_block, row = 1, 0
    for request in range(num_requests):
        context_len = rng.randint(0, 3 * block_size)
        parents = random_tree(rng, rng.randint(1, 12), max_depth=6)
        total = context_len + 1 + len(parents)
        blocks = list(range(next_block, next_block + (total + block_size - 1) // block_size))
        next_block += len(blocks)
        tables.append(blocks)
        for position in range(total):
            label = ("ctx", request, position) if position <= context_len else ("node", request, position - context_len - 1)
            cache[(blocks[position // block_size], position % block_size)] = label
            if position >= context_len:  # rows of the step: the root and the nodes
                labels_of_rows[row + position - context_len] = label
        segments.append((request, row, context_len, parents))
        row += 1 + len(parents)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return segments, labels_of_rows, cache, table, next_block


@pytest.mark.parametrize("block_size,pool_size", [(4, 3), (8, 40), (16, 2)])
def test_scratch_rounds_show_each_row_its_context_root_and_path(block_size, pool_size):
    rng = random.Random(block_size * 100 + pool_size)
    for _ in range(20):
        segments, labels_of_rows, cache, table, first_free = _paged_batch(rng, block_size, rng.randint(1, 5))
        real = dict(cache)
        pool = list(range(first_free + 5, first_free + 5 + pool_size))
        needed = max(scratch_blocks_per_job(c, len(node_path(p, n)), block_size)
                     for _, _, c, p in segments for n in range(len(p)))
        if needed > pool_size:
            with pytest.raises(ValueError, match="scratch blocks"):
                scratch_rounds(segments, block_size, pool)
            continue
        rounds = scratch_rounds(segments, block_size, pool)
        seen_rows = []
        for step in rounds:
            used = step.table_blocks.tolist()
            assert len(used) == len(set(used)) and set(used) <= set(pool)  # private blocks within the pool
            for request, column, block in zip(step.copy_requests.tolist(), step.copy_columns.tolist(),
                                              step.copy_blocks.tolist()):  # whole-block copies
                source = int(table[request, column])
                for offset in range(block_size):
                    if (source, offset) in cache:
                        cache[(block, offset)] = cache[(source, offset)]
            for source_row, slot in zip(step.source_rows.tolist(), step.destination_slots.tolist()):
                cache[(slot // block_size, slot % block_size)] = labels_of_rows[source_row]
            rows_table = table[step.request_indices].clone()
            rows_table[step.table_jobs, step.table_columns] = step.table_blocks.to(torch.int32)
            starts = step.query_start.tolist()
            assert starts[0] == 0 and starts[-1] == step.query_rows.numel()
            for j, (request, seq_len) in enumerate(zip(step.request_indices.tolist(), step.seq_lens.tolist())):
                _, first_row, context_len, parents = segments[request]
                job_rows = step.query_rows[starts[j] : starts[j + 1]].tolist()
                assert job_rows  # every job recomputes at least one row
                for i, row in enumerate(job_rows):  # causal: row i sees the first L - q + i + 1 tokens
                    node = row - first_row - 1
                    expected = [("ctx", request, p) for p in range(context_len + 1)]
                    expected += [("node", request, n) for n in node_path(parents, node)]
                    visible = seq_len - len(job_rows) + i + 1
                    seen = [cache.get((int(rows_table[j, p // block_size]), p % block_size)) for p in range(visible)]
                    assert seen == expected
                    seen_rows.append(row)
        # the rows recomputed are exactly the nodes that are not causal-exact, each once
        expected_rows = [first_row + 1 + n for _, first_row, _, p in segments
                         for n, exact in enumerate(causal_exact_nodes(p)) if not exact]
        assert sorted(seen_rows) == expected_rows
        # the requests' own blocks were never written
        assert all(cache[key] == label for key, label in real.items())
        jobs = [(c, path) for _, _, c, p in segments for path, _ in recompute_paths(p)]
        # fewer jobs than rows where paths share nodes: one job per leaf
        assert len(jobs) <= len(expected_rows)
        # one round unless the pool ran out
        if pool_size >= sum(scratch_blocks_per_job(c, len(path), block_size) for c, path in jobs):
            assert len(rounds) == (1 if expected_rows else 0)
        if len(rounds) == 1:
            _check_scratch_compaction(rounds, segments, cache, table, block_size)


def _check_scratch_compaction(rounds, segments, cache, table, block_size):
    """After one scratch round, accepting the path to any node that is not causal-exact and copying
    the blocks scratch_compaction names leaves the request's context, root and that path (depth
    order) at positions 0 .. context + depth of its own blocks, and no other request's block changed."""
    plan = TreeVerifyPlan(rounds=rounds, node_rows=torch.zeros(0, dtype=torch.long))
    scratch_tables(plan, 0, rounds[0], table)
    for request, first_row, context_len, parents in segments:
        for node, exact in enumerate(causal_exact_nodes(parents)):
            if exact:
                continue
            path = node_path(parents, node)
            sources, destinations = scratch_compaction(plan, block_size, [(first_row + 1 + node, context_len, len(path))])
            assert sources.numel() == destinations.numel() > 0
            assert set(destinations.tolist()) <= set(table[request].tolist())  # only this request's blocks
            after = dict(cache)
            for source, destination in zip(sources.tolist(), destinations.tolist()):
                for offset in range(block_size):
                    after.pop((destination, offset), None)
                    if (source, offset) in cache:
                        after[(destination, offset)] = cache[(source, offset)]
            expected = [("ctx", request, p) for p in range(context_len + 1)] + [("node", request, n) for n in path]
            seen = [after.get((int(table[request, p // block_size]), p % block_size))
                    for p in range(context_len + 1 + len(path))]
            assert seen == expected


@pytest.mark.parametrize("block_size,pool_size", [(4, 2), (4, 64), (8, 5), (16, 200)])
def test_frontier_scratch_rounds_show_each_row_its_context_and_path(block_size, pool_size):
    """Every row of a frontier pass sees its request's context up to the root and then its own
    path (ancestors from earlier passes, itself last), at the right positions; the requests'
    blocks are never written; rows past max_model_len or of requests not drafting write nothing."""
    rng = random.Random(block_size * 1000 + pool_size)
    max_model_len = 12 * block_size
    for _ in range(15):
        batch, top_k, depth = rng.randint(1, 4), rng.randint(1, 4), rng.randint(2, 6)
        level = depth - 1
        base = torch.tensor([rng.randint(0, max_model_len - 2) for _ in range(batch)])
        drafting = torch.tensor([rng.random() < 0.8 for _ in range(batch)])
        cache, width = {}, max_model_len // block_size
        tables = []
        for b in range(batch):  # request b owns blocks b * width ... ; context = positions 0..base[b]
            tables.append([b * width + c for c in range(width)])
            for position in range(int(base[b]) + 1):
                cache[(tables[b][position // block_size], position % block_size)] = ("ctx", b, position)
        table = torch.tensor(tables, dtype=torch.int32)
        real = dict(cache)
        pool = list(range(batch * width + 3, batch * width + 3 + pool_size))
        anc_pass = torch.arange(max(level - 1, 1)).expand(batch, top_k, -1).clone()
        anc_rows = torch.randint(0, batch * top_k, (batch, top_k, max(level - 1, 1)))
        last = max_model_len - 1  # blocks a row spans, positions past max_model_len counted as its last
        needed = 1 + max(min(int(b) + level, last) // block_size - min(int(b) + 1, last) // block_size for b in base)
        if needed > pool_size:
            with pytest.raises(ValueError, match="scratch blocks"):
                frontier_scratch_rounds(depth, base, table, anc_pass, anc_rows, drafting, block_size,
                                        max_model_len, pool)
            continue
        rounds = frontier_scratch_rounds(depth, base, table, anc_pass, anc_rows, drafting, block_size,
                                         max_model_len, pool)
        seen_rows = []
        for step in rounds:
            assert step.copy_sources.numel() == step.copy_blocks.numel()
            for source, block in zip(step.copy_sources.tolist(), step.copy_blocks.tolist()):
                assert block in pool
                for offset in range(block_size):
                    if (source, offset) in cache:
                        cache[(block, offset)] = cache[(source, offset)]
            for pass_index, row, slot in zip(step.source_pass.tolist(), step.source_rows.tolist(),
                                             step.destination_slots.tolist()):
                if slot >= 0:
                    assert slot // block_size in pool
                    cache[(slot // block_size, slot % block_size)] = ("pass", pass_index, row)
            for i, (row, seq_len) in enumerate(zip(step.query_rows.tolist(), step.seq_lens.tolist())):
                b, f = divmod(row, top_k)
                p = int(base[b])
                assert seq_len == min(p + 1 + level, max_model_len)
                path = [("pass", k, int(anc_rows[b, f, k])) for k in range(level - 1)] + [("pass", depth - 2, row)]
                expected = [("ctx", b, q) for q in range(p + 1)] + path
                seen = [cache.get((int(step.block_table[i, q // block_size]), q % block_size)) for q in range(seq_len)]
                if bool(drafting[b]):
                    assert seen == expected[:seq_len]
                seen_rows.append(row)
            # written slots: inside max_model_len and drafting only
            written = (step.destination_slots >= 0).view(-1, level)
            for i, row in enumerate(step.query_rows.tolist()):
                b = row // top_k
                inside = [bool(drafting[b]) and int(base[b]) + 1 + k < max_model_len for k in range(level)]
                assert written[i].tolist() == inside
        assert sorted(seen_rows) == list(range(batch * top_k))  # every row of the pass once
        assert all(cache[key] == label for key, label in real.items())  # the requests' blocks untouched
        per_row = needed
        if pool_size >= batch * top_k * per_row:
            assert len(rounds) == 1


def test_scratch_blocks_per_job_bounds():
    for block_size in (1, 4, 16, 128):
        for path_len in range(1, 10):
            worst = max(scratch_blocks_per_job(c, path_len, block_size) for c in range(3 * block_size))
            assert worst == max_scratch_blocks_per_job(path_len, block_size)
    assert scratch_blocks_per_job(14, 1, 16) == 1  # root at 14, path at position 15
    assert scratch_blocks_per_job(14, 2, 16) == 2  # path at 15 and 16


def test_compaction_never_reads_a_row_it_already_wrote():
    rng = random.Random(5)
    for _ in range(100):
        parents = random_tree(rng, rng.randint(1, 10), max_depth=5)
        node = rng.randrange(len(parents))
        path = node_path(parents, node)
        moves = compaction_moves(7, path)
        written = set()
        for source, destination in moves:
            assert source not in written
            assert destination <= source
            written.add(destination)
        order = restart_order(len(parents), path)
        assert sorted(order) == list(range(len(parents) + 1))
        assert order[: len(path) + 1] == [0] + [1 + p for p in path]


def _brute_force_greedy(parents, tokens, argmax_rows):
    """Depth-first search for the longest accepted path; among equally deep ones, the one whose
    last node comes first in node order."""
    best: list[int] = []

    def visit(path: list[int]) -> None:
        nonlocal best
        if len(path) > len(best) or (path and len(path) == len(best) and path[-1] < best[-1]):
            best = list(path)
        row = 1 + path[-1] if path else 0
        parent = path[-1] if path else NO_PARENT
        for child, p in enumerate(parents):
            if p == parent and tokens[child] == argmax_rows[row]:
                visit(path + [child])

    visit([])
    bonus_row = 1 + best[-1] if best else 0
    return best, argmax_rows[bonus_row]


def test_greedy_acceptance_matches_a_brute_force_walk_and_fills_vllm_rows():
    rng = random.Random(11)
    vocab = 6
    for trial in range(40):
        parents = random_tree(rng, rng.randint(1, 8), max_depth=4)
        tokens = [rng.randrange(vocab) for _ in parents]
        offset = rng.randrange(3)
        logits = torch.randn(offset + len(parents) + 1, vocab, generator=torch.Generator().manual_seed(trial))
        argmax_rows = logits[offset:].argmax(dim=-1).tolist()
        # make acceptance likely: copy the parent's argmax into some nodes
        for i, p in enumerate(parents):
            if rng.random() < 0.6:
                tokens[i] = argmax_rows[0 if p == NO_PARENT else p + 1]
        rows = logits[offset : offset + len(parents) + 1]
        result, law = accept_tree(_tree(parents, tokens), rows, 0.0, None, None, None, with_law=True)
        assert float(law[len(_brute_force_greedy(parents, tokens, argmax_rows)[0])]) == 1.0
        expected_path, expected_bonus = _brute_force_greedy(parents, tokens, argmax_rows)
        assert int(result.num_accepted[0]) == len(expected_path)
        # equally deep accepted nodes carry equal tokens; compare the emitted tokens
        sampled = torch.full((3, 10), 7, dtype=torch.int32)
        output_rows([1], result, sampled)
        emitted = [tokens[n] for n in expected_path] + [expected_bonus]
        assert sampled[1, : len(emitted)].tolist() == emitted
        assert (sampled[1, len(emitted):] == OUTPUT_PADDING).all()
        assert (sampled[0] == 7).all() and (sampled[2] == 7).all()


def test_a_steps_trees_accepted_together_equal_each_accepted_alone():
    """accept_trees: the greedy requests in one batched walk, the sampling ones each with its own
    shaping and generator; every request's result, law and output row is what accept_tree gives it
    alone (the greedy walk over padded trees and gathered rows included)."""
    rng = random.Random(5)
    vocab = 7
    for trial in range(12):
        batch = rng.randint(1, 6)
        parent_lists = [random_tree(rng, rng.randint(1, 7), max_depth=4) for _ in range(batch)]
        token_lists = [[rng.randrange(vocab) for _ in parents] for parents in parent_lists]
        logits = torch.randn(sum(len(p) + 1 for p in parent_lists) + 3, vocab,
                             generator=torch.Generator().manual_seed(trial))
        first_rows, row = [], 2  # (two rows of other requests first)
        for b, parents in enumerate(parent_lists):
            argmax = logits[row: row + len(parents) + 1].argmax(dim=-1).tolist()
            for i, p in enumerate(parents):  # make acceptance likely
                if rng.random() < 0.6:
                    token_lists[b][i] = argmax[0 if p == NO_PARENT else p + 1]
            first_rows.append(row)
            row += len(parents) + 1
        tree = build_tree_from_parents(parent_lists, token_lists, max_nodes=8, max_depth=4)
        temperatures = [rng.choice([0.0, 0.0, 0.7, 1.0]) for _ in range(batch)]
        top_ps = [rng.choice([None, 0.9]) for _ in range(batch)]
        top_ks = [rng.choice([None, 3]) for _ in range(batch)]
        seeds = [rng.randrange(1000) for _ in range(batch)]
        together, laws = accept_trees(tree, logits, first_rows, temperatures, top_ps, top_ks,
                                      [torch.Generator().manual_seed(seed) for seed in seeds], with_law=True)
        sampled = torch.full((batch + 1, 9), 7, dtype=torch.int32)
        output_rows(list(range(1, batch + 1)), together, sampled)
        for b, parents in enumerate(parent_lists):
            alone, law = accept_tree(tree.select([b]).narrow(len(parents)),
                                     logits[first_rows[b]: first_rows[b] + len(parents) + 1], temperatures[b],
                                     top_ps[b], top_ks[b], torch.Generator().manual_seed(seeds[b]), with_law=True)
            count = int(alone.num_accepted[0])
            assert int(together.num_accepted[b]) == count
            assert together.accepted_nodes[b].tolist() == alone.accepted_nodes[0].tolist()
            assert together.output_tokens[b].tolist() == alone.output_tokens[0].tolist()
            assert torch.allclose(laws[b], law)
            assert sampled[b + 1, : count + 1].tolist() == alone.output_tokens[0, : count + 1].tolist()
            assert (sampled[b + 1, count + 1:] == OUTPUT_PADDING).all()
        assert (sampled[0] == 7).all()
    with pytest.raises(ValueError, match="temperatures has 1 entries for 2 trees"):
        two = build_tree_from_parents([[-1], [-1]], [[1], [2]], max_nodes=1, max_depth=1)
        accept_trees(two, torch.zeros(4, 3), [0, 2], [0.0], [None] * 2, [None] * 2, [None] * 2)


def test_sampled_acceptance_first_token_follows_the_target():
    """The first emitted token of a flat tree is distributed as the shaped target row."""
    vocab = 5
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]] + [[0.0] * vocab] * 3)
    tree = _tree([-1, -1, -1], [1, 0, 3])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(vocab)
    trials = 1000
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread wake-ups would dominate
    try:
        for _ in range(trials):
            result, _ = accept_tree(tree, logits, 0.8, None, None, generator)
            counts[int(result.output_tokens[0, 0])] += 1
    finally:
        torch.set_num_threads(threads)
    expected = torch.softmax(logits[0] / 0.8, dim=-1) * trials
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, significance 0.001 (zero-mass tokens excluded)


def test_growth_strategies_agree_at_width_one_and_chains_pad_after_the_stop():
    """A frontier tree of width 1 is the chain; a chain stops where the policy said so."""
    generator = torch.Generator().manual_seed(3)
    batch, vocab, depth = 3, 11, 4
    chain = ChainGrowth(batch, depth, state_size=2, device=torch.device("cpu"))
    frontier = FrontierGrowth(TreeConfig(top_k=1, max_depth=depth, total_tokens=depth + 1), batch, 1, torch.device("cpu"))
    calls = [torch.randn(batch, vocab, generator=generator) for _ in range(depth)]
    chain.start(calls[0])
    frontier.start(calls[0])
    assert torch.equal(chain.inputs(), frontier.inputs())
    # (a request stopping after the first call would get a flat tree of the root's best tokens)
    actives = [torch.tensor([True, True, True]), torch.tensor([True, False, True]), torch.tensor([True, False, False])]
    for logits, active in zip(calls[1:], actives):
        assert torch.equal(chain.parent_slots(), frontier.parent_slots())
        chain.extend(logits.unsqueeze(1), active)
        frontier.extend(logits.unsqueeze(1), active)
        assert chain.policy_state().shape == (batch, 2)
    chain_tree, frontier_tree = chain.finish(), frontier.finish()
    assert chain_tree.num_nodes.tolist() == [4, 2, 3] == frontier_tree.num_nodes.tolist()
    assert chain_tree.stop_depth.tolist() == [4, 2, 3] == frontier_tree.stop_depth.tolist()
    for mine, theirs in zip(chain_tree.to_lists(), frontier_tree.to_lists()):
        assert mine["target_tokens"] == theirs["target_tokens"] and mine["parents"] == theirs["parents"]
    assert chain_tree.target_tokens[0].tolist() == [int(c[0].argmax()) for c in calls]


def test_tree_eligibility():
    class Params:
        structured_outputs = None
        logprobs = None
        presence_penalty = 0.0
        frequency_penalty = 0.0
        repetition_penalty = 1.0
        bad_words = None
        logit_bias = None
        allowed_token_ids = None
        min_tokens = 0
        min_p = 0.0

    assert tree_eligible(Params())
    assert not tree_eligible(Params(), has_custom_logits_processors=True)
    assert not tree_eligible(None)
    for name, value in [("logprobs", 2), ("repetition_penalty", 1.1), ("min_tokens", 3), ("structured_outputs", {})]:
        params = Params()
        setattr(params, name, value)
        assert not tree_eligible(params), name


def test_oracle_plants_the_truth_along_a_path():
    rng = random.Random(0)
    planted = 0
    for _ in range(50):
        parents = random_tree(rng, 6, max_depth=3)
        truth = [101, 102, 103]
        tokens = plant(rng, parents, truth, vocab=50)
        # some node path carries a prefix of the truth of length >= 1 in most draws
        for node in range(len(parents)):
            path = node_path(parents, node)
            if [tokens[n] for n in path] == truth[: len(path)]:
                planted += 1
                break
    assert planted >= 30


def test_best_chain_follows_the_first_child():
    # node order is by score: node 0 is the best depth-1 node, node 1 its best child, ...
    parents, tokens = [-1, 0, -1, 1, 0, 3], [5, 6, 7, 8, 9, 10]
    trees = build_tree_from_parents([parents, [-1, -1]], [tokens, [1, 2]], max_nodes=6, max_depth=4)
    chains = trees.best_chains(torch.tensor([True, False])).to_lists()
    assert (chains[0]["parents"], chains[0]["target_tokens"]) == ([-1, 0, 1, 2], [5, 6, 8, 10])
    assert (chains[1]["parents"], chains[1]["target_tokens"]) == ([-1, -1], [1, 2])  # kept as it was
    assert trees.best_chains(torch.tensor([True, True])).num_nodes.tolist() == [4, 1]


def test_scratch_pool_size_is_agreed_from_the_engine_plan():
    from types import SimpleNamespace

    from radar_vllm.vllm import engine_plan as plans

    def config(scratch_blocks, nodes=59, block_size=16):
        radar = ValidatedRadar(config=RadarConfig(mode="tree", scratch_blocks=scratch_blocks), checkpoint_dir="c",
                               policy_path="p", policy_threshold=0.5, policy_decision="threshold")
        plan = plans.EnginePlan(radar=radar, worker_cls="w", radar_scheduler=True, scratch_blocks=scratch_blocks)
        hf_config = SimpleNamespace(**{plans.PLAN_KEY: plan.to_dict()})
        return SimpleNamespace(speculative_config=SimpleNamespace(
            num_speculative_tokens=nodes, draft_model_config=SimpleNamespace(hf_config=hf_config)),
            cache_config=SimpleNamespace(block_size=block_size))

    assert plans.scratch_block_count(config(0), 1000) == 0  # opt-in
    tree = config(64)
    assert plans.engine_plan(tree).scratch_blocks == 64
    assert plans.scratch_block_count(tree, 1000) == 64
    assert plans.scratch_block_count(tree, 80) == 10  # at most 1/8 of the cache
    # A pool that cannot serve the cache is not reserved at all (scheduler and runner agree):
    # more than one KV-cache group, or fewer blocks than a 59-node path needs (ceil(57/16) + 2).
    assert plans.min_scratch_blocks(59, 16) == 6
    assert plans.scratch_block_count(tree, 1000, num_kv_cache_groups=2) == 0
    assert plans.scratch_block_count(tree, 48) == 6 and plans.scratch_block_count(tree, 40) == 0
    # The bound holds for every kernel block size dividing the manager block size.
    for kernel_block in (1, 2, 4, 8, 16):
        blocks = plans.scratch_block_ids(48, 6, blocks_per_manager_block=16 // kernel_block)
        assert len(blocks) >= max_scratch_blocks_per_job(59, kernel_block)
    assert plans.scratch_block_ids(10, 3) == [7, 8, 9]
    assert plans.scratch_block_ids(10, 2, blocks_per_manager_block=2) == [16, 17, 18, 19]
    with pytest.raises(ValueError, match="scratch block count"):
        plans.scratch_block_ids(4, 5)


def test_recompute_paths_cover_each_inexact_node_once_through_its_ancestors():
    assert recompute_paths([-1, 0, -1, 1, 0]) == [([2], 0), ([0, 1, 3], 2), ([0, 4], 1)]
    assert recompute_paths([-1, 0, 1]) == []  # a chain is causal-exact
    rng = random.Random(7)
    for _ in range(200):
        parents = random_tree(rng, rng.randint(1, 14), max_depth=6)
        paths = recompute_paths(parents)
        covered = [node for path, first in paths for node in path[first:]]
        exact = causal_exact_nodes(parents)
        assert sorted(covered) == [n for n in range(len(parents)) if not exact[n]]  # each once
        seen = {n for n in range(len(parents)) if exact[n]}
        for path, first in paths:
            assert path == node_path(parents, path[-1])  # a root-to-node path ...
            assert not any(parent == path[-1] for parent in parents)  # ... to a leaf
            assert set(path[:first]) <= seen and not set(path[first:]) & seen  # covered prefix, new suffix
            seen |= set(path)
