"""Offline estimate of greedy EAGLE-3 chain acceptance, without starting vLLM.

Replays greedy chain speculative decoding over the target's own greedy answers: a round that
starts after the target emitted the token at index ``m`` runs the head from base position
``m - 1`` for K steps; drafts are accepted while they equal the target's greedy tokens; the
target then adds one token, so the next round starts ``accepted + 1`` tokens later. Because
acceptance stops at the first mismatch, feeding the true tokens to later draft steps (as the
training-time test does) gives the same accepted prefix as feeding the draft's own tokens.
Mean acceptance length = total tokens per round, averaged over rounds (vLLM's 1 + accepted /
drafts).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from radar_vllm.offline.head.eagle3 import Eagle3Head
from radar_vllm.offline.head.trainer import FeatureStore, ttt_hidden_states

logger = logging.getLogger(__name__)


@torch.no_grad()
def draft_matches(head: Eagle3Head, ids: torch.Tensor, labels: torch.Tensor, aux: torch.Tensor, steps: int) -> torch.Tensor:
    """matches [steps, T] bool: step j's draft from base t equals the target's greedy token after t + 1 + j.

    ids, labels: [T]; aux: [T, A*H]. Entries whose target lies past the sequence are False.
    """
    length = ids.shape[0]
    matches = torch.zeros(steps, length, dtype=torch.bool)  # [steps, T]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for step, prenorm in enumerate(ttt_hidden_states(head, ids[None], aux[None], steps)):
            shift = 1 + step
            if length - shift <= 0:
                break
            draft = head.compute_logits(head.norm(prenorm[0, : length - shift])).argmax(-1)
            matches[step, : length - shift] = head.draft_to_target_ids(draft) == labels[shift:]
    return matches


def walk_rounds(matches: torch.Tensor, start: int, k: int) -> tuple[int, int]:
    """(rounds, tokens) of greedy chain decoding with K drafts from base position ``start``."""
    steps, length = matches.shape
    if k > steps:
        raise ValueError(f"k={k} exceeds the {steps} simulated draft steps")
    rounds = tokens = 0
    base = start
    while base + 2 < length:  # the target still has a token to emit after base + 1
        accepted = 0
        while accepted < k and accepted < length - 2 - base and bool(matches[accepted, base]):
            accepted += 1
        rounds += 1
        tokens += accepted + 1
        base += accepted + 1
    return rounds, tokens


def simulate_chain_acceptance(head: Eagle3Head, store: FeatureStore, ks: Sequence[int]) -> dict[int, float]:
    """Mean acceptance length for each K over the answers of every sequence in ``store``."""
    steps = max(ks)
    totals = {k: [0, 0] for k in ks}
    head.eval()
    for ref in store.sequences:
        ids, labels, aux = store.load(ref)
        matches = draft_matches(head, ids, labels, aux, steps)
        for k in ks:
            rounds, tokens = walk_rounds(matches, max(ref.prompt_len - 1, 0), k)
            totals[k][0] += rounds
            totals[k][1] += tokens
    return {k: (tokens / rounds if rounds else float("nan")) for k, (rounds, tokens) in totals.items()}


def load_head_with_target_embeddings(head_dir: str, target_dir: str) -> Eagle3Head:
    """An exported head with the target's token embedding filled in (vLLM shares it too)."""
    from pathlib import Path

    from safetensors import safe_open

    from radar_vllm.offline.head.trainer import copy_target_embedding, load_head

    head = load_head(Path(head_dir))
    with safe_open(str(Path(target_dir) / "model.safetensors"), framework="pt") as handle:
        embed = handle.get_tensor("model.embed_tokens.weight").float()
    copy_target_embedding(head, embed)
    return head.eval()
