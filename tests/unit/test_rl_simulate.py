"""The simulator: stop laws, ratio-of-sums throughput and the Dinkelbach oracle."""
from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radar_vllm.core.costs import CostTable
from radar_vllm.offline.rl.simulate import (
    evaluate_fixed_depth,
    evaluate_stop_probs,
    log_stop_distribution,
    oracle,
    round_outcomes,
    stop_distribution,
)
from radar_vllm.offline.rl.table import RoundTable, TableMetadata


def make_table(accept_probs: torch.Tensor, tree_sizes: torch.Tensor) -> RoundTable:
    num_rounds, depth, _ = accept_probs.shape
    metadata = TableMetadata(model_id="m", head_id="h", temperature=1.0, mode="tree", top_k=2,
                             max_depth=depth, total_tokens=12, state_size=2)
    return RoundTable(states=torch.zeros(num_rounds, depth, 2), accept_probs=accept_probs,
                      tree_sizes=tree_sizes.to(torch.int32),
                      prompt_index=torch.arange(num_rounds), metadata=metadata)


def make_costs(verify=(1.0, 2.0), first=0.0, step=0.5, policy=0.0, decode=0.8) -> CostTable:
    return CostTable(verify_num_nodes=(1, 11), verify_seconds=verify, first_draft_seconds=first,
                     draft_step_seconds=step, policy_step_seconds=policy,
                     decode_step_seconds=decode, engine="test", model_id="m", head_id="h",
                     machine={"cpu_model": "test"})


def test_throughput_is_a_ratio_of_sums() -> None:
    # Round A: one accepted draft in a 1-node tree (verify 1.0 s); round B: none, 11 nodes (2.0 s).
    probs = torch.zeros(2, 1, 2)
    probs[0, 0, 1] = 1.0
    probs[1, 0, 0] = 1.0
    table = make_table(probs, torch.tensor([[1], [11]]))
    result = evaluate_fixed_depth(round_outcomes(table, make_costs()), 1)
    # (2 + 1) tokens / (1.0 + 2.0) s = 1.0 token/s; the mean of ratios would be 1.25.
    assert result.tokens_per_second == 1.0
    assert result.mean_acceptance_length == 1.5
    assert result.mean_accepted == 0.5
    assert result.mean_draft_calls == 1.0


def test_depth_zero_and_policy_cost() -> None:
    probs = torch.zeros(1, 2, 3)
    probs[0, 0, 1] = 1.0
    probs[0, 1, 2] = 1.0
    table = make_table(probs, torch.tensor([[1, 1]]))
    outcomes = round_outcomes(table, make_costs(policy=0.25))
    assert evaluate_fixed_depth(outcomes, 0).tokens_per_second == 1.0 / 0.8
    # Policy stopping after 2 calls: 1 decision (after call 1), forced stop after call 2.
    stop = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    result = evaluate_stop_probs("p", outcomes, stop, policy_cost=True)
    assert math.isclose(result.total_seconds, 1.0 + 0.5 + 0.25)
    assert result.total_tokens == 3.0


def test_stop_distribution_matches_enumeration() -> None:
    generator = torch.Generator().manual_seed(0)
    cont = torch.rand(5, 4, generator=generator, dtype=torch.float64)
    law = stop_distribution(cont)
    assert torch.allclose(law.sum(1), torch.ones(5, dtype=torch.float64))
    for r in range(5):
        for d in range(1, 5):
            expected = math.prod(float(cont[r, t]) for t in range(d - 1))
            if d < 4:
                expected *= 1.0 - float(cont[r, d - 1])
            assert math.isclose(float(law[r, d - 1]), expected, rel_tol=1e-12)
    logits = torch.randn(5, 4, 2, generator=generator, dtype=torch.float64)
    probs = torch.softmax(logits, -1)[..., 1]
    log_law = log_stop_distribution(logits[..., 1], logits[..., 0])
    assert torch.allclose(log_law.exp(), stop_distribution(probs), atol=1e-12)


@st.composite
def random_problems(draw):
    num_rounds = draw(st.integers(1, 5))
    depth = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(num_rounds, depth, depth + 1, generator=generator, dtype=torch.float64)
    weights = weights ** 3  # skewed laws
    allowed = torch.arange(depth + 1)[None, :] <= torch.arange(1, depth + 1)[:, None]
    weights = weights * allowed
    probs = (weights / weights.sum(-1, keepdim=True)).float()
    sizes = torch.randint(1, 12, (num_rounds, depth), generator=generator)
    values = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
    costs = make_costs(verify=(0.2 + values[0], 0.2 + values[0] + values[1]),
                       first=values[2], step=values[3] * 0.5, policy=values[4] * 0.1,
                       decode=0.1 + values[5])
    return make_table(probs, sizes), costs


@settings(max_examples=60, deadline=None)
@given(random_problems())
def test_oracle_never_loses_and_is_the_true_optimum(problem) -> None:
    table, costs = problem
    outcomes = round_outcomes(table, costs)
    best = oracle(outcomes)
    for depth in range(table.max_depth + 1):
        fixed = evaluate_fixed_depth(outcomes, depth).tokens_per_second
        assert best.result.tokens_per_second >= fixed * (1.0 - 1e-12)
    # Brute force over every per-round choice of stop (0..D).
    tokens = torch.cat([torch.ones(outcomes.num_rounds, 1, dtype=torch.float64),
                        outcomes.tokens], 1)
    times = torch.cat([torch.full((outcomes.num_rounds, 1), costs.decode_step_seconds,
                                  dtype=torch.float64), outcomes.times_fixed], 1)
    brute = max(
        sum(float(tokens[r, c]) for r, c in enumerate(choice)) /
        sum(float(times[r, c]) for r, c in enumerate(choice))
        for choice in itertools.product(range(table.max_depth + 1), repeat=outcomes.num_rounds)
    )
    assert math.isclose(best.result.tokens_per_second, brute, rel_tol=1e-9)
    rows = torch.arange(outcomes.num_rounds)
    chosen = float(tokens[rows, best.choice].sum() / times[rows, best.choice].sum())
    assert math.isclose(chosen, best.result.tokens_per_second, rel_tol=1e-12)
