"""Round tables as a simulator: expected tokens and time of stop rules, and the per-round oracle.

Throughput over a run is a ratio of sums, total tokens / total time, never a mean of per-round
ratios. For a stop rule giving each round r a law P_r(d) over the number of draft calls d:

    E[tokens_r] = sum_d P_r(d) * (E[L_{r,d}] + 1)        (accepted drafts + the bonus token)
    E[time_r]   = sum_d P_r(d) * time_{r,d}
    throughput  = sum_r E[tokens_r] / sum_r E[time_r]

Depth 0 (no speculation) yields exactly one token in ``decode_step_seconds``.

The oracle picks per round the stop maximising E[tokens] - lambda * time, with lambda updated by
Dinkelbach's iteration (lambda <- throughput of the current choice) until the choice no longer
changes. At the fixed point no per-round choice, in particular no fixed depth, has a higher
ratio of sums (proof: for any choice c, sum_r tokens_c - lambda* time_c <= 0).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from radar_vllm.core.costs import CostTable, check_cost_table
from radar_vllm.offline.rl.table import RoundTable

logger = logging.getLogger(__name__)

NO_SPECULATION_DEPTH = 0
MAX_DINKELBACH_ITERATIONS = 100


@dataclass(frozen=True)
class RoundOutcomes:
    """Per round and per stop d = 1..D: expected tokens and seconds (float64)."""

    # [R, D] E[L_d] + 1
    tokens: torch.Tensor
    # [R, D] expected accepted draft tokens E[L_d]
    accepted: torch.Tensor
    # [R, D] seconds of a round stopped after d calls with no policy decisions (fixed depth)
    times_fixed: torch.Tensor
    # [D] policy decisions taken by a round stopped after d calls: min(d, D - 1)
    policy_steps: torch.Tensor
    policy_step_seconds: float
    # Seconds of one plain decode step (depth 0, one token)
    decode_seconds: float

    @property
    def num_rounds(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.tokens.shape[1])

    def times(self, policy_cost: bool) -> torch.Tensor:
        """[R, D] seconds, with the stop-policy decisions charged if ``policy_cost``."""
        if not policy_cost:
            return self.times_fixed
        return self.times_fixed + self.policy_steps.to(torch.float64) * self.policy_step_seconds


def decisions_per_stop(max_depth: int) -> torch.Tensor:
    """[D] number of policy decisions in a round stopped after d = 1..D calls: min(d, D - 1).

    The policy decides after calls 1..D-1; after call D the round stops without a decision.
    """
    calls = torch.arange(1, max_depth + 1)
    return calls.clamp(max=max(max_depth - 1, 0))


def round_outcomes(table: RoundTable, costs: CostTable, check: bool = True) -> RoundOutcomes:
    """Precompute expected tokens and times of every stop of every round."""
    if check:
        check_cost_table(costs, model_id=table.metadata.model_id,
                         head_id=table.metadata.head_id,
                         max_tree_size=int(table.tree_sizes.max()) if table.num_rounds else None)
    accepted = table.expected_accepted()
    return RoundOutcomes(
        tokens=accepted + 1.0,
        accepted=accepted,
        times_fixed=costs.round_times(table.tree_sizes),
        policy_steps=decisions_per_stop(table.max_depth),
        policy_step_seconds=costs.policy_step_seconds,
        decode_seconds=costs.decode_step_seconds,
    )


def stop_distribution(continue_probs: torch.Tensor) -> torch.Tensor:
    """P(stop after d calls), d = 1..D, from per-decision continue probabilities.

    ``continue_probs`` ``[R, D]``: column t is P(continue) at the decision after call t + 1;
    the last column is ignored (after call D the round always stops). Returns ``[R, D]`` whose
    rows sum to 1: P(d) = prod_{t < d-1} c_t * (1 - c_{d-1}) for d < D, P(D) = prod_{t < D-1} c_t.
    """
    num_rounds, depth = continue_probs.shape
    forced = continue_probs.clone()
    forced[:, depth - 1] = 0.0  # forced stop after the last call
    ones = torch.ones(num_rounds, 1, dtype=continue_probs.dtype, device=continue_probs.device)
    reach = torch.cumprod(torch.cat([ones, forced[:, :-1]], dim=1), dim=1)  # P(call d happens)
    return reach * (1.0 - forced)


def log_stop_distribution(continue_logits: torch.Tensor, stop_logits: torch.Tensor
                          ) -> torch.Tensor:
    """Numerically stable log P(stop after d) from the two action logits, ``[R, D]`` each."""
    log_norm = torch.logaddexp(continue_logits, stop_logits)
    log_cont = continue_logits - log_norm
    log_stop = stop_logits - log_norm
    depth = continue_logits.shape[1]
    log_stop = torch.cat([log_stop[:, :-1], torch.zeros_like(log_stop[:, -1:])], dim=1)
    reach = torch.cumsum(torch.cat([torch.zeros_like(log_cont[:, :1]), log_cont[:, :-1]], dim=1),
                         dim=1)
    assert reach.shape[1] == depth
    return reach + log_stop


@dataclass(frozen=True)
class RuleResult:
    """Expected performance of a stop rule on a table."""

    name: str
    tokens_per_second: float
    # Mean number of draft calls per round.
    mean_draft_calls: float
    # Mean accepted draft tokens per round (E[L]).
    mean_accepted: float
    # Mean tokens per round including the bonus (E[L] + 1), the usual "acceptance length".
    mean_acceptance_length: float
    total_tokens: float
    total_seconds: float
    num_rounds: int

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def evaluate_stop_probs(name: str, outcomes: RoundOutcomes, stop_probs: torch.Tensor,
                        policy_cost: bool) -> RuleResult:
    """Result of a rule given as P(stop after d) ``[R, D]`` (rows sum to 1)."""
    stop_probs = stop_probs.to(torch.float64)
    tokens = float((stop_probs * outcomes.tokens).sum())
    accepted = float((stop_probs * outcomes.accepted).sum())
    seconds = float((stop_probs * outcomes.times(policy_cost)).sum())
    calls = torch.arange(1, outcomes.max_depth + 1, dtype=torch.float64)
    num_rounds = outcomes.num_rounds
    return RuleResult(
        name=name,
        tokens_per_second=tokens / seconds,
        mean_draft_calls=float((stop_probs * calls).sum()) / num_rounds,
        mean_accepted=accepted / num_rounds,
        mean_acceptance_length=tokens / num_rounds,
        total_tokens=tokens,
        total_seconds=seconds,
        num_rounds=num_rounds,
    )


def evaluate_fixed_depth(outcomes: RoundOutcomes, depth: int) -> RuleResult:
    """Always stop after ``depth`` calls (0 = no speculation)."""
    if not 0 <= depth <= outcomes.max_depth:
        raise ValueError(f"depth must be in [0, {outcomes.max_depth}], got {depth}")
    num_rounds = outcomes.num_rounds
    if depth == NO_SPECULATION_DEPTH:
        seconds = outcomes.decode_seconds * num_rounds
        return RuleResult(name="depth 0", tokens_per_second=num_rounds / seconds,
                          mean_draft_calls=0.0, mean_accepted=0.0, mean_acceptance_length=1.0,
                          total_tokens=float(num_rounds), total_seconds=seconds,
                          num_rounds=num_rounds)
    stop_probs = torch.zeros(num_rounds, outcomes.max_depth, dtype=torch.float64)
    stop_probs[:, depth - 1] = 1.0
    return evaluate_stop_probs(f"depth {depth}", outcomes, stop_probs, policy_cost=False)


@dataclass(frozen=True)
class OracleResult:
    result: RuleResult
    # [R] chosen stop per round (0 = no speculation)
    choice: torch.Tensor
    # Dinkelbach lambda (tokens per second) at each iteration
    lambdas: list[float]


def oracle(outcomes: RoundOutcomes, allow_no_speculation: bool = True) -> OracleResult:
    """Per-round best stop in hindsight for the ratio of sums (Dinkelbach iteration).

    Choices per round: stop after d = 1..D calls (fixed-depth times, no policy cost) and, with
    ``allow_no_speculation``, depth 0 (one token in one decode step).
    """
    tokens = outcomes.tokens
    times = outcomes.times_fixed
    if allow_no_speculation:
        ones = torch.ones(outcomes.num_rounds, 1, dtype=torch.float64)
        tokens = torch.cat([ones, tokens], dim=1)
        times = torch.cat([ones * outcomes.decode_seconds, times], dim=1)
    depth_offset = 0 if allow_no_speculation else 1
    # Start from the best single column (a fixed depth).
    column_ratio = tokens.sum(0) / times.sum(0)
    rows = torch.arange(outcomes.num_rounds)
    choice = torch.full((outcomes.num_rounds,), int(column_ratio.argmax()), dtype=torch.long)
    lam = float(tokens[rows, choice].sum() / times[rows, choice].sum())
    lambdas = [lam]
    for _ in range(MAX_DINKELBACH_ITERATIONS):
        gain = tokens - lam * times
        new_choice = gain.argmax(dim=1)
        # Keep the current choice on ties so the iteration terminates.
        keep = gain[rows, choice] >= gain[rows, new_choice]
        new_choice = torch.where(keep, choice, new_choice)
        new_lam = float(tokens[rows, new_choice].sum() / times[rows, new_choice].sum())
        if torch.equal(new_choice, choice) or new_lam <= lam:
            if new_lam > lam:
                choice, lam = new_choice, new_lam
                lambdas.append(lam)
            break
        choice, lam = new_choice, new_lam
        lambdas.append(lam)
    choice_depth = choice + depth_offset
    num_rounds = outcomes.num_rounds
    chosen_tokens = tokens[rows, choice]
    chosen_accepted = chosen_tokens - 1.0
    seconds = float(times[rows, choice].sum())
    result = RuleResult(
        name="oracle",
        tokens_per_second=float(chosen_tokens.sum()) / seconds,
        mean_draft_calls=float(choice_depth.double().mean()),
        mean_accepted=float(chosen_accepted.sum()) / num_rounds,
        mean_acceptance_length=float(chosen_tokens.sum()) / num_rounds,
        total_tokens=float(chosen_tokens.sum()),
        total_seconds=seconds,
        num_rounds=num_rounds,
    )
    return OracleResult(result=result, choice=choice_depth, lambdas=lambdas)


def best_fixed_depth(outcomes: RoundOutcomes, include_no_speculation: bool = True
                     ) -> RuleResult:
    """The fixed depth with the highest throughput."""
    first = 0 if include_no_speculation else 1
    results = [evaluate_fixed_depth(outcomes, d) for d in range(first, outcomes.max_depth + 1)]
    return max(results, key=lambda r: r.tokens_per_second)
