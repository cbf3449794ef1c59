"""Merge per-temperature policy evaluations into one table with the issue's goals checked.

    python benchmarks/summarize_policy_eval.py --eval T0=benchmarks/results/policy_smollm2_chain_T0.json \
        --eval T1=benchmarks/results/policy_smollm2_chain_T1.json --record run_record.json \
        --out benchmarks/results/policy_smollm2_chain

Writes ``<out>.json`` and ``<out>.md``. Goals (held-out rounds, per temperature): the policy beats
the best fixed depth in expected tokens/s, closes >= 50% of the gap from the best fixed depth to
the oracle, and drafts >= 20% fewer calls than full depth with mean acceptance length within 2%
of full depth. Because a RADAR policy decides only after the first draft call, it can never stop
at depth 0; the table therefore also compares against the best fixed depth >= 1.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

GAP_GOAL = 0.5
DRAFT_REDUCTION_GOAL = 0.2
ACCEPTANCE_TOLERANCE = 0.02


def _rows(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in evaluation["rows"]}


def goals_for(evaluation: dict[str, Any], rule: str) -> dict[str, Any]:
    """Goal checks of ``rule`` in one evaluation (see the module docstring)."""
    rows = _rows(evaluation)
    fixed = {name: row for name, row in rows.items() if name.startswith("depth ")}
    depths = sorted(int(name.split()[1]) for name in fixed)
    best_name = max(fixed, key=lambda name: fixed[name]["tokens_per_second"])
    speculative = [f"depth {d}" for d in depths if d >= 1]
    best_spec_name = max(speculative, key=lambda name: fixed[name]["tokens_per_second"])
    full = fixed[f"depth {depths[-1]}"]
    oracle = rows["oracle"]["tokens_per_second"]
    row = rows[rule]
    tps = row["tokens_per_second"]

    def gap(base: float) -> float | None:
        return None if oracle <= base else (tps - base) / (oracle - base)

    best = fixed[best_name]["tokens_per_second"]
    best_spec = fixed[best_spec_name]["tokens_per_second"]
    draft_reduction = 1.0 - row["mean_draft_calls"] / full["mean_draft_calls"]
    acceptance_change = row["mean_acceptance_length"] / full["mean_acceptance_length"] - 1.0
    gap_best = gap(best)
    return {
        "rule": rule,
        "tokens_per_second": tps,
        "best_fixed": best_name,
        "best_fixed_tokens_per_second": best,
        "speedup_over_best_fixed": tps / best,
        "gap_closed_vs_best_fixed": gap_best,
        "best_speculative_fixed": best_spec_name,
        "speedup_over_best_speculative_fixed": tps / best_spec,
        "gap_closed_vs_best_speculative_fixed": gap(best_spec),
        "oracle_tokens_per_second": oracle,
        "draft_call_reduction_vs_full_depth": draft_reduction,
        "acceptance_length_change_vs_full_depth": acceptance_change,
        "goal_beats_best_fixed": tps > best,
        "goal_half_gap_closed": gap_best is not None and gap_best >= GAP_GOAL,
        "goal_fewer_draft_calls": draft_reduction >= DRAFT_REDUCTION_GOAL,
        "goal_acceptance_within_2pct": abs(acceptance_change) <= ACCEPTANCE_TOLERANCE,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:+.1f}%"


def render(evaluations: dict[str, dict[str, Any]], record: dict[str, Any],
           rules: list[str]) -> tuple[str, dict[str, Any]]:
    lines = ["# Stop policies for the SmolLM2-135M EAGLE-3 head, chain mode, held-out rounds", ""]
    merged: dict[str, Any] = {"record": record, "temperatures": {}}
    for label, evaluation in evaluations.items():
        meta = evaluation["table_metadata"]
        costs = evaluation["costs"]
        lines += [f"## {label}: temperature {meta['temperature']}", "",
                  f"{meta['num_rounds']} held-out rounds from {meta['num_prompts']} prompts "
                  f"({meta['prompt_set']}/{meta['split']}), head {meta['head_id']}, target "
                  f"{meta['model_id']}, max depth {meta['max_depth']}; costs: {costs['engine']} "
                  f"on {costs['machine'].get('cpu_model')} x{costs['machine'].get('num_cpus')}.", "",
                  "| rule | tokens/s | draft calls/round | acceptance length |",
                  "|---|---:|---:|---:|"]
        for row in evaluation["rows"]:
            lines.append(f"| {row['name']} | {row['tokens_per_second']:.2f} | "
                         f"{row['mean_draft_calls']:.3f} | {row['mean_acceptance_length']:.3f} |")
        checks = {rule: goals_for(evaluation, rule) for rule in rules if rule in _rows(evaluation)}
        lines += ["", "| rule | vs best fixed | gap closed | vs best depth >= 1 | gap closed (>= 1) "
                      "| fewer draft calls than full depth | acceptance length vs full depth "
                      "| goals met |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for rule, check in checks.items():
            met = [name for name in ("goal_beats_best_fixed", "goal_half_gap_closed",
                                     "goal_fewer_draft_calls", "goal_acceptance_within_2pct")
                   if check[name]]
            lines.append(
                f"| {rule} | {check['speedup_over_best_fixed']:.3f}x ({check['best_fixed']}) | "
                f"{_pct(check['gap_closed_vs_best_fixed'])} | "
                f"{check['speedup_over_best_speculative_fixed']:.3f}x "
                f"({check['best_speculative_fixed']}) | "
                f"{_pct(check['gap_closed_vs_best_speculative_fixed'])} | "
                f"{100.0 * check['draft_call_reduction_vs_full_depth']:.1f}% | "
                f"{_pct(check['acceptance_length_change_vs_full_depth'])} | "
                f"{len(met)}/4 |")
        lines.append("")
        merged["temperatures"][label] = {"evaluation": evaluation, "goals": checks}
    lines += ["## How this was made", "", "```json", json.dumps(record, indent=2), "```", ""]
    return "\n".join(lines), merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", action="append", required=True, metavar="LABEL=JSON")
    parser.add_argument("--record", type=Path, required=True, help="provenance JSON to include")
    parser.add_argument("--rules", default="ours (threshold),paper (threshold),paper (sampled),"
                                           "cost rule,cost rule (tuned),oracle")
    parser.add_argument("--out", type=Path, required=True, help="output prefix")
    args = parser.parse_args()
    evaluations = {}
    for item in args.eval:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--eval must be LABEL=JSON, got {item!r}")
        evaluations[label] = json.loads(Path(path).read_text(encoding="utf-8"))
    record = json.loads(args.record.read_text(encoding="utf-8"))
    text, merged = render(evaluations, record, [r for r in args.rules.split(",") if r])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
