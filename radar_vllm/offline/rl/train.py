"""Offline training of the stop policy on round tables used as a simulator.

Two trainers, both producing a :class:`radar_vllm.core.policy.StopPolicy`:

``reinforce`` — the RADAR paper's recipe, reproduced for comparison: Monte-Carlo REINFORCE with
sampled stops, L sampled from the recorded distribution of the chosen stop, reward ``-alpha``
per continue and ``beta * L / T(A)`` at the stop (T in seconds from the cost table, policy steps
charged), gamma 0.99, no baseline, Adam(lr 1e-4, weight decay 1e-4), cosine schedule, batch 64,
gradient clipping 1.0. The paper grid-searched alpha/beta per model with times in seconds (for
Llama-3.1-8B: beta 0.0308, alpha 0.02, a full-depth terminal reward of about
0.0308 * 3.55 / 0.0923 s = 1.19). By default beta is set so that the mean full-depth terminal
reward on the training rounds equals that 1.19 and alpha stays 0.02, which keeps the paper's
balance between the two terms whatever our time unit and machine. Checkpoint: the epoch with the
best exact expected return on the validation rounds (the paper chose by test loss).

``exact`` — ours: maximise expected throughput directly with exact gradients. For every round
the policy induces P(stop after d) = prod(continue probs) * stop prob (forced stop at D), so
E[tokens] = sum_d P(d) (E[L_d] + 1) and E[time] = sum_d P(d) time(d) are differentiable
closed forms: no sampled returns, no variance. Throughput is a ratio of sums, so we maximise
sum E[tokens] - lambda * sum E[time] and update lambda by Dinkelbach (lambda <- the current
throughput) between epochs, which converges to the ratio's optimum. The deployed decision is the
deterministic threshold (continue iff P(continue) >= 0.5, i.e. iff logit_continue >=
logit_stop); optionally the logits are scaled by a factor annealed from 1 to ``anneal_scale``
during training, which moves the objective toward the one of the deterministic policy (the
threshold decision itself is scale-invariant). The network trains on standardised features
(mean and spread of the training rounds' states), folded into its weights when saved.
Checkpoint: the epoch with the best validation throughput of the deterministic policy.
Validation is a split by round.

``exact`` with an acceptance budget b (:func:`train_exact_with_budget`): the same, constrained to
keep the mean acceptance length within b of full depth's on the training rounds (the paper's
operating point: fewer draft calls at almost full-depth acceptance). Tokens get a weight w >= 1
in the objective, which prices time at lambda / w and so drafts deeper; w is searched (grown,
then bisected) for the smallest value meeting the budget.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch

from radar_vllm.core.costs import CostTable
from radar_vllm.core.policy import ACTION_CONTINUE, ACTION_STOP, PolicyConfig, StopPolicy
from radar_vllm.offline.rl.rules import (
    MODE_SAMPLED,
    MODE_THRESHOLD,
    evaluate_policy,
    policy_stop_probs,
    table_features,
)
from radar_vllm.offline.rl.simulate import (
    RoundOutcomes,
    best_fixed_depth,
    evaluate_stop_probs,
    log_stop_distribution,
    round_outcomes,
)
from radar_vllm.offline.rl.table import RoundTable

logger = logging.getLogger(__name__)

ALGORITHM_REINFORCE = "reinforce"
ALGORITHM_EXACT = "exact"
ALGORITHMS = (ALGORITHM_REINFORCE, ALGORITHM_EXACT)
# Floor of a feature's standard deviation when the exact trainer standardises its inputs.
MIN_FEATURE_STD = 1e-3

# The paper's Llama-3.1-8B constants (radar-algorithm.md section 4), used to scale beta.
PAPER_BETA = 0.0308
PAPER_ALPHA = 0.02
PAPER_ACCEPTED_DRAFTS = 3.55  # mean accepted drafts at full depth (acceptance length 4.55 - 1)
PAPER_FULL_DEPTH_SECONDS = (70.7 + 2.68 * 7 + 0.4 * 7) / 1000.0
PAPER_TERMINAL_REWARD = PAPER_BETA * PAPER_ACCEPTED_DRAFTS / PAPER_FULL_DEPTH_SECONDS


@dataclass
class ReinforceConfig:
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    gamma: float = 0.99
    grad_clip: float = 1.0
    alpha: float = PAPER_ALPHA
    # None: scale so that the mean full-depth terminal reward is PAPER_TERMINAL_REWARD.
    beta: float | None = None
    seed: int = 0
    # Cap on optimisation steps per epoch (None: one pass over the training rounds).
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        _check_common(self.epochs, self.batch_size, self.lr, self.weight_decay, self.grad_clip)
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.alpha < 0.0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.beta is not None and not self.beta > 0.0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


@dataclass
class ExactConfig:
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    # No weight decay by default: the exact objective's gradients are small once the stop
    # distribution is nearly right, and Adam's coupled L2 term then dominates them (seen on the
    # SmolLM2 chain rounds: with 1e-4 the policy never left its initial always-continue state).
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # Final logit scale of the annealing toward determinism (1.0 = no annealing).
    anneal_scale: float = 1.0
    threshold: float = 0.5
    seed: int = 0
    max_steps_per_epoch: int | None = None
    # Fewest optimiser steps in total: with few rounds (one batch per epoch) 30 epochs are only 30
    # steps, too few for the LSTM to separate the decisions of different depths; epochs are
    # repeated until this many steps have run.
    min_steps: int = 400
    # Weight of tokens against time in the objective: 1 maximises throughput; w > 1 is the
    # Lagrangian of throughput under a floor on acceptance length (see train_exact_with_budget).
    token_weight: float = 1.0
    # Acceptance budget b (None: none): the policy must keep its mean acceptance length within
    # the fraction b of full depth's. train_exact then picks the epoch with the best validation
    # throughput among those meeting it on the validation rounds; train_exact_with_budget
    # searches token_weight so that the policy meets it on the training rounds.
    acceptance_budget: float | None = None

    def __post_init__(self) -> None:
        _check_common(self.epochs, self.batch_size, self.lr, self.weight_decay, self.grad_clip)
        if self.acceptance_budget is not None and not 0.0 <= self.acceptance_budget < 1.0:
            raise ValueError(f"acceptance_budget must be in [0, 1), got {self.acceptance_budget}")
        if not self.token_weight >= 1.0:
            raise ValueError(f"token_weight must be >= 1, got {self.token_weight}")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"min_steps must be an integer >= 0, got {self.min_steps!r}")
        if not self.anneal_scale >= 1.0:
            raise ValueError(f"anneal_scale must be >= 1, got {self.anneal_scale}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


def _check_common(epochs: int, batch_size: int, lr: float, weight_decay: float,
                  grad_clip: float) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0.0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not grad_clip > 0.0:
        raise ValueError(f"grad_clip must be > 0, got {grad_clip}")


@dataclass
class TrainResult:
    """A trained policy and its training record (JSON-serialisable)."""

    policy: StopPolicy
    record: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- shared helpers
def _make_policy(table: RoundTable, policy_config: PolicyConfig | None, seed: int) -> StopPolicy:
    config = policy_config or PolicyConfig(state_size=table.metadata.state_size)
    if config.state_size != table.metadata.state_size:
        raise ValueError(f"policy state_size={config.state_size} does not match the table's "
                         f"state_size={table.metadata.state_size}")
    torch.manual_seed(seed)
    return StopPolicy(config)


def _optimizer(policy: StopPolicy, lr: float, weight_decay: float, total_steps: int
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return optimizer, scheduler


def _steps_per_epoch(num_rounds: int, batch_size: int, cap: int | None) -> int:
    steps = max(1, math.ceil(num_rounds / batch_size))
    return min(steps, cap) if cap is not None else steps


def _policy_times(outcomes: RoundOutcomes) -> torch.Tensor:
    return outcomes.times(policy_cost=True).float()


def evaluate_policy_modes(policy: StopPolicy, table: RoundTable, outcomes: RoundOutcomes,
                          threshold: float = 0.5) -> dict[str, dict[str, Any]]:
    """Throughput results of a policy on a table in threshold and sampled mode."""
    return {
        mode: evaluate_policy(f"policy ({mode})", policy, table.states, outcomes, mode,
                              threshold).to_dict()
        for mode in (MODE_THRESHOLD, MODE_SAMPLED)
    }


# ---------------------------------------------------------------------- exact trainer
def exact_objective(policy: StopPolicy, features: torch.Tensor, tokens: torch.Tensor,
                    times: torch.Tensor, lam: float, logit_scale: float = 1.0,
                    token_weight: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(objective, E[tokens] sum, E[time] sum) for a batch.

    objective = token_weight * sum E[tok] - lam * sum E[time]; ``features`` ``[B, D, S]``;
    ``tokens``/``times`` ``[B, D]`` per stop d = 1..D.
    """
    logits = policy(features) * logit_scale  # [B, D, 2]
    log_probs = log_stop_distribution(logits[..., ACTION_CONTINUE], logits[..., ACTION_STOP])
    stop_probs = log_probs.exp()  # [B, D]
    expected_tokens = (stop_probs * tokens).sum()
    expected_time = (stop_probs * times).sum()
    return token_weight * expected_tokens - lam * expected_time, expected_tokens, expected_time


def train_exact(train: RoundTable, validation: RoundTable, costs: CostTable,
                config: ExactConfig | None = None, policy_config: PolicyConfig | None = None,
                progress: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Ours: exact expected-throughput maximisation with Dinkelbach lambda updates."""
    config = config or ExactConfig()
    policy = _make_policy(train, policy_config, config.seed)
    outcomes = round_outcomes(train, costs)
    val_outcomes = round_outcomes(validation, costs)
    features = table_features(policy, train.states)
    # Train on standardised features (the raw ones are log-probs down to the -30 floor, which
    # left the network stuck at "always stop" on the SmolLM2 rounds); the deployed network takes
    # raw features, with the scaling folded into its weights (StopPolicy.fold_input_scaling).
    flat = features.reshape(-1, features.shape[-1])
    scale_mean, scale_std = flat.mean(0), flat.std(0).clamp(min=MIN_FEATURE_STD)
    features = (features - scale_mean) / scale_std

    def deployed() -> StopPolicy:
        return copy.deepcopy(policy).eval().fold_input_scaling(scale_mean, scale_std)

    tokens = outcomes.tokens.float()
    times = _policy_times(outcomes)
    steps_per_epoch = _steps_per_epoch(train.num_rounds, config.batch_size,
                                       config.max_steps_per_epoch)
    num_epochs = max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))
    optimizer, scheduler = _optimizer(policy, config.lr, config.weight_decay,
                                      steps_per_epoch * num_epochs)
    generator = torch.Generator().manual_seed(config.seed)
    lam = best_fixed_depth(outcomes, include_no_speculation=False).tokens_per_second
    # Normalise the objective per round and by tokens so the step size is unit-free.
    token_scale = float(tokens.mean())
    val_target = acceptance_target(val_outcomes, config.acceptance_budget)
    best_key: tuple[float, float] = (-math.inf, -math.inf)
    best_val, best_state, best_epoch = -math.inf, deployed().state_dict(), -1
    history: list[dict[str, Any]] = []
    start_time = time.monotonic()
    for epoch in range(num_epochs):
        if num_epochs > 1:
            logit_scale = 1.0 + (config.anneal_scale - 1.0) * epoch / (num_epochs - 1)
        else:
            logit_scale = config.anneal_scale
        policy.train()
        order = torch.randperm(train.num_rounds, generator=generator)
        for step in range(steps_per_epoch):
            rows = order[step * config.batch_size:(step + 1) * config.batch_size]
            if len(rows) == 0:
                break
            objective, _, _ = exact_objective(policy, features[rows], tokens[rows], times[rows],
                                              lam, logit_scale, config.token_weight)
            loss = -objective / (len(rows) * token_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
        # Dinkelbach: lambda <- throughput of the current (stochastic, scaled) policy on train.
        policy.eval()
        with torch.no_grad():
            _, tok_sum, time_sum = exact_objective(policy, features, tokens, times, lam,
                                                   logit_scale)
        lam = float(tok_sum / time_sum)
        current = deployed()
        val = evaluate_policy("policy", current, validation.states, val_outcomes,
                              threshold=config.threshold)
        entry = {"epoch": epoch, "lambda": lam, "logit_scale": logit_scale,
                 "val_tokens_per_second": val.tokens_per_second,
                 "val_mean_draft_calls": val.mean_draft_calls,
                 "val_mean_acceptance_length": val.mean_acceptance_length,
                 "seconds": time.monotonic() - start_time}
        history.append(entry)
        logger.info("exact epoch %d: lambda %.4g, val tokens/s %.4g, calls %.3f", epoch, lam,
                    val.tokens_per_second, val.mean_draft_calls)
        if progress is not None:
            progress(entry)
        # Best validation throughput; with a budget, among the epochs meeting it on the
        # validation rounds (until one does: the highest validation acceptance).
        if val_target is None or val.mean_acceptance_length >= val_target:
            key = (1.0, val.tokens_per_second)
        else:
            key = (0.0, val.mean_acceptance_length)
        if key > best_key:
            best_key, best_val, best_epoch = key, val.tokens_per_second, epoch
            best_state = current.state_dict()  # current is a fresh copy, never trained on
    policy.load_state_dict(best_state)
    policy.eval()
    record = {
        "algorithm": ALGORITHM_EXACT,
        "config": asdict(config),
        "policy_config": policy.config.to_dict(),
        "best_epoch": best_epoch,
        "best_val_tokens_per_second": best_val,
        "val_acceptance_target": val_target,
        "best_epoch_meets_val_target": None if val_target is None else best_key[0] == 1.0,
        "history": history,
        "train_rounds": train.num_rounds,
        "val_rounds": validation.num_rounds,
        "wall_seconds": time.monotonic() - start_time,
    }
    return TrainResult(policy=policy, record=record)


def acceptance_target(outcomes: RoundOutcomes, budget: float | None) -> float | None:
    """Mean acceptance length a budget ``b`` requires: (1 - b) x full depth's (None: no budget)."""
    if budget is None:
        return None
    return (1.0 - budget) * float(outcomes.tokens[:, -1].mean())


# Token weights tried by train_exact_with_budget before bisecting: 1, then 1 + 0.25 * 2^k.
BUDGET_WEIGHT_GROWTH = (1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 9.0, 17.0)
BUDGET_BISECTIONS = 4


def train_exact_with_budget(train: RoundTable, validation: RoundTable, costs: CostTable,
                            config: ExactConfig, policy_config: PolicyConfig | None = None,
                            progress: Callable[[dict[str, Any]], None] | None = None
                            ) -> TrainResult:
    """Ours under an acceptance budget: the smallest token weight whose policy keeps it.

    For a token weight w the exact trainer's decisions price a second of time at lambda / w
    instead of lambda (the current throughput), so the policy drafts deeper as w grows. This
    trains with w = 1, 1.25, 1.5, 2, 3, ... until the deterministic policy's mean acceptance
    length on the training rounds meets ``config.acceptance_budget``, bisects w between the last
    miss and the first hit, and returns the qualifying policy with the best validation
    throughput (or, if none qualifies, the one with the highest training acceptance).
    """
    if config.acceptance_budget is None:
        raise ValueError("train_exact_with_budget needs config.acceptance_budget")
    outcomes = round_outcomes(train, costs)
    target = acceptance_target(outcomes, config.acceptance_budget)
    assert target is not None
    trials: list[dict[str, Any]] = []
    results: list[tuple[dict[str, Any], TrainResult]] = []

    def attempt(weight: float) -> bool:
        result = train_exact(train, validation, costs, replace(config, token_weight=weight),
                             policy_config, progress)
        on_train = evaluate_policy("policy", result.policy, train.states, outcomes,
                                   threshold=config.threshold)
        trial = {"token_weight": weight,
                 "train_mean_acceptance_length": on_train.mean_acceptance_length,
                 "train_tokens_per_second": on_train.tokens_per_second,
                 "val_tokens_per_second": result.record["best_val_tokens_per_second"],
                 "meets_budget": on_train.mean_acceptance_length >= target}
        trials.append(trial)
        results.append((trial, result))
        logger.info("budget search: token weight %.4g -> train acceptance %.4f (target %.4f)",
                    weight, on_train.mean_acceptance_length, target)
        return trial["meets_budget"]

    low = high = None
    for weight in BUDGET_WEIGHT_GROWTH:
        if attempt(weight):
            high = weight
            break
        low = weight
    if high is not None and low is not None:
        for _ in range(BUDGET_BISECTIONS):
            middle = 0.5 * (low + high)
            if attempt(middle):
                high = middle
            else:
                low = middle
    qualifying = [(trial, result) for trial, result in results if trial["meets_budget"]]
    if qualifying:
        trial, chosen = max(qualifying, key=lambda item: item[0]["val_tokens_per_second"])
    else:
        trial, chosen = max(results, key=lambda item: item[0]["train_mean_acceptance_length"])
    record = dict(chosen.record)
    record["budget_search"] = {"acceptance_budget": config.acceptance_budget,
                               "train_acceptance_target": target,
                               "chosen_token_weight": trial["token_weight"],
                               "met_on_train": trial["meets_budget"], "trials": trials}
    return TrainResult(policy=chosen.policy, record=record)


# ---------------------------------------------------------------------- paper's REINFORCE
def auto_beta(outcomes: RoundOutcomes) -> float:
    """beta making the mean full-depth terminal reward beta * E[L_D] / T_D equal the paper's."""
    full_depth = outcomes.max_depth - 1
    ratio = (outcomes.accepted[:, full_depth] /
             outcomes.times(policy_cost=True)[:, full_depth]).mean()
    if not float(ratio) > 0.0:
        raise ValueError("cannot scale beta: the full-depth rounds accept no draft tokens")
    return PAPER_TERMINAL_REWARD / float(ratio)


def expected_paper_return(stop_probs: torch.Tensor, outcomes: RoundOutcomes, alpha: float,
                          beta: float, gamma: float) -> float:
    """Exact expected return G_0 of the paper's reward, mean over rounds.

    A stop after d calls has A = d - 1 continues: G_0 = -alpha * sum_{t<A} gamma^t
    + gamma^A * beta * E[L_d] / T(A).
    """
    depth = outcomes.max_depth
    continues = torch.arange(depth, dtype=torch.float64)
    discounts = gamma ** continues  # [D]
    penalty = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.float64), discounts[:-1]]), 0)
    terminal = discounts * beta * outcomes.accepted / outcomes.times(policy_cost=True)
    returns = terminal - alpha * penalty  # [R, D]
    return float((stop_probs.double() * returns).sum(1).mean())


def reinforce_loss(policy: StopPolicy, features: torch.Tensor, accept_probs: torch.Tensor,
                   times: torch.Tensor, alpha: float, beta: float, gamma: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-episode REINFORCE loss for a batch and the mean sampled return G_0.

    ``features`` ``[B, D, S]``, ``accept_probs`` ``[B, D, D + 1]``, ``times`` ``[B, D]``.
    """
    batch, depth, _ = features.shape
    logits = policy(features)  # [B, D, 2]
    log_probs = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        p_continue = log_probs[..., ACTION_CONTINUE].exp()
        continues = torch.rand(batch, depth, generator=generator) < p_continue  # [B, D]
        continues[:, depth - 1] = False  # forced stop after the last call
        stop_index = (~continues).float().argmax(dim=1)  # first stop decision t*; d = t* + 1
        rows = torch.arange(batch)
        chosen = accept_probs[rows, stop_index]  # [B, D + 1]
        accepted = torch.multinomial(chosen.clamp(min=0.0), 1, generator=generator).squeeze(1)
        round_time = times[rows, stop_index]
        steps = torch.arange(depth)
        before = steps[None, :] < stop_index[:, None]  # continue decisions
        at_stop = steps[None, :] == stop_index[:, None]
        rewards = torch.where(before, torch.full((batch, depth), -alpha), torch.zeros(batch, depth))
        rewards = rewards + at_stop.float() * (beta * accepted.float() / round_time)[:, None]
        returns = torch.zeros(batch, depth)
        running = torch.zeros(batch)
        for t in range(depth - 1, -1, -1):
            running = rewards[:, t] + gamma * running
            returns[:, t] = running
        # Decisions actually taken: continues before the stop, and the stop itself unless forced.
        taken_stop = at_stop & (stop_index[:, None] < depth - 1)
    chosen_log_probs = torch.where(before, log_probs[..., ACTION_CONTINUE],
                                   log_probs[..., ACTION_STOP])
    weights = (before | taken_stop).float() * returns
    loss = -(weights * chosen_log_probs).sum(1).mean()
    return loss, returns[:, 0].mean()


def train_reinforce(train: RoundTable, validation: RoundTable, costs: CostTable,
                    config: ReinforceConfig | None = None,
                    policy_config: PolicyConfig | None = None,
                    progress: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """The paper's recipe: REINFORCE without baseline on sampled episodes."""
    config = config or ReinforceConfig()
    policy = _make_policy(train, policy_config, config.seed)
    outcomes = round_outcomes(train, costs)
    val_outcomes = round_outcomes(validation, costs)
    beta = config.beta if config.beta is not None else auto_beta(outcomes)
    features = table_features(policy, train.states)
    times = _policy_times(outcomes)
    steps_per_epoch = _steps_per_epoch(train.num_rounds, config.batch_size,
                                       config.max_steps_per_epoch)
    optimizer, scheduler = _optimizer(policy, config.lr, config.weight_decay,
                                      steps_per_epoch * config.epochs)
    generator = torch.Generator().manual_seed(config.seed)
    best_val, best_state, best_epoch = -math.inf, copy.deepcopy(policy.state_dict()), -1
    history: list[dict[str, Any]] = []
    start_time = time.monotonic()
    for epoch in range(config.epochs):
        policy.train()
        order = torch.randperm(train.num_rounds, generator=generator)
        returns = []
        for step in range(steps_per_epoch):
            rows = order[step * config.batch_size:(step + 1) * config.batch_size]
            if len(rows) == 0:
                break
            loss, mean_return = reinforce_loss(policy, features[rows], train.accept_probs[rows],
                                               times[rows], config.alpha, beta, config.gamma,
                                               generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            returns.append(float(mean_return))
        val_stop = policy_stop_probs(policy, validation.states, MODE_SAMPLED)
        val_return = expected_paper_return(val_stop, val_outcomes, config.alpha, beta,
                                           config.gamma)
        val = evaluate_stop_probs("policy", val_outcomes, val_stop, policy_cost=True)
        entry = {"epoch": epoch, "train_sampled_return": sum(returns) / max(len(returns), 1),
                 "val_expected_return": val_return,
                 "val_tokens_per_second_sampled": val.tokens_per_second,
                 "val_mean_draft_calls_sampled": val.mean_draft_calls,
                 "seconds": time.monotonic() - start_time}
        history.append(entry)
        logger.info("reinforce epoch %d: val return %.4g, val tokens/s %.4g, calls %.3f", epoch,
                    val_return, val.tokens_per_second, val.mean_draft_calls)
        if progress is not None:
            progress(entry)
        if val_return > best_val:
            best_val, best_epoch = val_return, epoch
            best_state = copy.deepcopy(policy.state_dict())
    policy.load_state_dict(best_state)
    policy.eval()
    record = {
        "algorithm": ALGORITHM_REINFORCE,
        "config": asdict(config),
        "beta_used": beta,
        "paper_terminal_reward": PAPER_TERMINAL_REWARD,
        "policy_config": policy.config.to_dict(),
        "best_epoch": best_epoch,
        "best_val_expected_return": best_val,
        "history": history,
        "train_rounds": train.num_rounds,
        "val_rounds": validation.num_rounds,
        "wall_seconds": time.monotonic() - start_time,
    }
    return TrainResult(policy=policy, record=record)
