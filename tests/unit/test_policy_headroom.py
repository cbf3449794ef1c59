"""benchmarks/policy_headroom.py on synthetic rounds: the ceilings it reports are ordered."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from radar_vllm.core.costs import save_cost_table
from radar_vllm.offline.rl.synthetic import make_synthetic_costs, make_synthetic_table
from radar_vllm.offline.rl.table import write_shard

ROOT = Path(__file__).resolve().parents[2]


def test_headroom_rows_are_bounded_by_the_oracles(tmp_path) -> None:
    table = make_synthetic_table(120, max_depth=4, state_size=4, rate_range=(0.05, 0.9), seed=4)
    table.metadata.split = "heldout"
    write_shard(table, tmp_path / "heldout")
    costs = save_cost_table(make_synthetic_costs(), tmp_path / "costs.json")
    out = tmp_path / "headroom"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "policy_headroom.py"),
                    "--costs", str(costs), "--heldout", f"S={tmp_path / 'heldout'}",
                    "--out", str(out)], check=True, capture_output=True)
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
