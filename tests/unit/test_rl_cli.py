"""train-policy and evaluate-policy end to end on synthetic shards."""
from __future__ import annotations

import json

from conftest import write_synthetic_costs, write_synthetic_rounds
from radar_vllm.cli import main
from radar_vllm.core.costs import save_cost_table
from radar_vllm.core.policy import DECISION_SAMPLED, DECISION_THRESHOLD, load_policy_checkpoint
from radar_vllm.offline.rl.synthetic import make_synthetic_costs


def test_train_and_evaluate_commands(tmp_path, capsys, one_torch_thread) -> None:
    train_dir, heldout_dir = tmp_path / "train", tmp_path / "heldout"
    write_synthetic_rounds(train_dir, 60, max_depth=3, state_size=3, seed=0)
    write_synthetic_rounds(train_dir, 60, max_depth=3, state_size=3, seed=5)
    write_synthetic_rounds(heldout_dir, 50, max_depth=3, state_size=3, seed=9, split="heldout")
    costs_path = write_synthetic_costs(tmp_path / "costs.json")
    out = tmp_path / "policies"
    code = main(["train-policy", "--table", str(train_dir), "--costs", str(costs_path),
                 "--out", str(out), "--epochs", "2", "--temperature", "1.0"])
    assert code == 0
    exact = load_policy_checkpoint(out / "exact")
    paper = load_policy_checkpoint(out / "reinforce")
    assert exact.config.decision == DECISION_THRESHOLD
    assert paper.config.decision == DECISION_SAMPLED
    assert exact.metadata["head_id"] == "synthetic-head"
    record = json.loads((out / "exact" / "training_record.json").read_text())
    assert record["train_rounds"] == 96 and record["val_rounds"] == 24
    assert len(record["history"]) == 2

    prefix = tmp_path / "results" / "eval"
    code = main(["evaluate-policy", "--table", str(heldout_dir), "--costs", str(costs_path),
                 "--policy", f"ours={out / 'exact'}", "--policy", f"paper={out / 'reinforce'}",
                 "--train-table", str(train_dir), "--out", str(prefix)])
    assert code == 0
    report = json.loads(prefix.with_suffix(".json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names[:4] == ["depth 0", "depth 1", "depth 2", "depth 3"]
    for name in ("ours (threshold)", "ours (sampled)", "paper (sampled)", "cost rule", "oracle"):
        assert name in names
    oracle_row = report["rows"][names.index("oracle")]
    assert all(oracle_row["tokens_per_second"] >= row["tokens_per_second"] * (1 - 1e-12)
               for row in report["rows"] if row["name"].startswith("depth"))
    assert prefix.with_suffix(".md").read_text().count("\n| ") >= 9
    assert prefix.with_suffix(".png").stat().st_size > 0

    # The acceptance-budget variant of ours records its token-weight search.
    budgeted = tmp_path / "budgeted"
    assert main(["train-policy", "--table", str(train_dir), "--costs", str(costs_path),
                 "--out", str(budgeted), "--epochs", "2", "--algorithm", "exact",
                 "--acceptance-budget", "0.05"]) == 0
    record = json.loads((budgeted / "exact" / "training_record.json").read_text())
    assert record["budget_search"]["acceptance_budget"] == 0.05
    assert record["budget_search"]["trials"][0]["token_weight"] == 1.0

    # Bad input: another temperature than requested, or costs of another head.
    capsys.readouterr()
    assert main(["train-policy", "--table", str(train_dir), "--costs", str(costs_path),
                 "--out", str(out), "--temperature", "0"]) == 2
    assert "temperature" in capsys.readouterr().err
    for algorithm, budget, message in (("reinforce", "0.01", "applies to --algorithm exact"),
                                       ("exact", "1.5", "acceptance_budget")):
        assert main(["train-policy", "--table", str(train_dir), "--costs", str(costs_path),
                     "--out", str(out), "--algorithm", algorithm,
                     "--acceptance-budget", budget]) == 2
        assert message in capsys.readouterr().err
    other = save_cost_table(make_synthetic_costs(head_id="another"), tmp_path / "other.json")
    assert main(["evaluate-policy", "--table", str(heldout_dir), "--costs", str(other),
                 "--out", str(prefix)]) == 2
    assert "head" in capsys.readouterr().err
    # Tables from the train and held-out splits cannot be mixed.
    assert main(["evaluate-policy", "--table", str(heldout_dir), str(train_dir),
                 "--costs", str(costs_path), "--out", str(prefix)]) == 2
    assert "split" in capsys.readouterr().err
