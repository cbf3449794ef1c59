"""How much of the gap to the oracle can a stop policy close with the state it sees?

The oracle of the evaluation knows, per round, how many drafts the target will accept. A policy
sees only the draft model's log-probs (the state) and decides after each draft call, so it can
never choose depth 0 (no drafting) for one round and depth 3 for another on the strength of the
outcome. :func:`headroom` measures, on held-out rounds:

- the oracle, the oracle restricted to depths >= 1 (what is left once depth 0 is out of reach
  of a decision taken after the first draft call), and an oracle that may send nothing after
  the first draft call (a round costing one decode step plus that call): ceilings for any
  policy that decides after draft calls, however good its information;
- the trained policy (held-out, the honest number);
- an *in-sample fit*: the exact trainer run on the held-out rounds themselves and scored on
  them. It overfits by construction, so it is an optimistic estimate of what any policy of
  this form could reach with this state;
- logistic prediction of "the first draft is accepted" from the state after call 1
  (cross-validated by prompt): how predictable the outcome the oracle knows is.

Each throughput is reported with the share of the gap from the best fixed depth to the oracle
that it closes. ``radar-vllm policy-headroom`` writes the report.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from radar_vllm.core.policy import load_policy_checkpoint
from radar_vllm.offline.rl.rules import evaluate_policy
from radar_vllm.offline.rl.simulate import best_fixed_depth, oracle, round_outcomes
from radar_vllm.offline.rl.table import load_round_table
from radar_vllm.offline.rl.train import ExactConfig, train_exact


def first_draft_predictability(table, accepted_first: torch.Tensor, folds: int = 5
                               ) -> dict[str, float]:
    """Cross-validated (by prompt) logistic prediction of P(first draft accepted) from the state
    after call 1; returns the mean log-loss of the fit and of the constant predictor, and AUC."""
    states = table.states[:, 0, :].double().clamp(min=-30.0)  # [R, S]
    features = (states - states.mean(0)) / states.std(0).clamp(min=1e-6)
    features = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], 1)
    target = accepted_first.double()
    prompts = table.prompt_index
    unique = prompts.unique()
    fold_of = {int(p): i % folds for i, p in enumerate(unique.tolist())}
    fold = torch.tensor([fold_of[int(p)] for p in prompts])
    predicted = torch.zeros_like(target)
    for k in range(folds):
        train = fold != k
        if not bool((~train).any()):
            continue
        weights = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weights], max_iter=200)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                features[train] @ weights, target[train]) + 1e-3 * (weights ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        predicted[~train] = torch.sigmoid(features[~train] @ weights).detach()
    constant = torch.full_like(target, float(target.mean()))
    bce = torch.nn.functional.binary_cross_entropy
    # AUC of the prediction against the (at T > 0 fractional) acceptance: the weighted share of
    # (accepted, rejected) pairs ranked correctly (ties in the prediction are not expected).
    order = torch.argsort(predicted)
    positive, negative = target[order], 1.0 - target[order]
    negatives_below = torch.cumsum(negative, 0) - negative
    auc = float((positive * negatives_below).sum()) / max(
        float(positive.sum()) * float(negative.sum()), 1e-12)
    return {"log_loss_fit": float(bce(predicted, target)),
            "log_loss_constant": float(bce(constant, target)),
            "auc": auc, "mean_first_acceptance": float(target.mean())}


def headroom(label: str, table_path: str, policy_path: str | None, costs, seed: int
             ) -> dict[str, Any]:
    """Every row of the report for the held-out rounds in ``table_path`` (see the module doc)."""
    table = load_round_table(table_path)
    outcomes = round_outcomes(table, costs)
    best = best_fixed_depth(outcomes)
    best_spec = best_fixed_depth(outcomes, include_no_speculation=False)
    top = oracle(outcomes).result
    top_spec = oracle(outcomes, allow_no_speculation=False).result
    rows: list[tuple[str, Any]] = [(best.name + " (best fixed)", best)]
    if best_spec.name != best.name:
        rows.append((best_spec.name + " (best fixed >= 1)", best_spec))
    if policy_path is not None:
        policy = load_policy_checkpoint(policy_path).policy
        rows.append(("ours, trained on the training split",
                     evaluate_policy("ours", policy, table.states, outcomes)))
    fitted = train_exact(table, table, costs, ExactConfig(seed=seed))
    rows.append(("ours, fitted on these rounds (in-sample, optimistic)",
                 evaluate_policy("in-sample", fitted.policy, table.states, outcomes)))
    rows.append(("oracle without depth 0", top_spec))
    # A policy that may also drop the first draft after seeing it still paid for the call.
    dropping = replace(outcomes, decode_seconds=outcomes.decode_seconds + costs.first_draft_seconds)
    rows.append(("oracle that may send nothing after the first draft call",
                 oracle(dropping).result))
    rows.append(("oracle", top))
    gap = top.tokens_per_second - best.tokens_per_second
    out_rows = []
    for name, result in rows:
        out_rows.append({
            "name": name,
            "tokens_per_second": result.tokens_per_second,
            "mean_draft_calls": result.mean_draft_calls,
            "mean_acceptance_length": result.mean_acceptance_length,
            "gap_closed": (result.tokens_per_second - best.tokens_per_second) / gap
            if gap > 0 else None,
        })
    accepted_first = table.accept_probs[:, 0, 1:].sum(-1)  # P(L >= 1) of the depth-1 chain
    return {"label": label, "table": table.metadata.to_dict(), "num_rounds": table.num_rounds,
            "rows": out_rows,
            "first_draft": first_draft_predictability(table, accepted_first)}


def render(results: list[dict[str, Any]], costs_path: str, notes: list[str]) -> str:
    """The markdown report of :func:`headroom` results."""
    lines = ["# Headroom of a stop policy: how much of the oracle gap the state can explain", "",
             f"Held-out rounds, costs `{costs_path}`. 'gap closed' = (x - best fixed) / "
             "(oracle - best fixed). The in-sample row trains our policy on the very rounds it is "
             "scored on: an optimistic ceiling for a policy that sees this state.", ""]
    for result in results:
        meta = result["table"]
        lines += [f"## {result['label']}: T = {meta['temperature']:g}, {result['num_rounds']} "
                  f"rounds, {meta['num_prompts']} prompts", "",
                  "| rule | tokens/s | draft calls/round | acceptance length | gap closed |",
                  "|---|---:|---:|---:|---:|"]
        for row in result["rows"]:
            gap = "-" if row["gap_closed"] is None else f"{100 * row['gap_closed']:+.1f}%"
            lines.append(f"| {row['name']} | {row['tokens_per_second']:.2f} | "
                         f"{row['mean_draft_calls']:.3f} | {row['mean_acceptance_length']:.3f} | "
                         f"{gap} |")
        first = result["first_draft"]
        lines += ["", f"First draft accepted in {100 * first['mean_first_acceptance']:.1f}% of "
                  f"rounds; predicted from the state after call 1 (logistic, 5-fold by prompt): "
                  f"AUC {first['auc']:.3f}, log-loss {first['log_loss_fit']:.4f} vs "
                  f"{first['log_loss_constant']:.4f} for a constant.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines) + "\n"
