"""``radar-vllm policy-headroom`` on synthetic rounds: the ceilings it reports are ordered."""
from __future__ import annotations

import json

from conftest import write_synthetic_costs, write_synthetic_rounds
from radar_vllm.cli import main


def test_headroom_rows_are_bounded_by_the_oracles(tmp_path, one_torch_thread) -> None:
    heldout = write_synthetic_rounds(tmp_path / "heldout", 120, max_depth=4, state_size=4, seed=4,
                                     rate_range=(0.05, 0.9), split="heldout")
    costs = write_synthetic_costs(tmp_path / "costs.json")
    out = tmp_path / "headroom"
    assert main(["policy-headroom", "--costs", str(costs), "--heldout", f"S={heldout}", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())["results"][0]
    rows = {row["name"]: row["tokens_per_second"] for row in result["rows"]}
    best = next(value for name, value in rows.items() if name.endswith("(best fixed)"))
    no_depth0 = rows["oracle without depth 0"]
    dropping = rows["oracle that may send nothing after the first draft call"]
    top = rows["oracle"]
    fitted = rows["ours, fitted on these rounds (in-sample, optimistic)"]
    assert best <= top and no_depth0 <= dropping <= top
    assert fitted <= no_depth0 * (1 + 1e-9)  # it must draft at least once, like any policy
    gaps = [row["gap_closed"] for row in result["rows"]]
    assert gaps[0] == 0.0 and abs(gaps[-1] - 1.0) < 1e-12
    first = result["first_draft"]
    assert 0.0 <= first["auc"] <= 1.0 and first["log_loss_fit"] <= first["log_loss_constant"]
    assert "| oracle |" in out.with_suffix(".md").read_text()
