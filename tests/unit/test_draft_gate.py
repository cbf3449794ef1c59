"""The depth gate: explores every depth cap, follows the measured best, probes the others less and
less often while the choice holds, and notices a change."""
from __future__ import annotations

import pytest

from radar_vllm.core.draft_gate import DraftGate, batch_bucket


def _run(gate: DraftGate, batch_size: int, rounds: int, cost) -> list[int]:
    """Play ``rounds`` rounds; ``cost(cap) -> (seconds, tokens per request)``."""
    choices = []
    for _ in range(rounds):
        cap = gate.decide(batch_size)
        gate.observe(batch_size, cap, *cost(cap))
        choices.append(cap)
    return choices


def _costs(table: dict[int, tuple[float, float]]):
    return lambda cap: table[cap]


def test_buckets_are_powers_of_two():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 64)] == [0, 1, 2, 2, 3, 3, 4, 6]
    with pytest.raises(ValueError):
        batch_bucket(0)


def test_follows_the_best_cap_and_probes_rarely_once_settled():
    # batch 16: any drafting costs more than it yields -> depth 0
    losing = _costs({0: (0.010, 1.0), 1: (0.015, 1.3), 7: (0.030, 1.5)})
    choices = _run(DraftGate(7, probe_every=16, max_probe_every=256), 16, 1000, losing)
    assert choices[:9] == [7, 7, 7, 1, 1, 1, 0, 0, 0]  # every arm measured first, deepest first
    assert DraftGate(7).probe_rounds(16) == 1 and DraftGate(7).probe_rounds(3) == 2
    later = choices[9:]
    assert later.count(0) > 0.98 * len(later)
    # the probe interval doubles while probes confirm: far fewer probes than one per 16 rounds
    assert len(later) - later.count(0) <= 7
    # batch 1: one draft pays, deep drafts do not -> depth 1; a measurement spans 8 rounds there
    winning = _costs({0: (0.010, 1.0), 1: (0.011, 1.3), 7: (0.020, 1.6)})
    choices = _run(DraftGate(7), 1, 1000, winning)
    assert choices[:24] == [7] * 8 + [1] * 8 + [0] * 8
    assert choices[24:].count(1) > 0.95 * len(choices[24:]) and choices[-400:].count(1) >= 0.98 * 400
    probes = [cap for index, cap in enumerate(choices[24:]) if cap != 1]
    assert len(probes) % 8 == 0 and set(probes) == {0, 7}  # whole 8-round probes of both other arms


def test_buckets_are_independent_and_the_gate_follows_a_change():
    gate = DraftGate(4, arms=(0, 4), probe_every=8, max_probe_every=64, smoothing=0.3)
    _run(gate, 1, 100, _costs({0: (0.010, 1.0), 4: (0.012, 1.6)}))
    _run(gate, 32, 100, _costs({0: (0.020, 1.0), 4: (0.030, 1.2)}))
    assert gate.preferred(1) == 4 and gate.preferred(32) == 0
    # the text gets easy at batch 32: a probe sees it, the gate switches, probing speeds up again
    late = _run(gate, 32, 400, _costs({0: (0.020, 1.0), 4: (0.030, 2.5)}))
    assert gate.preferred(32) == 4 and late[-50:].count(4) >= 45
    summary = gate.summary()
    assert summary["32"]["steps_d4"] > 0 and summary["1"]["steps_d0"] > 0 and set(summary) == {"1", "32"}


def test_a_probe_that_is_never_observed_does_not_stop_probing():
    gate = DraftGate(2, arms=(0, 2), probe_every=4, max_probe_every=4, min_observations=1)
    _run(gate, 8, 2, _costs({0: (0.01, 1.0), 2: (0.03, 1.2)}))
    probes = 0
    for _ in range(40):  # the rounds' outcomes are never reported (e.g. the batch kept changing)
        probes += gate.decide(8) == 2
    assert probes >= 9


def test_bad_measurements_and_options():
    gate = DraftGate(3)
    gate.observe(4, 3, 0.0, 1.0)
    gate.observe(4, 3, 0.01, 0.0)
    gate.observe(4, 2, 0.01, 1.0)  # not an arm
    assert all(bucket[f"steps_d{cap}"] == 0 for bucket in gate.summary().values() for cap in (0, 1, 3))
    for args, options in (((0,), {}), ((3,), {"arms": (1,)}), ((3,), {"arms": (0, 5)}), ((3,), {"probe_every": 1}),
                          ((3,), {"probe_every": 32, "max_probe_every": 16}), ((3,), {"min_observations": 0}),
                          ((3,), {"smoothing": 0.0}), ((3,), {"smoothing": 1.5}), ((3,), {"probe_requests": 0})):
        with pytest.raises(ValueError):
            DraftGate(*args, **options)
