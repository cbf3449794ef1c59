"""Stop-policy state for chain drafting, as a pure torch function (shared by vLLM and the RL code).

In chain mode a round drafts one token per draft call: the argmax of the draft distribution,
appended to the chain. The policy state after call ``t`` describes the children the chain could
grow at depth ``t``, as a tree of width ``top_k`` would see them: the ``top_k`` cumulative
log-probs ``prefix + log p_t(x)`` over the ``top_k`` most likely tokens ``x`` of the depth-``t``
distribution, sorted descending, where ``prefix`` is the cumulative log-prob of the chain's
tokens at depths ``1 .. t-1`` (0 after the first call, so the first state equals the tree's).

Worked example, top_k = 3:
    call 1: log p_1 top-3 = [-0.1, -2.5, -3.0]          -> state [-0.1, -2.5, -3.0], prefix -0.1
    call 2: log p_2 top-3 = [-0.4, -1.2, -4.0]          -> state [-0.5, -1.3, -4.1], prefix -0.5
"""
from __future__ import annotations

import torch


def chain_frontier_scores(
    prefix_logprob: torch.Tensor,  # [batch] float32, cumulative log-prob of the chain so far
    step_logprobs: torch.Tensor,  # [batch, vocab] log-probs of the current draft distribution
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy state and the new chain prefix after one draft call.

    Returns ``(frontier_scores [batch, top_k] float32 sorted descending,
    next_prefix_logprob [batch] float32)``; the chain's new token is the argmax, whose log-prob is
    the largest value. Entries of ``-inf`` (tokens outside the draft vocabulary) stay ``-inf``;
    the policy clamps them to its score floor. No host synchronization.
    """
    if step_logprobs.dim() != 2:
        raise ValueError(f"step_logprobs must be [batch, vocab], got shape {tuple(step_logprobs.shape)}")
    if prefix_logprob.shape != step_logprobs.shape[:1]:
        raise ValueError(
            f"prefix_logprob must have shape ({step_logprobs.shape[0]},), got {tuple(prefix_logprob.shape)}"
        )
    if not 1 <= top_k <= step_logprobs.shape[1]:
        raise ValueError(f"top_k must be in [1, {step_logprobs.shape[1]}], got {top_k}")
    top_logprobs = torch.topk(step_logprobs.float(), top_k, dim=-1).values  # [batch, top_k], descending
    prefix = prefix_logprob.float().unsqueeze(1)  # [batch, 1]
    frontier_scores = prefix + top_logprobs  # [batch, top_k]
    return frontier_scores, frontier_scores[:, 0]


def chain_round_states(
    step_logprobs: torch.Tensor,  # [batch, num_calls, vocab] log-probs of each draft call
    top_k: int,
) -> torch.Tensor:
    """Policy states of a whole round at once: ``[batch, num_calls, top_k]``.

    Row ``t`` equals what :func:`chain_frontier_scores` gives after call ``t + 1`` when the chain
    follows each call's argmax (the offline RL data path).
    """
    if step_logprobs.dim() != 3:
        raise ValueError(f"step_logprobs must be [batch, calls, vocab], got shape {tuple(step_logprobs.shape)}")
    top_logprobs = torch.topk(step_logprobs.float(), top_k, dim=-1).values  # [batch, calls, top_k]
    best = top_logprobs[..., 0]  # [batch, calls]
    prefix = torch.cumsum(best, dim=1) - best  # [batch, calls]: log-prob of the chain before call t
    return prefix.unsqueeze(-1) + top_logprobs
