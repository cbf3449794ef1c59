"""The per-feature account: AUC by ranks, and the best skip-threshold rule against always drafting,
never drafting and the oracle."""
from __future__ import annotations

import random

import pytest

from radar_vllm.offline.rl.features import auc, held_out_rule, skip_rule, threshold_rate


def test_auc_counts_pairs_and_ties():
    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert auc([1, 2, 3], [False, True, True]) == 1.0
    assert auc([3, 2, 1], [False, True, True]) == 0.0
    assert auc([1, 1, 1, 1], [False, True, False, True]) == 0.5  # one tie counts half
    assert auc([1, 2], [True, True]) is None
    # brute force on random data with ties
    rng = random.Random(0)
    scores = [rng.randint(0, 5) for _ in range(60)]
    labels = [rng.random() < 0.4 for _ in range(60)]
    pairs = [(p, n) for p, lp in zip(scores, labels) if lp for n, ln in zip(scores, labels) if not ln]
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert auc(scores, labels) == pytest.approx(brute)
    with pytest.raises(ValueError):
        auc([1], [True, False])


def test_skip_rule_worked_example():
    result = skip_rule([0.2, 0.9, 0.4, 0.8], [0, 2, 0, 1], 0.040, 0.046)
    assert result["always"] == pytest.approx(7 / 0.184)
    assert result["never"] == pytest.approx(4 / 0.160)
    assert result["rule"] == pytest.approx(7 / 0.172) == pytest.approx(result["oracle"])
    assert result["threshold"] == 0.8 and result["skipped"] == 0.5


def test_a_useless_feature_gains_nothing_and_ties_are_not_split():
    accepted = [0, 1, 0, 2, 0, 1]
    flat = skip_rule([1.0] * 6, accepted, 0.040, 0.046)  # one value: skip all or none
    assert flat["rule"] == pytest.approx(max(flat["always"], flat["never"]))
    assert flat["rule"] <= flat["oracle"]
    # where drafting costs far more than it yields, the best rule skips everything
    dear = skip_rule([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], accepted, 0.040, 0.200)
    assert dear["skipped"] == 1.0 and dear["rule"] == pytest.approx(dear["never"])
    with pytest.raises(ValueError):
        skip_rule([], [], 0.04, 0.05)


def test_a_threshold_is_scored_on_rounds_it_was_not_chosen_on():
    feature, accepted = [0.2, 0.9, 0.4, 0.8], [0, 2, 0, 1]
    chosen = skip_rule(feature, accepted, 0.040, 0.046)
    assert threshold_rate(feature, accepted, chosen["threshold"], 0.040, 0.046) == pytest.approx(chosen["rule"])
    # two folds that agree: the held-out rule is the in-sample one
    assert held_out_rule(feature * 2, accepted * 2, [0] * 4 + [1] * 4, 0.040, 0.046) == pytest.approx(chosen["rule"])
    # noise: a threshold fitted on one fold gains nothing (or loses) on the other
    rng = random.Random(1)
    noise = [rng.random() for _ in range(400)]
    acc = [rng.choice([0, 0, 1, 2]) for _ in range(400)]
    folds = [i % 2 for i in range(400)]
    in_sample = skip_rule(noise, acc, 0.040, 0.046)
    assert held_out_rule(noise, acc, folds, 0.040, 0.046) < in_sample["rule"]
    with pytest.raises(ValueError):
        held_out_rule(noise, acc, [0] * 400, 0.040, 0.046)
