"""The depth gate: measures the depth caps shallowest first, follows the measured best, probes the
others less and less often while the choice holds (the further behind and the dearer, the rarer),
notices a change, starts a new batch-size bucket from the nearest bucket's estimates (drafting's
extra cost scaled to the batch size), and averages noisy batch-1 steps."""
from __future__ import annotations

import random

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
    choices = _run(DraftGate(7, arms=(0, 1, 7), probe_every=16, max_probe_every=256), 16, 1000, losing)
    # measured shallowest first; depth 1 loses, so the deeper arm is estimated from it, not run
    assert choices[:4] == [0, 0, 1, 1] and choices[4] == 0
    assert DraftGate(7).probe_rounds(16) == 1 and DraftGate(7).probe_rounds(3) == 2
    later = choices[4:]
    assert later.count(0) > 0.99 * len(later)
    # each arm's interval grows while probes confirm, the far-behind arm's (half the rate) fastest:
    # far fewer probes than one per 16 rounds, and the deep arm tried least
    assert len(later) - later.count(0) <= 5 and 1 <= later.count(7) < later.count(1)
    # batch 1: one draft pays, deep drafts do not -> depth 1; a measurement spans 8 rounds there
    winning = _costs({0: (0.010, 1.0), 1: (0.011, 1.3), 7: (0.020, 1.6)})
    choices = _run(DraftGate(7, arms=(0, 1, 7)), 1, 1000, winning)
    assert choices[:24] == [0] * 8 + [1] * 8 + [7] * 8
    assert choices[24:].count(1) > 0.95 * len(choices[24:]) and choices[-400:].count(1) >= 0.98 * 400
    probes = [cap for index, cap in enumerate(choices[24:]) if cap != 1]
    assert len(probes) % 8 == 0 and set(probes) == {0, 7}  # whole 8-round probes of both other arms


def test_default_arms_are_every_cap_up_to_four_and_the_deepest():
    assert DraftGate(7).caps == [0, 1, 2, 3, 4, 7] and DraftGate(1).caps == [0, 1]
    assert DraftGate(2).caps == [0, 1, 2] and DraftGate(3).caps == [0, 1, 2, 3]
    # batch 1 on a CPU: the first draft carries the fixed cost of a speculative step (one draft
    # loses to none), the second is cheap and pays: the gate finds depth 2
    two = _costs({0: (0.010, 1.0), 1: (0.0125, 1.2), 2: (0.013, 1.45), 3: (0.0145, 1.52), 4: (0.016, 1.6),
                  7: (0.020, 1.7)})
    choices = _run(DraftGate(7), 1, 600, two)
    assert choices[:48] == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8 + [4] * 8 + [7] * 8
    # settled: the probes of the close arms (3 and 4, within 10%) cost under 2.5% of the rate
    late = choices[-300:]
    rate = sum(two(cap)[1] for cap in late) / sum(two(cap)[0] for cap in late)
    assert late.count(2) >= 0.8 * len(late) and rate >= 0.975 * 1.45 / 0.013


def test_buckets_are_independent_and_the_gate_follows_a_change():
    gate = DraftGate(4, arms=(0, 4), probe_every=8, max_probe_every=64, smoothing=0.3, draft_margin=0.0)
    _run(gate, 1, 100, _costs({0: (0.010, 1.0), 4: (0.012, 1.6)}))
    _run(gate, 32, 100, _costs({0: (0.020, 1.0), 4: (0.030, 1.2)}))
    assert gate.preferred(1) == 4 and gate.preferred(32) == 0
    # the text gets easy at batch 32: a probe sees it, the gate switches, probing speeds up again
    late = _run(gate, 32, 400, _costs({0: (0.020, 1.0), 4: (0.030, 2.5)}))
    assert gate.preferred(32) == 4 and late[-50:].count(4) >= 45
    summary = gate.summary()
    assert summary["32"]["steps_d4"] > 0 and summary["1"]["steps_d0"] > 0 and set(summary) == {"1", "32"}


def test_a_new_bucket_starts_from_its_neighbour():
    gate = DraftGate(7, arms=(0, 1, 7), probe_every=16, max_probe_every=256)
    # batch 16 settles on depth 0
    _run(gate, 16, 200, _costs({0: (0.080, 1.0), 1: (0.110, 1.3), 7: (0.200, 1.6)}))
    # the batch drains to 8: steps are cheaper, the ratios alike; no arm is measured from scratch
    choices = _run(gate, 8, 15, _costs({0: (0.050, 1.0), 1: (0.070, 1.3), 7: (0.130, 1.6)}))
    assert choices == [0] * 15
    summary = gate.summary()["8"]
    assert summary["steps_d0"] == 15 and summary["steps_d1"] == 0
    # the unmeasured arm's extra over depth 0 (0.110 / 0.080 - 1) halved with the batch size, then
    # rescaled with the measured arm to this bucket
    assert summary["tokens_d1"] / summary["rate_d1"] == pytest.approx(0.050 * (1 + (0.110 / 0.080 - 1) / 2))
    # a probe then measures depth 1 for real
    later = _run(gate, 8, 20, _costs({0: (0.050, 1.0), 1: (0.070, 1.3), 7: (0.130, 1.6)}))
    assert 1 in later and gate.summary()["8"]["steps_d1"] >= 1
    # where the neighbour's choice is wrong for the new bucket, the first probe corrects it
    gate = DraftGate(7, arms=(0, 1, 7), probe_every=16, max_probe_every=256)
    _run(gate, 8, 300, _costs({0: (0.050, 1.0), 1: (0.052, 1.5), 7: (0.060, 1.6)}))
    assert gate.preferred(8) == 1
    choices = _run(gate, 16, 80, _costs({0: (0.080, 1.0), 1: (0.120, 1.3), 7: (0.250, 1.6)}))
    assert choices[0] == 1 and gate.preferred(16) == 0 and choices[-20:].count(0) >= 19


def test_a_new_sampling_bucket_takes_its_acceptance_from_sampling_batches():
    """Step times come from the greedy bucket of the same size, tokens per request from the nearest
    sampling bucket: a sampling batch does not draft on greedy acceptance until measured."""
    gate = DraftGate(4, arms=(0, 1, 4))
    greedy = _costs({0: (0.050, 1.0), 1: (0.060, 1.6), 4: (0.080, 2.4)})  # batch 8, greedy: depth 4
    for _ in range(60):
        cap = gate.decide(8)
        gate.observe(8, cap, *greedy(cap))
    sampling = _costs({0: (0.011, 1.0), 1: (0.0113, 1.01), 4: (0.0118, 1.03)})  # batch 1, sampling: depth 0
    for _ in range(120):
        cap = gate.decide(1, sampling=True)
        gate.observe(1, cap, *sampling(cap), sampling=True)
    assert gate.preferred(8) == 4 and gate.preferred(1, sampling=True) == 0
    assert gate.decide(8, sampling=True) == 0  # greedy acceptance would have chosen depth 4
    summary = gate.summary()
    assert summary["8s"]["tokens_d4"] == pytest.approx(summary["1s"]["tokens_d4"])
    assert summary["8s"]["tokens_d4"] / summary["8s"]["rate_d4"] == pytest.approx(
        summary["8"]["tokens_d4"] / summary["8"]["rate_d4"])
    # without a sampling bucket yet, a sampling batch starts from the greedy one, acceptance included
    fresh = DraftGate(4, arms=(0, 1, 4))
    for _ in range(60):
        cap = fresh.decide(8)
        fresh.observe(8, cap, *greedy(cap))
    assert fresh.preferred(8, sampling=True) == 4


def test_a_distant_bucket_is_seeded_with_drafting_costs_scaled_to_its_batch_size():
    # batch 1 drafts deep; batch 16 (four buckets away) starts from it with drafting's extra step
    # cost x16: it runs depth 0 from its first round, and no deep round within its first hundred
    gate = DraftGate(7, arms=(0, 1, 7))
    _run(gate, 1, 300, _costs({0: (0.030, 1.0), 1: (0.033, 1.5), 7: (0.040, 2.6)}))
    assert gate.preferred(1) == 7
    choices = _run(gate, 16, 100, _costs({0: (0.080, 1.0), 1: (0.120, 1.3), 7: (0.250, 1.6)}))
    assert choices[:16] == [0] * 16 and 7 not in choices and choices.count(0) >= 97
    summary = gate.summary()["16"]
    assert summary["tokens_d7"] / summary["rate_d7"] == pytest.approx(0.080 * (1 + (0.040 / 0.030 - 1) * 16))
    # batch 64 met before 32 (a server's first burst) starts from 16, not from scratch
    choices = _run(gate, 64, 50, _costs({0: (0.300, 1.0), 1: (0.600, 1.3), 7: (4.000, 1.6)}))
    assert choices[:16] == [0] * 16 and 7 not in choices


def test_dear_arms_far_behind_are_probed_within_the_probe_budget():
    """At batch 64 a deep tree round costs ~13 plain steps and yields a third of their rate: its
    probes must cost the bucket under ~2% of its throughput, whatever the geometric schedule."""
    costs = _costs({0: (0.300, 1.0), 1: (0.450, 1.35), 7: (4.000, 1.8)})
    gate = DraftGate(7, arms=(0, 1, 7))
    choices = _run(gate, 64, 3000, costs)
    later = choices[6:]
    assert later.count(0) > 0.97 * len(later) and later.count(7) <= 3
    spent = sum(costs(cap)[0] for cap in later)
    assert spent < 1.03 * 0.300 * len(later)
    with pytest.raises(ValueError, match="probe_budget"):
        DraftGate(7, probe_budget=0.0)


def test_a_probe_that_is_never_observed_does_not_stop_probing():
    gate = DraftGate(2, arms=(0, 2), probe_every=4, max_probe_every=4, min_observations=1, draft_margin=0.0)
    _run(gate, 8, 2, _costs({0: (0.01, 1.0), 2: (0.012, 1.15)}))  # close: the interval stays at 4
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


def test_an_atypical_step_is_not_counted_and_extends_the_probe():
    gate = DraftGate(7, arms=(0, 1, 7), probe_every=4, max_probe_every=4, min_observations=1)
    costs = _costs({0: (0.010, 1.0), 1: (0.015, 1.2), 7: (0.030, 1.3)})
    _run(gate, 16, 3, costs)
    before = gate.summary()["16"]
    while (cap := gate.decide(16)) == 0:  # settled on 0; wait for the probe of depth 1
        gate.observe(16, 0, *costs(0))
    assert cap == 1
    # the probe's round caught up on many skipped rounds: huge, and not counted
    gate.observe(16, 1, 5.0, 1.2, typical=False)
    assert gate.summary()["16"]["steps_d1"] == before["steps_d1"]
    assert gate.decide(16) == 1  # the probe runs one more round, which is measured
    gate.observe(16, 1, *costs(1))
    after = gate.summary()["16"]
    assert after["steps_d1"] == before["steps_d1"] + 1 and after["rate_d1"] == pytest.approx(1.2 / 0.015)


@pytest.mark.parametrize("seed", range(4))
def test_noisy_batch_one_steps_still_find_the_best_cap(seed):
    # at batch 1 a step yields 1, 2 or 3 tokens: the gate averages over many steps and runs the
    # best cap (2 here, 9% ahead of 1 and of 4) most of the time
    rng = random.Random(seed)

    def chain(seconds, probabilities):
        tokens = 1
        for p in probabilities:
            if rng.random() >= p:
                break
            tokens += 1
        return seconds, tokens

    arms = {0: lambda: (0.010, 1), 1: lambda: chain(0.0125, [0.49]), 2: lambda: chain(0.0135, [0.49, 0.55]),
            3: lambda: chain(0.0155, [0.49, 0.55, 0.6]), 4: lambda: chain(0.017, [0.49, 0.55, 0.6, 0.6]),
            7: lambda: chain(0.020, [0.49, 0.55] + [0.6] * 5)}
    gate = DraftGate(7)
    choices, tokens, seconds = [], 0.0, 0.0
    for round_index in range(3000):
        cap = gate.decide(1)
        step_seconds, step_tokens = arms[cap]()
        gate.observe(1, cap, step_seconds, [step_tokens])  # per request, as the proposer reports them
        choices.append(cap)
        if round_index >= 1000:
            tokens, seconds = tokens + step_tokens, seconds + step_seconds
    best_rate = (1 + 0.49 + 0.49 * 0.55) / 0.0135
    assert choices[1000:].count(2) > 0.6 * 2000
    assert tokens / seconds > 0.95 * best_rate


def test_sampling_batches_are_measured_apart_and_start_from_greedy_ones():
    gate = DraftGate(7, arms=(0, 1, 7), probe_every=16, max_probe_every=256)
    # greedy batch 1: drafting deep pays
    _run(gate, 1, 400, _costs({0: (0.010, 1.0), 1: (0.011, 1.4), 7: (0.015, 2.2)}))
    assert gate.preferred(1) == 7
    # sampled batch 1: drafts are accepted less; the bucket starts from the greedy one, then learns
    choices = []
    sampled = _costs({0: (0.010, 1.0), 1: (0.011, 1.05), 7: (0.015, 1.1)})
    for _ in range(600):
        cap = gate.decide(1, sampling=True)
        gate.observe(1, cap, *sampled(cap), sampling=True)
        choices.append(cap)
    assert choices[0] == 7 and gate.preferred(1, sampling=True) == 0 and choices[-100:].count(0) >= 90
    assert gate.preferred(1) == 7  # the greedy bucket keeps its own estimates
    # a sampling batch of 16 starts from the greedy batch of 16 (the load decides more), not from
    # the sampling batch of 1
    _run(gate, 16, 200, _costs({0: (0.080, 1.0), 1: (0.120, 1.3), 7: (0.250, 1.6)}))
    assert gate.decide(16, sampling=True) == 0
    assert set(gate.summary()) == {"1", "1s", "16", "16s"}


def test_a_deep_round_measures_the_tokens_of_every_shallower_cap():
    gate = DraftGate(7, arms=(0, 1, 2, 7), depth_prior=0.0)  # the counts alone
    # per request: tokens emitted under cap 7 (accepted + 1); cut at cap c a request emits min(t, c + 1)
    emitted = [5, 2, 3, 1, 2, 8, 1, 1]
    gate.observe(8, 7, 0.02, emitted)
    entry = gate.summary()["8"]
    assert entry["steps_d7"] == 1 and entry["steps_d1"] == entry["steps_d2"] == 0  # times are their own
    for cap in (1, 2, 7):
        assert entry[f"tokens_d{cap}"] == pytest.approx(sum(min(t, cap + 1) for t in emitted) / len(emitted))
    assert entry["reach_1"] == pytest.approx(5 / 8) and entry["reach_7"] == pytest.approx(1 / 8)
    assert entry["accept_2"] == pytest.approx(3 / 5)  # 3 of the 5 requests whose first draft was accepted
    # a shallow round teaches depth 1 and nothing of depth 2's own rate; how often two drafts are
    # accepted follows depth 1
    gate.observe(8, 1, 0.01, [2] * 8)
    entry = gate.summary()["8"]
    kept = 1.0 - gate.smoothing  # the first round's counts, discounted
    assert entry["reach_1"] == pytest.approx((5 * kept + 8) / (8 * kept + 8))
    assert entry["accept_2"] == pytest.approx(3 / 5) and entry["reach_2"] == pytest.approx(entry["reach_1"] * 3 / 5)
    # with only a mean (no per-request tokens) an arm keeps its own average
    other = DraftGate(7, arms=(0, 1, 7))
    other.observe(8, 7, 0.02, 2.5)
    assert other.summary()["8"]["tokens_d7"] == 2.5 and other.summary()["8"]["tokens_d1"] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_noisy_batch_one_chains_find_a_close_best_cap_from_deep_rounds(seed):
    # a CPU-like batch 1: verifying 5 rows (cap 4) costs less than verifying 3 (cap 2), and cap 4
    # is only ~6% ahead of cap 2; the stop policy drafts to depth 6 whatever the cap. Each request's
    # emitted tokens tell the gate how often every depth up to the cap is accepted.
    rng = random.Random(seed)
    accept = [0.49, 0.55, 0.6, 0.6, 0.6, 0.6, 0.6]
    seconds = {0: 0.050, 1: 0.058, 2: 0.046, 3: 0.049, 4: 0.050, 7: 0.062}
    gate = DraftGate(7)
    choices, tokens, elapsed = [], 0.0, 0.0
    for round_index in range(3000):
        cap = gate.decide(1)
        drafted = min(cap, 6)
        emitted = 1
        for p in accept[:drafted]:
            if rng.random() >= p:
                break
            emitted += 1
        gate.observe(1, cap, seconds[cap], [emitted])
        choices.append(cap)
        if round_index >= 1000:
            tokens, elapsed = tokens + emitted, elapsed + seconds[cap]

    def expected(cap):
        total, reach = 1.0, 1.0
        for p in accept[:min(cap, 6)]:
            reach *= p
            total += reach
        return total / seconds[cap]

    assert max(seconds, key=expected) == 4 and expected(4) < 1.07 * expected(2)
    # within 7% of always running the best cap (always cap 1 would reach 64%, always cap 2 94%)
    assert tokens / elapsed > 0.93 * expected(4)
    assert choices[1000:].count(4) > 0.25 * 2000 and choices[1000:].count(1) + choices[1000:].count(0) < 0.1 * 2000


def _table(gate: DraftGate, mode: str = "chain"):
    from radar_vllm.core.draft_gate import GATE_TABLE_FORMAT

    return {"format": GATE_TABLE_FORMAT, "machine": {"cpu_model": "cpu A", "num_cpus": 2, "accelerator": None},
            "checkpoint_id": "radar@0123456789ab", "dtype": "float32", "target": "target",
            "modes": {mode: gate.export()}}


def test_a_gate_started_from_a_table_skips_the_sweep_and_probes_by_the_table_rates():
    costs16 = _costs({0: (0.080, 1.0), 1: (0.120, 1.3), 7: (0.250, 1.6)})
    costs1 = _costs({0: (0.030, 1.0), 1: (0.033, 1.5), 7: (0.040, 2.6)})
    measured, alone = DraftGate(7, arms=(0, 1, 7)), DraftGate(7, arms=(0, 1, 7))
    _run(measured, 16, 200, costs16)  # (two gates: each bucket measures every arm itself)
    _run(alone, 1, 200, costs1)
    table = measured.export()
    table["buckets"].update(alone.export()["buckets"])
    assert set(table["buckets"]) == {"1", "16"} and table["arms"] == [0, 1, 7]
    assert table["buckets"]["16"]["arms"]["0"]["seconds"] == pytest.approx(0.080)
    fresh = DraftGate(7, arms=(0, 1, 7))
    fresh.seed(table)
    # no sweep: the first rounds run the table's choice at each size, far-behind arms wait long
    choices = _run(fresh, 16, 100, costs16)
    assert choices[:60] == [0] * 60 and choices.count(0) >= 98  # depth 1 (13% behind) first probed at 64
    assert _run(fresh, 1, 40, costs1)[:16] == [7] * 16
    # a machine twice as slow: the first measurement rescales the other arms; the choice holds
    slow = DraftGate(7, arms=(0, 1, 7))
    slow.seed(table)
    _run(slow, 16, 1, lambda cap: (2 * costs16(cap)[0], costs16(cap)[1]))
    assert slow.summary()["16"]["tokens_d1"] / slow.summary()["16"]["rate_d1"] == pytest.approx(0.240)
    # a bucket the table does not cover starts from the nearest one it covers: no sweep
    # (batch 1's, drafting's extra cost x4: depth 7 still leads)
    assert _run(fresh, 4, 20, costs1)[:10] == [7] * 10
    with pytest.raises(ValueError, match="arms"):
        DraftGate(7).seed(table)


def test_a_table_for_another_engine_is_refused_when_named_and_skipped_when_the_checkpoint_s(tmp_path, caplog):
    from radar_vllm.core.draft_gate import check_gate_tables, load_gate_table, save_gate_table
    from radar_vllm.offline.gate_calibration import merge_gate_tables

    gate = DraftGate(7, arms=(0, 1, 7))
    _run(gate, 16, 50, _costs({0: (0.080, 1.0), 1: (0.120, 1.3), 7: (0.250, 1.6)}))
    path = save_gate_table(_table(gate), tmp_path / "gate.json")
    table = load_gate_table(path)
    expected = dict(checkpoint_id="radar@0123456789ab", mode="chain", dtype="float32", target="target",
                    caps=[0, 1, 7], max_depth=7, max_batch_size=16, machine=("cpu A", 2, None))
    section = check_gate_tables([(path, table)], strict=True, **expected)
    assert section is not None and set(section["buckets"]) == {"16"}
    wrong = (("checkpoint_id", "radar@ffffffffffff"), ("mode", "tree"), ("dtype", "bfloat16"), ("target", "other"),
             ("caps", [0, 1, 2, 7]), ("machine", ("cpu B", 8, None)), ("own_arms", [7]))
    for key, value in wrong:
        with pytest.raises(ValueError, match="calibrate-gate"):
            check_gate_tables([(path, table)], strict=True, **{**expected, key: value})
        with caplog.at_level("WARNING"):
            caplog.clear()
            assert check_gate_tables([(path, table)], strict=False, **{**expected, key: value}) is None
            assert "measures from scratch" in caplog.text
    # a named table that stops short of the engine's largest batch is refused unless the user asks
    # for the extrapolation; the checkpoint's own is used so, with a warning
    with pytest.raises(ValueError, match="covers batch sizes up to 16 and this engine runs up to 64.*"
                                         "gate_costs_extrapolate.*calibrate-gate.*--max-batch-size 64"):
        check_gate_tables([(path, table)], strict=True, **{**expected, "max_batch_size": 64})
    for strict, extrapolate in ((True, True), (False, False)):
        with caplog.at_level("WARNING"):
            caplog.clear()
            assert check_gate_tables([(path, table)], strict=strict, extrapolate=extrapolate,
                                     **{**expected, "max_batch_size": 64}) is not None
            assert "up to 16" in caplog.text
    # a list of tables (one per machine): the one measured on this machine is used, wherever it is
    other_gate = DraftGate(7, arms=(0, 1, 7))
    _run(other_gate, 4, 50, _costs({0: (0.050, 1.0), 1: (0.040, 1.3), 7: (0.060, 1.6)}))
    other = dict(_table(other_gate), machine={"cpu_model": "cpu B", "num_cpus": 8, "accelerator": None})
    both_machines = [(tmp_path / "b.json", other), (path, table)]
    assert set(check_gate_tables(both_machines, strict=True, **expected)["buckets"]) == {"16"}
    on_b = check_gate_tables(both_machines, strict=True,
                             **{**expected, "machine": ("cpu B", 8, None), "max_batch_size": 4})
    assert set(on_b["buckets"]) == {"4"}
    with pytest.raises(ValueError, match="b.json was measured with.*machine.*gate.json was measured with.*machine"):
        check_gate_tables(both_machines, strict=True, **{**expected, "machine": ("cpu C", 2, None)})
    # one file holds both modes of the same engine
    both = merge_gate_tables(table, _table(gate, mode="tree"))
    assert set(both["modes"]) == {"chain", "tree"}
    assert check_gate_tables([(path, both)], strict=True, **{**expected, "mode": "tree"}) is not None
    assert set(merge_gate_tables(dict(table, dtype="bfloat16"), _table(gate, mode="tree"))["modes"]) == {"tree"}
    # tree step costs depend on how trees are verified: a tree section names it (none: the legacy way)
    tree = {**expected, "mode": "tree"}
    assert check_gate_tables([(path, both)], strict=True, **tree, verify="path-128") is not None
    with pytest.raises(ValueError, match="tree verification 'path-128' \\(this engine: 'scratch-32'\\)"):
        check_gate_tables([(path, both)], strict=True, **tree, verify="scratch-32")
    both["modes"]["tree"]["verify"] = "scratch-32"
    assert check_gate_tables([(path, both)], strict=True, **tree, verify="scratch-32") is not None
    with pytest.raises(ValueError, match="tree verification"):
        check_gate_tables([(path, both)], strict=True, **tree, verify="path-128")
    # a table from before the caps below the deepest drafted fixed-depth chains names no own arms
    legacy = merge_gate_tables(table, _table(gate, mode="tree"))
    del legacy["modes"]["chain"]["own_arms"]
    with pytest.raises(ValueError, match="every drafting cap running the stop policy"):
        check_gate_tables([(path, legacy)], strict=True, **expected)
    with pytest.raises(ValueError, match="own arms"):
        DraftGate(7, arms=(0, 1, 7)).seed(legacy["modes"]["chain"])
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(ValueError, match="gate-cost table|cannot read"):
            load_gate_table(bad)


def test_close_arms_swapping_do_not_bring_back_probes_of_far_ones():
    gate = DraftGate(7, arms=(0, 2, 3))
    before = _costs({0: (0.010, 1.0), 2: (0.0060, 1.0), 3: (0.0061, 1.0)})
    _run(gate, 16, 300, before)
    state = gate.buckets[(False, batch_bucket(16))]
    far = state.intervals[0]
    assert gate.preferred(16) == 2 and far >= 8 * 16  # depth 0, 40% behind, is tried rarely
    # cap 3 gets faster: the next probe of it changes the choice
    after = _costs({0: (0.010, 1.0), 2: (0.0060, 1.0), 3: (0.0050, 1.0)})
    while gate.preferred(16) == 2:
        cap = gate.decide(16)
        gate.observe(16, cap, *after(cap))
    # the close arm's schedule starts again, the far arm's is kept
    assert state.intervals[2] == 16 and state.intervals[0] == far


def test_own_arms_keep_their_tokens_apart_from_the_shared_depth_acceptance():
    """An engine's caps below the deepest draft fixed-depth chains, its deepest arm the policy's
    trees: the trees' rounds must neither teach the chains' depth-1 acceptance nor be credited with it."""
    tree = DraftGate(7, arms=(0, 1, 7), own_arms=(7,))
    shared = DraftGate(7, arms=(0, 1, 7))
    # cap 1: 1 token in 2 accepted; cap 7: every request gets 2 drafts accepted (depth-1 acceptance 1)
    emitted = {0: [1, 1], 1: [2, 1], 7: [3, 3]}
    seconds = {0: 0.010, 1: 0.012, 7: 0.020}
    for gate in (tree, shared):
        for _ in range(60):
            cap = gate.decide(2)
            gate.observe(2, cap, seconds[cap], emitted[cap])
    summary, mixed = tree.summary()["2"], shared.summary()["2"]
    assert summary["reach_1"] == pytest.approx(0.5)  # only the chain rounds taught depth 1
    assert summary["tokens_d1"] == pytest.approx(1.5, abs=0.02)
    assert summary["tokens_d7"] == pytest.approx(3.0, abs=0.02)  # its own average
    # without own_arms, cap 1's chains and cap 7's trees share depth 1's estimate and both are wrong
    assert 0.5 < mixed["reach_1"] < 1.0 and mixed["tokens_d1"] > 1.5


def test_cut_chains_teach_each_depth_from_the_requests_that_drafted_it():
    """RADAR's chain rounds are the fixed chains cut where the policy stopped: depth j learns from
    the requests that drafted j with every earlier draft accepted, and a request the policy stopped
    with all its drafts accepted says nothing about the depths after its stop."""
    gate = DraftGate(7, arms=(0, 3, 7), own_arms=(7,), depth_prior=0.0)  # the counts alone
    drawn = DraftGate(7, arms=(0, 3, 7), own_arms=(7,))
    # request 0 drafted 1, accepted it (nothing known of depth 2); request 1 drafted 1, rejected it;
    # request 2 drafted 3, accepted 1; request 3 drafted 3, accepted all 3
    for _ in range(200):
        gate.observe(4, 7, 0.050, [2, 1, 2, 4], drafted=[1, 1, 3, 3])
        drawn.observe(4, 7, 0.050, [2, 1, 2, 4], drafted=[1, 1, 3, 3])
    # with the default prior depth 2's rate (1 in 2, from 2 requests a round) is drawn a little
    # towards depth 1's (3 in 4)
    assert 0.5 < drawn.summary()["4"]["accept_2"] < 0.55 and drawn.summary()["4"]["accept_1"] == pytest.approx(0.75)
    summary = gate.summary()["4"]
    assert summary["reach_1"] == pytest.approx(0.75)  # 3 of 4 accepted their first draft
    assert summary["reach_2"] == pytest.approx(0.75 * 0.5, abs=1e-3)  # 1 of the 2 that drafted depth 2
    assert summary["reach_3"] == pytest.approx(0.375, abs=1e-3)  # the one that drafted depth 3 got it
    assert summary["tokens_d3"] == pytest.approx(2.5, abs=0.01)  # fixed depth 3: 1 + the three rates
    assert summary["tokens_d7"] == pytest.approx(2.25, abs=0.01)  # the policy's arm: its own average
    # a request stopped with its drafts accepted is not a miss at the next depth
    counted = DraftGate(7, arms=(0, 3, 7), own_arms=(7,))
    for _ in range(200):
        counted.observe(1, 7, 0.050, [2], drafted=[1])
    assert counted.summary()["1"]["reach_1"] == pytest.approx(1.0)
    assert "reach_2" not in counted.summary()["1"]


def test_a_deep_depth_learns_only_from_the_requests_that_reached_it():
    """Batch 1: draft 3 is seen only in rounds whose first two drafts were accepted. A depth-3 probe
    whose rounds accepted fewer says nothing of draft 3 (the shallower depths learn from it), a
    table's estimate is discounted by what follows instead of being replaced by one step, and a few
    unlucky requests draw the rate towards the depth above's instead of to zero (a gate once held
    depth 3 at zero after such probes and ran depth 2, 8% slower than depth 3 there)."""
    section = {"arms": [0, 2, 3], "own_arms": [], "max_depth": 7, "buckets": {"1": {
        "arms": {"0": {"seconds": 0.046, "tokens": 1.0, "steps": 8}, "2": {"seconds": 0.050, "tokens": 1.8, "steps": 8},
                 "3": {"seconds": 0.050, "tokens": 1.95, "steps": 8}},
        "reach": [0.5, 0.3, 0.15, None, None, None, None]}}}
    gate = DraftGate(7, arms=(0, 2, 3), depth_prior=0.0)
    gate.seed(section)
    assert gate.summary()["1"]["accept_3"] == pytest.approx(0.5)
    for _ in range(8):  # a probe in which one draft a round was accepted
        gate.observe(1, 3, 0.050, [2])
    entry = gate.summary()["1"]
    assert entry["accept_3"] == pytest.approx(0.5)  # no request reached it
    assert entry["accept_2"] < 0.25 and entry["reach_3"] < 0.1  # what the probe did see (0.15 before)
    gate.observe(1, 3, 0.050, [3])  # one request reached draft 3, and it was rejected
    assert 0.2 < gate.summary()["1"]["accept_3"] < 0.45  # the table's 0.5 discounted, not replaced by 0
    # measured from scratch: three requests reached draft 3 and all were rejected
    drawn, bare = DraftGate(7, arms=(0, 2, 3)), DraftGate(7, arms=(0, 2, 3), depth_prior=0.0)
    for gate in (drawn, bare):
        for emitted in [1, 2, 3, 1, 2, 3, 1, 2, 3, 2, 2, 2] * 2:
            gate.observe(1, 3, 0.050, [emitted])
    assert bare.summary()["1"]["accept_3"] == 0.0
    assert drawn.summary()["1"]["accept_3"] == pytest.approx(
        4 * drawn.summary()["1"]["accept_2"] / (4 + drawn.buckets[(False, 0)].reach[2].trials))


def test_fixed_depths_are_judged_on_the_text_the_policy_rounds_meet():
    """Batch 1: a depth-3 chain's probes met text that accepted nothing, then the policy's rounds
    (dearer: 60 ms against 50) met text on which they drafted and emitted 3 tokens a step. Told what
    each policy round drafted, the gate sees that depth 3 would have emitted as much, for less."""
    choices = {}
    for told in (False, True):
        gate = DraftGate(7, arms=(0, 3, 7), own_arms=(7,))
        for cap, seconds in ((0, 0.046), (3, 0.050)):
            for _ in range(10):
                gate.observe(1, cap, seconds, [1])
        for _ in range(200):
            gate.observe(1, 7, 0.060, [3], drafted=[3] if told else None)
        choices[told] = gate.preferred(1)
    assert choices == {False: 7, True: 3}


def test_seeded_arms_follow_the_running_mean_of_a_measured_arm_not_its_first_step():
    """One slow first step after a table start (a batch's first decode step) must not make every
    arm the table seeded look slower for good."""
    measured = DraftGate(7, arms=(0, 1, 7))
    _run(measured, 16, 200, _costs({0: (0.100, 1.0), 1: (0.150, 1.4), 7: (0.400, 1.8)}))
    gate = DraftGate(7, arms=(0, 1, 7))
    gate.seed(measured.export())
    assert gate.decide(16) == 0  # the table's choice
    gate.observe(16, 0, 0.500, 1.0)  # an outlier: 5x the table's step
    assert gate.summary()["16"]["rate_d1"] == pytest.approx(1.4 / 0.750, rel=0.01)  # follows, for now
    for _ in range(30):
        gate.observe(16, 0, 0.100, 1.0)
    summary = gate.summary()["16"]
    # the running mean is back near the table's 0.100, and so are the seeded arms
    assert summary["rate_d0"] == pytest.approx(10.0, rel=0.15)
    assert summary["rate_d1"] == pytest.approx(1.4 / 0.150, rel=0.15)
    assert summary["rate_d7"] == pytest.approx(measured.summary()["16"]["rate_d7"], rel=0.15)  # the table's


def test_a_batch_drafts_only_when_drafting_beats_depth_zero_by_the_margin():
    """A batch that drafts drains unevenly: in batches of two or more, a drafting arm must beat
    depth 0 by ``draft_margin``; a lone request drafts whenever drafting is faster."""
    slight = _costs({0: (0.100, 1.0), 1: (0.130, 1.39)})  # drafting 7% faster per step
    clear = _costs({0: (0.100, 1.0), 1: (0.130, 1.56)})  # 20% faster
    for batch_size, cost, expected in ((16, slight, 0), (16, clear, 1), (1, slight, 1), (4, slight, 0)):
        gate = DraftGate(1, arms=(0, 1))
        choices = _run(gate, batch_size, 300, cost)
        assert gate.preferred(batch_size) == expected, (batch_size, expected)
        assert choices[-100:].count(expected) >= 90  # (probes of the other arm aside)
    # without a margin the slight gain is taken at batch 16 too
    gate = DraftGate(1, arms=(0, 1), draft_margin=0.0)
    _run(gate, 16, 300, slight)
    assert gate.preferred(16) == 1
    with pytest.raises(ValueError, match="draft_margin"):
        DraftGate(1, draft_margin=1.0)


def test_a_bucket_seeded_from_a_neighbour_schedules_its_probes_from_the_neighbours_rates():
    """Batch 16 starts sampling: its bucket starts from the greedy one's estimates and must not
    probe the far-behind deep arms (several plain steps each) within its first hundred rounds."""
    costs = _costs({0: (0.100, 1.0), 1: (0.130, 1.2), 7: (0.800, 1.6)})
    gate = DraftGate(7, arms=(0, 1, 7))
    _run(gate, 16, 300, costs)  # greedy batches: settled on depth 0
    sampled = []
    for _ in range(100):
        cap = gate.decide(16, sampling=True)
        gate.observe(16, cap, *costs(cap), sampling=True)
        sampled.append(cap)
    assert sampled.count(7) == 0 and sampled.count(0) >= 97


def test_a_bucket_measured_from_scratch_does_not_sweep_arms_deeper_than_a_dear_losing_one():
    """No table, no other bucket: a server's first batch is 64. Once depth 1 costs over two plain
    steps and loses to depth 0, the deeper (dearer) arms are estimated, not run twice each."""
    costs = _costs({0: (0.300, 1.0), 1: (0.700, 1.4), 2: (3.0, 1.7), 3: (3.5, 1.9), 7: (4.0, 2.0)})
    gate = DraftGate(7, arms=(0, 1, 2, 3, 7))
    choices = _run(gate, 64, 100, costs)
    assert choices[:4] == [0, 0, 1, 1] and choices[4:] == [0] * 96
    summary = gate.summary()["64"]
    assert summary["steps_d2"] == summary["steps_d7"] == 0 and summary["rate_d7"] < summary["rate_d0"]
    # they are probed later (two rounds each, as any arm's first measurement), then far more rarely
    later = _run(gate, 64, 2000, costs)
    assert later.count(7) <= 4 and later.count(0) >= 0.98 * len(later)
    # at batch 1, where the shallow arm is cheap, the sweep goes on (a CPU step can cost less deeper)
    cheap = _costs({0: (0.030, 1.0), 1: (0.045, 1.3), 2: (0.033, 1.6), 3: (0.035, 1.8), 7: (0.040, 2.0)})
    rounds = DraftGate(7, arms=(0, 1, 2, 3, 7)).probe_rounds(1)
    assert _run(DraftGate(7, arms=(0, 1, 2, 3, 7)), 1, 5 * rounds, cheap) == [
        cap for cap in (0, 1, 2, 3, 7) for _ in range(rounds)]


def test_a_first_batch_whose_depth_one_loses_does_not_run_the_deeper_arms():
    """No table: a benchmark's first batch is 16. Depth 1 costs 1.4 plain steps for 1.3 tokens and
    loses to depth 0: the deeper arms, each level dearer still, are estimated from it and lose too,
    so the first rounds are not spent running them (before: two rounds of each, a quarter of the
    first 40 rounds' time); they are probed later, on the budget. Where depth 1 pays, the sweep
    goes on to the deeper arms."""
    losing = _costs({0: (0.100, 1.0), 1: (0.140, 1.3), 2: (0.180, 1.5), 3: (0.220, 1.6), 7: (0.380, 1.7)})
    gate = DraftGate(7, arms=(0, 1, 2, 3, 7))
    choices = _run(gate, 16, 40, losing)
    assert choices[:4] == [0, 0, 1, 1] and choices[4:] == [0] * 36
    summary = gate.summary()["16"]
    assert summary["steps_d2"] == summary["steps_d3"] == summary["steps_d7"] == 0
    assert max(summary[f"rate_d{cap}"] for cap in (1, 2, 3, 7)) < summary["rate_d0"]
    later = _run(gate, 16, 2000, losing)
    assert later.count(0) >= 0.97 * len(later) and set(later) > {0}  # probed, rarely
    paying = _costs({0: (0.100, 1.0), 1: (0.115, 1.5), 2: (0.130, 1.9), 3: (0.150, 2.1), 7: (0.250, 2.3)})
    assert _run(DraftGate(7, arms=(0, 1, 2, 3, 7)), 16, 10, paying) == [0, 0, 1, 1, 2, 2, 3, 3, 7, 7]


def test_a_seeded_dear_arm_is_probed_rarely_and_one_round_at_a_time_at_batch_16():
    """Served at 16 streams a tree engine's sampling bucket starts from the greedy table: its deep
    arms (7 plain steps a round) wait over a thousand rounds for their first probe (the budget is
    shared by the five other arms), and that probe lasts one round, not ``min_observations``."""
    costs = _costs({0: (0.100, 1.0), 1: (0.135, 1.3), 2: (0.700, 2.0), 3: (0.750, 2.2), 4: (0.800, 2.3),
                    7: (0.850, 2.4)})
    measured = DraftGate(7)
    _run(measured, 16, 400, costs)
    gate = DraftGate(7)
    gate.seed(measured.export())
    choices = []
    for _ in range(3000):
        cap = gate.decide(16, sampling=True)
        gate.observe(16, cap, *costs(cap), sampling=True)
        choices.append(cap)
    deep = [index for index, cap in enumerate(choices) if cap >= 2]
    assert deep and min(deep) > 1000 and len(deep) <= 5
    assert all(choices[index + 1] != choices[index] for index in deep)  # one round each
    spent = sum(costs(cap)[0] for cap in choices)
    assert spent < 1.04 * 0.100 * len(choices)


def test_one_probe_moves_an_arm_measured_only_by_probes_halfway_to_what_it_sees():
    """The text changes so that drafts of depth 2 start being accepted: cap 2, until then a little
    behind cap 1 and only probed, must take over at its next probe or the one after, not after the
    moving average has crept up over several probes hundreds of rounds apart."""
    gate = DraftGate(7, arms=(0, 1, 2))
    seconds = {0: 0.010, 1: 0.0105, 2: 0.0112}

    def emitted(cap: int, depth_two: bool) -> list[int]:  # batch 10: 3 requests accept depth 1
        deep = 3 if depth_two and cap >= 2 else 2
        return [min(deep, cap + 1)] * 3 + [1] * 7

    for _ in range(600):  # depth 2 never accepted: cap 1 runs, cap 2 is probed ever more rarely
        cap = gate.decide(10)
        gate.observe(10, cap, seconds[cap], emitted(cap, False))
    state = gate.buckets[(False, batch_bucket(10))]
    assert gate.preferred(10) == 1 and state.intervals[2] >= 128
    interval = state.intervals[2]
    choices = []
    for _ in range(3 * interval):  # now depth 2 is accepted whenever depth 1 is
        cap = gate.decide(10)
        gate.observe(10, cap, seconds[cap], emitted(cap, True))
        choices.append(cap)
    assert gate.preferred(10) == 2
    first = choices.index(2)
    switched = next(index for index in range(len(choices)) if choices[index:index + 8] == [2] * 8)
    assert switched <= first + interval + 1, (first, switched, interval)  # at most one more probe
    # each probe measures the depth about halfway (acceptance of depth 2 went 0 -> 0.15 at the first)
    assert gate.summary()["16"]["reach_2"] > 0.2 and state.reach[1].count >= 2


def test_smaller_trees_are_policy_arms_above_the_deepest_cap_measured_not_estimated():
    from radar_vllm.core.draft_gate import gate_arms, round_shape

    assert gate_arms(7, [6, 4]) == ([0, 1, 2, 3, 4, 7, 8, 9], [7, 8, 9])
    assert gate_arms(7) == ([0, 1, 2, 3, 4, 7], [7])
    assert round_shape(3, 7, [6]) == (3, None) and round_shape(7, 7, [6]) == (7, None)
    assert round_shape(8, 7, [6, 4]) == (7, 6) and round_shape(9, 7, [6, 4]) == (7, 4)
    with pytest.raises(ValueError, match="gate arm 9 is above max_depth=7"):
        round_shape(9, 7, [6])
    with pytest.raises(ValueError, match="arms must hold"):
        DraftGate(7, arms=(0, 1, 8))  # an arm above the deepest cap must be a policy arm
    # batch 16: one draft loses to depth 0, so the full tree is estimated from it, not run; the
    # smaller tree is not a deeper chain: it is measured, wins, and keeps its own tokens
    gate = DraftGate(7, arms=(0, 1, 7, 8), own_arms=(7, 8), tree_sizes=[6])
    emitted = {0: [1] * 16, 1: [2] * 5 + [1] * 11, 7: [3] * 10 + [1] * 6, 8: [2] * 8 + [1] * 8}
    seconds = {0: 0.080, 1: 0.120, 7: 0.250, 8: 0.090}
    choices = _run(gate, 16, 120, lambda cap: (seconds[cap], emitted[cap]))
    summary = gate.summary()["16"]
    assert summary["steps_d7"] == 0 and summary["steps_d8"] > 0
    assert gate.preferred(16) == 8 and choices[-40:].count(8) >= 38
    assert summary["tokens_d8"] == pytest.approx(1.5)
    assert summary["reach_1"] == pytest.approx(5 / 16)  # only the one-draft chains taught depth 1


def test_a_table_without_the_engines_smaller_trees_seeds_the_rest_and_the_trees_are_measured(tmp_path):
    from radar_vllm.core.draft_gate import check_gate_tables

    costs = _costs({0: (0.080, 1.0), 1: (0.120, 1.3), 7: (0.250, 1.6), 8: (0.070, 1.5)})
    old = DraftGate(7, arms=(0, 1, 7), own_arms=(7,))
    _run(old, 16, 100, costs)
    table = _table(old, mode="tree")
    engine = dict(checkpoint_id="radar@0123456789ab", mode="tree", dtype="float32", target="target",
                  caps=[0, 1, 7, 8], own_arms=[7, 8], tree_sizes=[6], max_depth=7, max_batch_size=16,
                  machine=("cpu A", 2, None))
    section = check_gate_tables([(tmp_path / "old.json", table)], strict=True, **engine)
    gate = DraftGate(7, arms=(0, 1, 7, 8), own_arms=(7, 8), tree_sizes=[6])
    gate.seed(section)
    assert _run(gate, 16, 2, costs) == [8, 8]  # the arm the table lacks is measured first
    assert gate.preferred(16) == 8
    # a table that measured its arm 8 with another tree size describes another engine
    table6 = _table(gate, mode="tree")
    assert table6["modes"]["tree"]["tree_sizes"] == [6]
    assert check_gate_tables([(tmp_path / "t6.json", table6)], strict=True, **engine) is not None
    for key, value in (("tree_sizes", [5]), ("tree_sizes", []), ("caps", [0, 1, 7]), ("own_arms", [7])):
        with pytest.raises(ValueError, match="smaller trees"):
            check_gate_tables([(tmp_path / "t6.json", table6)], strict=True, **{**engine, key: value})
    with pytest.raises(ValueError, match="smaller trees"):
        DraftGate(7, arms=(0, 1, 7, 8), own_arms=(7, 8), tree_sizes=[5]).seed(table6["modes"]["tree"])


def test_a_table_that_flatters_drafting_is_corrected_by_measuring_depth_zero_soon():
    """A table whose batch-4 depth-1 step is cheaper than this engine's (on a CPU the target's
    matrix products for 8 rows can cost far more than for 4) puts the bucket on depth 1; the
    first measurement of depth 1 rescales depth 0's estimate by the same factor, so the table's
    ratio holds and depth 0, the arm that cannot be slower than no speculation, would wait for
    its first probe as long as an arm measured twice. Depth 0 within reach of the choice is
    measured within ``probe_every`` rounds instead, and the gate moves to it."""
    table_costs = _costs({0: (0.043, 1.0), 1: (0.049, 1.45)})  # drafting 28% faster per step
    real_costs = _costs({0: (0.041, 1.0), 1: (0.057, 1.28)})  # drafting 7% slower
    measured = DraftGate(1, arms=(0, 1))
    _run(measured, 4, 200, table_costs)
    fresh = DraftGate(1, arms=(0, 1))
    fresh.seed(measured.export())
    choices = _run(fresh, 4, 100, real_costs)
    assert choices[0] == 1  # the table's choice first
    assert 0 in choices[: fresh.probe_every + fresh.probe_rounds(4)]
    assert choices[-60:].count(0) >= 57
    # where depth 0 is far behind (batch 1: drafting 60% faster) it is not probed early
    alone = DraftGate(1, arms=(0, 1))
    far = _costs({0: (0.043, 1.0), 1: (0.049, 1.8)})
    _run(alone, 1, 200, far)
    seeded = DraftGate(1, arms=(0, 1))
    seeded.seed(alone.export())
    assert _run(seeded, 1, 100, far).count(0) == 0
