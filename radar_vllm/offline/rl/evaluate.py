"""Evaluation of stop rules on (held-out) round tables under a cost table.

Rows: every fixed depth 0..D, each given policy in threshold and sampled mode, the training-free
cost rule, and the per-round oracle. Each row reports expected tokens per second (a ratio of
sums over the rounds), mean draft calls per round, mean accepted draft tokens and mean
acceptance length (tokens per round including the bonus token). Dynamic rules are charged one
policy step per decision; fixed depths and the oracle are not.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from radar_vllm.core.costs import CostTable
from radar_vllm.core.policy import StopPolicy
from radar_vllm.offline.rl.rules import (
    MODE_SAMPLED,
    MODE_THRESHOLD,
    cost_rule_stop_probs,
    evaluate_policy,
    policy_stop_probs,
    tune_cost_rule,
)
from radar_vllm.offline.rl.simulate import (
    RuleResult,
    best_fixed_depth,
    evaluate_fixed_depth,
    evaluate_stop_probs,
    oracle,
    round_outcomes,
)
from radar_vllm.offline.rl.table import RoundTable

logger = logging.getLogger(__name__)


@dataclass
class EvaluationReport:
    rows: list[RuleResult]
    table_metadata: dict[str, Any]
    costs: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> RuleResult:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row named {name!r}; rows: {[r.name for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [row.to_dict() for row in self.rows], "summary": self.summary,
                "table_metadata": self.table_metadata, "costs": self.costs}


def evaluate_rules(table: RoundTable, costs: CostTable,
                   policies: Mapping[str, StopPolicy] | None = None,
                   train_table: RoundTable | None = None,
                   threshold: float = 0.5) -> EvaluationReport:
    """Evaluate fixed depths, policies (both decision modes), the cost rule and the oracle.

    The cost rule's reference throughput (the price of one more level) is the best fixed
    depth's on ``train_table`` when given (and its gain threshold is also tuned there, as a
    second row), else on ``table`` itself.
    """
    outcomes = round_outcomes(table, costs)
    rows = [evaluate_fixed_depth(outcomes, d) for d in range(table.max_depth + 1)]
    for name, policy in (policies or {}).items():
        for mode in (MODE_THRESHOLD, MODE_SAMPLED):
            rows.append(evaluate_policy(f"{name} ({mode})", policy, table.states, outcomes, mode,
                                        threshold))
    reference_outcomes = round_outcomes(train_table, costs) if train_table is not None \
        else outcomes
    reference_throughput = best_fixed_depth(reference_outcomes).tokens_per_second
    gain_threshold = reference_throughput * (costs.draft_step_seconds + costs.policy_step_seconds)
    rows.append(evaluate_stop_probs("cost rule", outcomes,
                                    cost_rule_stop_probs(table.states, gain_threshold),
                                    policy_cost=True))
    summary: dict[str, Any] = {"cost_rule_gain_threshold": gain_threshold}
    if train_table is not None:
        tuned = tune_cost_rule(train_table.states, reference_outcomes)
        rows.append(evaluate_stop_probs("cost rule (tuned)", outcomes,
                                        cost_rule_stop_probs(table.states, tuned),
                                        policy_cost=True))
        summary["cost_rule_tuned_gain_threshold"] = tuned
    oracle_result = oracle(outcomes)
    rows.append(oracle_result.result)
    summary.update(_summarise(rows, table.max_depth))
    summary["oracle_lambdas"] = oracle_result.lambdas
    return EvaluationReport(rows=rows, table_metadata=table.metadata.to_dict(),
                            costs=costs.to_dict(), summary=summary)


def _summarise(rows: list[RuleResult], max_depth: int) -> dict[str, Any]:
    by_name = {row.name: row for row in rows}
    fixed = [by_name[f"depth {d}"] for d in range(max_depth + 1)]
    best = max(fixed, key=lambda r: r.tokens_per_second)
    full = by_name[f"depth {max_depth}"]
    top = by_name["oracle"]
    summary: dict[str, Any] = {"best_fixed": best.name,
                               "best_fixed_tokens_per_second": best.tokens_per_second,
                               "oracle_tokens_per_second": top.tokens_per_second,
                               "rules": {}}
    gap = top.tokens_per_second - best.tokens_per_second
    for row in rows:
        if row.name.startswith("depth ") or row.name == "oracle":
            continue
        summary["rules"][row.name] = {
            "speedup_over_best_fixed": row.tokens_per_second / best.tokens_per_second,
            "gap_closed": (row.tokens_per_second - best.tokens_per_second) / gap
            if gap > 0 else None,
            "draft_call_reduction_vs_full_depth": 1.0 - row.mean_draft_calls /
            full.mean_draft_calls,
            "acceptance_length_change_vs_full_depth": row.mean_acceptance_length /
            full.mean_acceptance_length - 1.0,
        }
    return summary


def markdown_table(report: EvaluationReport, title: str = "") -> str:
    """The report as a markdown table (one row per rule) plus the summary lines."""
    meta = report.table_metadata
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += [
        f"Rounds: {report.rows[0].num_rounds} ({meta.get('prompt_set')}/{meta.get('split')}), "
        f"temperature {meta.get('temperature')}, top_k {meta.get('top_k')}, "
        f"max depth {meta.get('max_depth')}, total tokens {meta.get('total_tokens')}; costs: "
        f"{report.costs.get('engine')} on {report.costs.get('machine', {}).get('cpu_model')}"
        f" / {report.costs.get('machine', {}).get('accelerator')}.",
        "",
        "| rule | tokens/s | vs best fixed | draft calls/round | accepted drafts | "
        "acceptance length |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    best = report.summary["best_fixed_tokens_per_second"]
    for row in report.rows:
        lines.append(
            f"| {row.name} | {row.tokens_per_second:.4g} | {row.tokens_per_second / best:.4f} | "
            f"{row.mean_draft_calls:.3f} | {row.mean_accepted:.3f} | "
            f"{row.mean_acceptance_length:.3f} |"
        )
    lines.append("")
    for name, stats in report.summary["rules"].items():
        gap = stats["gap_closed"]
        gap_text = f"{gap:.1%}" if gap is not None else "n/a"
        lines.append(
            f"- {name}: {stats['speedup_over_best_fixed']:.4f}x best fixed "
            f"({report.summary['best_fixed']}), gap to oracle closed {gap_text}, "
            f"{stats['draft_call_reduction_vs_full_depth']:.1%} fewer draft calls than full "
            f"depth, acceptance length {stats['acceptance_length_change_vs_full_depth']:+.2%}"
        )
    return "\n".join(lines) + "\n"


def plot_report(report: EvaluationReport, path: str | os.PathLike[str], title: str = "") -> Path:
    """Tokens/s against draft calls per round: fixed depths as a line, other rules as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = [r for r in report.rows if r.name.startswith("depth ")]
    others = [r for r in report.rows if not r.name.startswith("depth ")]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot([r.mean_draft_calls for r in fixed], [r.tokens_per_second for r in fixed], "o-",
              color="gray", label="fixed depth 0..D")
    markers = "s^vD*PXh"
    for index, row in enumerate(others):
        axes.plot(row.mean_draft_calls, row.tokens_per_second, markers[index % len(markers)],
                  markersize=9, label=row.name)
    axes.set_xlabel("draft calls per round")
    axes.set_ylabel("expected tokens / s")
    axes.set_title(title or "stop rules on held-out rounds")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_report(report: EvaluationReport, prefix: str | os.PathLike[str], title: str = "",
                 extra: Mapping[str, Any] | None = None, plot: bool = True) -> list[Path]:
    """Write ``prefix.json``, ``prefix.md`` and (with ``plot``) ``prefix.png``."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    if extra:
        data["extra"] = dict(extra)
    json_path = prefix.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    md_path = prefix.with_suffix(".md")
    md_path.write_text(markdown_table(report, title), encoding="utf-8")
    paths = [json_path, md_path]
    if plot:
        paths.append(plot_report(report, prefix.with_suffix(".png"), title))
    return paths


def deterministic_rule_stop_depths(policy: StopPolicy, table: RoundTable, threshold: float = 0.5
                                   ) -> torch.Tensor:
    """[R] stop depth chosen by the threshold policy on each round (1..D)."""
    stop = policy_stop_probs(policy, table.states, MODE_THRESHOLD, threshold)
    return stop.argmax(dim=1) + 1
