"""Trainers on synthetic tables whose best stop is known."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from radar_vllm.offline.rl.evaluate import deterministic_rule_stop_depths, evaluate_rules
from radar_vllm.offline.rl.rules import evaluate_policy
from radar_vllm.offline.rl.simulate import (
    best_fixed_depth,
    evaluate_fixed_depth,
    round_outcomes,
)
from radar_vllm.offline.rl.synthetic import make_synthetic_costs, make_synthetic_table
from radar_vllm.offline.rl.table import RoundTable
from radar_vllm.offline.rl.train import (
    ExactConfig,
    ReinforceConfig,
    expected_paper_return,
    train_exact,
    train_exact_with_budget,
    train_reinforce,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def step_table(num_rounds: int, max_depth: int, useful_depth: int) -> RoundTable:
    """Every round accepts exactly min(d, useful_depth) drafts when stopped after d calls."""
    base = make_synthetic_table(num_rounds, max_depth=max_depth, rates=[0.8], seed=1)
    probs = torch.zeros(num_rounds, max_depth, max_depth + 1)
    for d in range(1, max_depth + 1):
        probs[:, d - 1, min(d, useful_depth)] = 1.0
    return RoundTable(states=base.states, accept_probs=probs, tree_sizes=base.tree_sizes,
                      prompt_index=base.prompt_index, metadata=base.metadata)


def test_both_trainers_learn_the_known_best_depth() -> None:
    table = step_table(320, max_depth=5, useful_depth=2)
    costs = make_synthetic_costs()
    train, validation = table.split(0.25, seed=0)
    outcomes = round_outcomes(validation, costs)
    assert best_fixed_depth(outcomes).name == "depth 2"
    # The paper's reward also prefers depth 2 here (alpha 0.02, beta scaled automatically).
    exact = train_exact(train, validation, costs, ExactConfig(epochs=10, batch_size=64, lr=3e-3))
    reinforce = train_reinforce(train, validation, costs,
                                ReinforceConfig(epochs=20, lr=3e-3, seed=1))
    for result in (exact, reinforce):
        depths = deterministic_rule_stop_depths(result.policy, validation)
        assert torch.equal(depths, torch.full_like(depths, 2))


def test_exact_trainer_learns_an_interior_depth_with_a_small_margin() -> None:
    # Geometric acceptance with rate 0.7: depth 3 beats depths 2 and 4 by about 2%.
    table = make_synthetic_table(300, max_depth=5, rates=[0.7], seed=2)
    costs = make_synthetic_costs()
    train, validation = table.split(0.2, seed=0)
    outcomes = round_outcomes(validation, costs)
    fixed = [evaluate_fixed_depth(outcomes, d).tokens_per_second for d in range(6)]
    assert max(range(6), key=lambda d: fixed[d]) == 3
    result = train_exact(train, validation, costs, ExactConfig(epochs=15, batch_size=64))
    depths = deterministic_rule_stop_depths(result.policy, validation)
    assert torch.equal(depths, torch.full_like(depths, 3))


def test_exact_policy_beats_best_fixed_depth_on_heterogeneous_rounds() -> None:
    table = make_synthetic_table(900, max_depth=5, seed=3)
    costs = make_synthetic_costs()
    rest, heldout = table.split(0.3, seed=1)
    train, validation = rest.split(0.2, seed=2)
    result = train_exact(train, validation, costs, ExactConfig(epochs=15, batch_size=64))
    report = evaluate_rules(heldout, costs, {"ours": result.policy})
    best = report.summary["best_fixed_tokens_per_second"]
    ours = report.row("ours (threshold)").tokens_per_second
    top = report.summary["oracle_tokens_per_second"]
    assert ours > 1.03 * best
    assert ours <= top
    assert report.summary["rules"]["ours (threshold)"]["gap_closed"] > 0.5


def test_expected_paper_return_matches_hand_computation() -> None:
    table = step_table(4, max_depth=3, useful_depth=3)
    costs = make_synthetic_costs()
    outcomes = round_outcomes(table, costs)
    stop = torch.zeros(4, 3, dtype=torch.float64)
    stop[:, 2] = 1.0  # stop after 3 calls: A = 2 continues, L = 3
    time3 = 0.1 + 2 * 0.15 + 0.9 + 2 * 0.01
    expected = -0.1 * (1 + 0.9) + 0.9 ** 2 * 2.0 * 3 / time3
    value = expected_paper_return(stop, outcomes, alpha=0.1, beta=2.0, gamma=0.9)
    assert abs(value - expected) < 1e-9


def test_training_refuses_costs_of_another_head() -> None:
    table = make_synthetic_table(40, max_depth=3, state_size=4)
    costs = make_synthetic_costs(head_id="other-head")
    train, validation = table.split(0.25)
    with pytest.raises(ValueError, match="head"):
        train_exact(train, validation, costs, ExactConfig(epochs=1))
    with pytest.raises(ValueError, match="epochs"):
        ExactConfig(epochs=0)
    with pytest.raises(ValueError, match="gamma"):
        ReinforceConfig(gamma=0.0)


def test_exact_trainer_defaults_learn_from_a_small_table() -> None:
    # Few rounds make one batch per epoch: the defaults must still take enough optimiser steps
    # (and no weight decay) for the LSTM to stop after the second call. Regression: with 30
    # single-batch epochs and weight decay 1e-4 the policy stayed at its initial always-continue.
    table = step_table(200, max_depth=7, useful_depth=2)
    costs = make_synthetic_costs()
    train, validation = table.split(0.25, seed=0)
    result = train_exact(train, validation, costs, ExactConfig())
    depths = deterministic_rule_stop_depths(result.policy, validation)
    assert torch.equal(depths, torch.full_like(depths, 2))


def test_acceptance_budget_keeps_acceptance_near_full_depth_with_fewer_calls() -> None:
    # Rounds with acceptance rates 0.2-0.9: the throughput policy stops the weak rounds early and
    # loses more than 1% of full depth's acceptance; the budgeted one must not.
    table = make_synthetic_table(400, max_depth=5, rate_range=(0.2, 0.9), seed=3)
    costs = make_synthetic_costs()
    train, validation = table.split(0.25, seed=0)
    config = ExactConfig(epochs=30, batch_size=64, lr=3e-3, min_steps=0)
    train_outcomes, val_outcomes = round_outcomes(train, costs), round_outcomes(validation, costs)

    full = evaluate_fixed_depth(val_outcomes, 5)
    plain = evaluate_policy("plain", train_exact(train, validation, costs, config).policy,
                            validation.states, val_outcomes)
    assert plain.mean_acceptance_length < 0.98 * full.mean_acceptance_length

    budget = 0.01
    result = train_exact_with_budget(train, validation, costs,
                                     replace(config, acceptance_budget=budget))
    search = result.record["budget_search"]
    assert search["met_on_train"] and search["chosen_token_weight"] > 1.0
    on_train = evaluate_policy("budget", result.policy, train.states, train_outcomes)
    assert on_train.mean_acceptance_length >= (1 - budget) * float(
        train_outcomes.tokens[:, -1].mean())
    on_val = evaluate_policy("budget", result.policy, validation.states, val_outcomes)
    assert on_val.mean_acceptance_length >= 0.98 * full.mean_acceptance_length
    assert on_val.mean_draft_calls <= 0.9 * 5
    # Cheaper than full depth, and the budget costs throughput against the unconstrained policy.
    assert full.tokens_per_second < on_val.tokens_per_second < plain.tokens_per_second
    # Trials grow the token weight until the budget holds, then bisect.
    weights = [trial["token_weight"] for trial in search["trials"]]
    assert weights[0] == 1.0 and not search["trials"][0]["meets_budget"]


def test_acceptance_budget_is_validated() -> None:
    with pytest.raises(ValueError, match="acceptance_budget"):
        ExactConfig(acceptance_budget=1.0)
    with pytest.raises(ValueError, match="token_weight"):
        ExactConfig(token_weight=0.5)
    table = make_synthetic_table(40, max_depth=3, seed=0)
    with pytest.raises(ValueError, match="acceptance_budget"):
        train_exact_with_budget(table, table, make_synthetic_costs(), ExactConfig())
