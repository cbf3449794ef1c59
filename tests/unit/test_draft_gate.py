"""The depth-0 gate: explores both arms, follows the measured better one, probes the other."""
from __future__ import annotations

import pytest

from radar_vllm.core.draft_gate import DRAFT, SKIP, DraftGate, batch_bucket


def _run(gate: DraftGate, batch_size: int, rounds: int, cost) -> list[bool]:
    """Play ``rounds`` rounds; ``cost(drafted) -> (seconds, tokens per request)``."""
    choices = []
    for _ in range(rounds):
        drafted = gate.decide(batch_size)
        gate.observe(batch_size, drafted, *cost(drafted))
        choices.append(drafted)
    return choices


def test_buckets_are_powers_of_two():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 64)] == [0, 1, 2, 2, 3, 3, 4, 6]
    with pytest.raises(ValueError):
        batch_bucket(0)


def test_skips_when_drafting_does_not_pay_and_drafts_when_it_does():
    # drafting: 1.5x the step time for 1.3 tokens per request -> worse than plain decode
    losing = _run(DraftGate(probe_every=20), 16, 400, lambda d: (0.015, 1.3) if d else (0.010, 1.0))
    assert losing[:3] == [DRAFT] * 3 and losing[3:6] == [SKIP] * 3  # both arms tried first
    assert losing[6:].count(DRAFT) == len(losing[6:]) // 20  # only the probes draft
    # batch 1: drafting costs 1.2x and yields 1.6 tokens -> drafting wins
    winning = _run(DraftGate(probe_every=20), 1, 400, lambda d: (0.012, 1.6) if d else (0.010, 1.0))
    assert winning[6:].count(SKIP) == len(winning[6:]) // 20


def test_buckets_are_independent_and_the_gate_follows_a_change():
    gate = DraftGate(probe_every=10, smoothing=0.3)
    _run(gate, 1, 50, lambda d: (0.012, 1.6) if d else (0.010, 1.0))
    _run(gate, 32, 50, lambda d: (0.030, 1.2) if d else (0.020, 1.0))
    assert gate.preferred(1) == DRAFT and gate.preferred(32) == SKIP
    # the text gets easy at batch 32: the probes see it and the gate switches
    late = _run(gate, 32, 200, lambda d: (0.030, 2.5) if d else (0.020, 1.0))
    assert gate.preferred(32) == DRAFT and late[-50:].count(DRAFT) >= 45
    summary = gate.summary()
    assert summary["32"]["draft_steps"] > 0 and summary["1"]["skip_steps"] > 0


def test_bad_measurements_and_options():
    gate = DraftGate()
    gate.observe(4, DRAFT, 0.0, 1.0)
    gate.observe(4, DRAFT, 0.01, 0.0)
    assert gate.summary() == {}
    for options in ({"probe_every": 1}, {"min_observations": 0}, {"smoothing": 0.0}, {"smoothing": 1.5}):
        with pytest.raises(ValueError):
            DraftGate(**options)
