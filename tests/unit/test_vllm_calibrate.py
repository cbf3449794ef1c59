"""Pure parts of the vLLM chain-mode calibration (no engine is started)."""
from __future__ import annotations

import random

import pytest

from radar_vllm.core.costs import ENGINE_VLLM_CPU, CostTable
from radar_vllm.offline.vllm_costs import nondecreasing_fit, split_chain_round_times, time_policy_step


def _table(round_seconds: list[float], decode: float) -> CostTable:
    first, step, verify = split_chain_round_times(round_seconds)
    return CostTable(verify_num_nodes=tuple(range(1, len(round_seconds) + 1)),
                     verify_seconds=tuple(verify), first_draft_seconds=first,
                     draft_step_seconds=step, policy_step_seconds=1e-4,
                     decode_step_seconds=decode, engine=ENGINE_VLLM_CPU, model_id="m", head_id="h")


def test_split_reproduces_measured_round_times_in_chain_mode() -> None:
    rng = random.Random(0)
    measured = [0.04 + 0.006 * d + rng.uniform(-0.002, 0.002) for d in range(1, 8)]
    table = _table(measured, decode=0.027)
    for depth, seconds in enumerate(measured, start=1):
        assert table.round_time(depth, depth) == pytest.approx(seconds, rel=1e-12)
    assert table.round_time(0, 0) == pytest.approx(0.027)
    # The slope of a noisy but increasing curve is the draft step.
    assert 0.004 < table.draft_step_seconds < 0.008


def test_split_pools_a_decreasing_curve_into_a_flat_one() -> None:
    measured = [0.06, 0.05, 0.04]
    first, step, verify = split_chain_round_times(measured)
    assert step == pytest.approx(0.0, abs=1e-15) and first == step
    assert verify == pytest.approx([0.05, 0.05, 0.05])


def test_round_times_out_of_order_never_make_a_deeper_round_cheaper() -> None:
    # R(3) measured below R(2) (noise): the fitted curve pools them, so call 3 is not free.
    measured = [0.0426, 0.0411, 0.0388, 0.0400, 0.0419, 0.0500, 0.0640]
    assert nondecreasing_fit(measured) == pytest.approx([0.040625] * 4 + [0.0419, 0.05, 0.064])
    table = _table(measured, decode=0.0355)
    times = [table.round_time(d, d) for d in range(1, 8)]
    assert all(later >= earlier - 1e-12 for earlier, later in zip(times, times[1:]))
    assert nondecreasing_fit([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert nondecreasing_fit([3.0, 1.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_split_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="round_seconds"):
        split_chain_round_times([])
    with pytest.raises(ValueError, match="positive"):
        split_chain_round_times([0.01, 0.0])


def test_policy_step_time_is_positive_and_small() -> None:
    seconds = time_policy_step(state_size=4, draft_vocab_size=64, repeats=5, warmup=1)
    assert 0.0 < seconds < 1.0
    with pytest.raises(ValueError, match="repeats"):
        time_policy_step(state_size=4, draft_vocab_size=64, repeats=0)


def test_cli_vllm_engine_refuses_tree_mode(tmp_path, capsys) -> None:
    from radar_vllm.cli import main

    code = main(["calibrate", "--engine", "vllm", "--mode", "tree", "--target", str(tmp_path),
                 "--head", str(tmp_path), "--out", str(tmp_path / "costs.json")])
    assert code == 2
    assert "chain mode only" in capsys.readouterr().err
    assert not (tmp_path / "costs.json").exists()
