"""Stop rules evaluated on round tables: a learned StopPolicy and the training-free cost rule.

Each function returns P(stop after d calls) ``[R, D]`` (float64, rows sum to 1), ready for
:func:`radar_vllm.offline.rl.simulate.evaluate_stop_probs`.
"""
from __future__ import annotations

import torch

from radar_vllm.core.policy import ACTION_CONTINUE, StopPolicy
from radar_vllm.offline.rl.simulate import RoundOutcomes, RuleResult, evaluate_stop_probs, stop_distribution

MODE_THRESHOLD = "threshold"
MODE_SAMPLED = "sampled"


def table_features(policy: StopPolicy, states: torch.Tensor) -> torch.Tensor:
    """The policy's input features for recorded states ``[R, D, S]`` -> ``[R, D, S]``."""
    num_rounds, depth, size = states.shape
    return policy.features(states.reshape(num_rounds * depth, size)).reshape(num_rounds, depth, size)


def policy_logits(policy: StopPolicy, states: torch.Tensor, batch_size: int = 8192
                  ) -> torch.Tensor:
    """Eval-mode logits ``[R, D, 2]`` of a policy over recorded states ``[R, D, S]``."""
    was_training = policy.training
    policy.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, states.shape[0], batch_size):
            chunk = table_features(policy, states[start:start + batch_size])
            outputs.append(policy(chunk))
    policy.train(was_training)
    if not outputs:
        return torch.zeros(0, states.shape[1], 2)
    return torch.cat(outputs)


def policy_continue_probs(policy: StopPolicy, states: torch.Tensor, mode: str,
                          threshold: float = 0.5) -> torch.Tensor:
    """P(continue) ``[R, D]`` per decision: 0/1 in threshold mode, the softmax in sampled mode."""
    logits = policy_logits(policy, states).double()
    p_continue = torch.softmax(logits, dim=-1)[..., ACTION_CONTINUE]
    if mode == MODE_THRESHOLD:
        return (p_continue >= threshold).double()
    if mode == MODE_SAMPLED:
        return p_continue
    raise ValueError(f"mode must be {MODE_THRESHOLD!r} or {MODE_SAMPLED!r}, got {mode!r}")


def policy_stop_probs(policy: StopPolicy, states: torch.Tensor, mode: str,
                      threshold: float = 0.5) -> torch.Tensor:
    """P(stop after d) ``[R, D]`` of a policy (expected over its sampling in sampled mode)."""
    return stop_distribution(policy_continue_probs(policy, states, mode, threshold))



def evaluate_policy(name: str, policy: StopPolicy, states: torch.Tensor, outcomes: RoundOutcomes,
                    mode: str = MODE_THRESHOLD, threshold: float = 0.5) -> RuleResult:
    """Expected throughput of ``policy`` on recorded ``states`` (policy decisions charged)."""
    return evaluate_stop_probs(name, outcomes, policy_stop_probs(policy, states, mode, threshold),
                               policy_cost=True)


def expected_level_gain(states: torch.Tensor) -> torch.Tensor:
    """Estimated extra accepted tokens of one more draft level, from the state ``[R, D, S]``.

    The frontier's cumulative log-probs are the draft model's probabilities of reaching each
    frontier node; if the draft matches the target, the chance that acceptance reaches the next
    level is about the frontier's total probability mass, capped at 1. Returns ``[R, D]``.
    """
    return torch.exp(states.double()).sum(-1).clamp(max=1.0)


def cost_rule_stop_probs(states: torch.Tensor, gain_threshold: float) -> torch.Tensor:
    """Training-free rule: continue while the estimated gain of one more level is at least
    ``gain_threshold`` tokens. With ``gain_threshold = throughput * (draft step + policy step
    seconds)``, a level is drafted only if it is expected to pay for its own time."""
    return stop_distribution((expected_level_gain(states) >= gain_threshold).double())


def tune_cost_rule(states: torch.Tensor, outcomes: RoundOutcomes,
                   candidates: torch.Tensor | None = None) -> float:
    """The gain threshold of the cost rule with the best throughput on (training) rounds."""
    if candidates is None:
        candidates = torch.cat([torch.zeros(1), torch.logspace(-3, 0, 61)])
    best_value, best_threshold = -1.0, float(candidates[0])
    for threshold in candidates.tolist():
        result = evaluate_stop_probs("cost rule", outcomes,
                                     cost_rule_stop_probs(states, threshold), policy_cost=True)
        if result.tokens_per_second > best_value:
            best_value, best_threshold = result.tokens_per_second, threshold
    return best_threshold
