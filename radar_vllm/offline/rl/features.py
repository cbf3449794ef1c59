"""What the signals available before a round's first draft call buy: a per-feature account.

A round may skip drafting (depth 0) only on what is known before its first draft call: the load
(batch size), the temperature, how the request's previous round went, and how sure the target was
of the token it just emitted. The gate (:mod:`radar_vllm.core.draft_gate`) uses the first two: they
move the costs and the acceptance of a whole batch. The other two are per request; this module
measures, on recorded rounds, how well each predicts whether a round's first draft is accepted
(:func:`auc`) and what the best rule "skip drafting where the feature is below a threshold" gains
over always drafting, at step costs measured in the engine (:func:`skip_rule`), against the oracle
that skips exactly the rounds whose first draft is rejected.

Rounds are scored one at a time: a skipped round yields one token in a depth-0 step, a drafted one
``1 + accepted`` tokens in a drafting step (the usual offline approximation; skipping a round
shifts the rounds after it). Pure functions, no vLLM import.

Worked example: accepted = [0, 2, 0, 1], feature = [0.2, 0.9, 0.4, 0.8], costs 40 / 46 ms:
always drafting yields 7 tokens in 184 ms (38.0 tok/s); skipping below 0.5 yields 1 + 3 + 1 + 2 =
7 tokens in 40 + 46 + 40 + 46 = 172 ms (40.7 tok/s), which is also the oracle here.
"""
from __future__ import annotations

from typing import Sequence


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Probability that a positive's score beats a negative's (ties count half); None without both."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):  # average ranks over ties
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2.0 + 1.0
        start = end + 1
    positives = sum(1 for label in labels if label)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    rank_sum = sum(rank for rank, label in zip(ranks, labels) if label)
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def _rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _totals(skips: Sequence[bool], accepted: Sequence[int], skip_seconds: float,
            draft_seconds: float) -> tuple[float, float]:
    """Tokens and seconds of rounds that skip (one token in a depth-0 step) or draft (``1 +
    accepted`` tokens in a drafting step) as ``skips`` says."""
    tokens = sum(1 if skip else 1 + a for skip, a in zip(skips, accepted))
    seconds = sum(skip_seconds if skip else draft_seconds for skip in skips)
    return tokens, seconds


def threshold_rate(feature: Sequence[float], accepted: Sequence[int], threshold: float, skip_seconds: float,
                   draft_seconds: float) -> float:
    """Tokens per second of "skip drafting where feature < threshold" on these rounds."""
    return _rate(*_totals([f < threshold for f in feature], accepted, skip_seconds, draft_seconds))


def held_out_rule(feature: Sequence[float], accepted: Sequence[int], folds: Sequence[int], skip_seconds: float,
                  draft_seconds: float) -> float:
    """Tokens per second of the threshold rule chosen on the other folds, round by round (cross-
    validated: ``folds`` gives each round's fold, e.g. by prompt, so a threshold is never scored on
    the rounds it was chosen on)."""
    tokens = seconds = 0.0
    for fold in sorted(set(folds)):
        train = [i for i, f in enumerate(folds) if f != fold]
        test = [i for i, f in enumerate(folds) if f == fold]
        if not train:
            raise ValueError("held_out_rule needs at least two folds")
        threshold = skip_rule([feature[i] for i in train], [accepted[i] for i in train], skip_seconds,
                              draft_seconds)["threshold"]
        fold_tokens, fold_seconds = _totals([feature[i] < threshold for i in test], [accepted[i] for i in test],
                                            skip_seconds, draft_seconds)
        tokens += fold_tokens
        seconds += fold_seconds
    return _rate(tokens, seconds)


def skip_rule(feature: Sequence[float], accepted: Sequence[int], skip_seconds: float,
              draft_seconds: float) -> dict[str, float]:
    """The best threshold rule "skip where feature < t" against always and never drafting.

    ``accepted``: drafts accepted in each round when it drafts; ``skip_seconds`` / ``draft_seconds``:
    a depth-0 step and a drafting step. Returns tokens/s of ``always`` (drafting), ``never``, the
    best ``rule`` (its ``threshold`` and ``skipped`` share) and the ``oracle``; rates are per
    request-step time, comparable with each other only.
    """
    if len(feature) != len(accepted):
        raise ValueError(f"{len(feature)} feature values but {len(accepted)} rounds")
    if not accepted:
        raise ValueError("no rounds")
    if skip_seconds <= 0 or draft_seconds <= 0:
        raise ValueError("step seconds must be positive")
    rounds = len(accepted)
    always = _rate(rounds + sum(accepted), rounds * draft_seconds)
    never = _rate(rounds, rounds * skip_seconds)
    oracle = _rate(*_totals([a == 0 for a in accepted], accepted, skip_seconds, draft_seconds))
    # sweep thresholds over the sorted feature values: skipping the k rounds of lowest feature
    order = sorted(range(rounds), key=lambda i: feature[i])
    tokens, seconds = rounds + sum(accepted), rounds * draft_seconds
    best = {"rate": always, "threshold": float("-inf"), "skipped": 0.0}
    for k, index in enumerate(order, start=1):
        tokens -= accepted[index]
        seconds += skip_seconds - draft_seconds
        # a threshold only separates distinct values: skip all of a tie or none of it
        if k < rounds and feature[order[k]] == feature[index]:
            continue
        rate = _rate(tokens, seconds)
        if rate > best["rate"]:
            threshold = feature[order[k]] if k < rounds else float("inf")
            best = {"rate": rate, "threshold": threshold, "skipped": k / rounds}
    return {"always": always, "never": never, "rule": best["rate"], "threshold": best["threshold"],
            "skipped": best["skipped"], "oracle": oracle}
