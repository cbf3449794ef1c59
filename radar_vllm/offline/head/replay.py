"""Offline estimate of greedy EAGLE-3 chain acceptance, without starting vLLM.

Replays greedy chain speculative decoding over the target's own greedy answers: a round that
starts after the target emitted the token at index ``m`` runs the head from base position
``m - 1`` for K steps; drafts are accepted while they equal the target's greedy tokens; the
target then adds one token, so the next round starts ``accepted + 1`` tokens later. Because
acceptance stops at the first mismatch, feeding the true tokens to later draft steps (as the
training-time test does) gives the same accepted prefix as feeding the draft's own tokens.
Mean acceptance length = total tokens per round, averaged over rounds (vLLM's 1 + accepted /
drafts).

Answers sampled from the target at T = 1 give the T = 1 estimate: there a draft is compared
with the token the target actually sampled. With greedy (one-hot) drafts, vLLM's rejection
sampler accepts draft ``i`` with probability ``p(d_i | context)``, and on a sampled answer the
event "the next ``j`` sampled tokens equal the drafts" has probability ``prod_i p(d_i | ...)``
too, so the prefix walk is an unbiased per-round estimate of T = 1 acceptance (the token after a
rejection comes from ``p`` instead of vLLM's residual distribution, a small difference in the
contexts of later rounds).

The head runs in float32 (``dtype``), as vLLM serves it on CPUs without AVX-512 BF16.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch

from radar_vllm.offline.head.eagle3 import Eagle3Head
from radar_vllm.offline.head.trainer import FeatureStore, ttt_hidden_states

logger = logging.getLogger(__name__)


@torch.no_grad()
def draft_matches(
    head: Eagle3Head,
    ids: torch.Tensor,
    labels: torch.Tensor,
    aux: torch.Tensor,
    steps: int,
    dtype: torch.dtype = torch.float32,
    against_tokens: bool = False,
) -> torch.Tensor:
    """matches [steps, T] bool: step j's draft from base t equals the target's greedy token after
    t + 1 + j (``labels``), or with ``against_tokens`` the sequence's own token there (a sampled
    answer).

    ids, labels: [T]; aux: [T, A*H]. Entries whose target lies past the sequence are False.
    """
    length = ids.shape[0]
    matches = torch.zeros(steps, length, dtype=torch.bool)  # [steps, T]
    expected = torch.full_like(labels, -1)  # [T]: token the draft of base t - 1 should equal
    if against_tokens:
        expected[:-1] = ids[1:]
    else:
        expected = labels
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        for step, prenorm in enumerate(ttt_hidden_states(head, ids[None], aux[None].to(dtype), steps)):
            shift = 1 + step
            if length - shift <= 0:
                break
            draft = head.compute_logits(head.norm(prenorm[0, : length - shift])).argmax(-1)
            matches[step, : length - shift] = head.draft_to_target_ids(draft) == expected[shift:]
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


def simulate_chain_acceptance(
    head: Eagle3Head, store: FeatureStore, ks: Sequence[int], sampled: bool = False
) -> dict[int, float]:
    """Mean acceptance length for each K over the greedy answers in ``store`` (``sampled``: over
    the sampled answers, compared with the tokens the target sampled)."""
    steps = max(ks)
    totals = {k: [0, 0] for k in ks}
    head.eval()
    head.embed_tokens.float()
    for ref in store.sequences:
        if ref.sampled != sampled:
            continue
        ids, labels, aux = store.load(ref)
        matches = draft_matches(head, ids, labels, aux, steps, against_tokens=sampled)
        for k in ks:
            rounds, tokens = walk_rounds(matches, max(ref.prompt_len - 1, 0), k)
            totals[k][0] += rounds
            totals[k][1] += tokens
    return {k: (tokens / rounds if rounds else float("nan")) for k, (rounds, tokens) in totals.items()}


def replay_metrics(head: Eagle3Head, store: FeatureStore, ks: Sequence[int]) -> dict[str, object]:
    """Acceptance lengths per K at T = 0 (greedy answers) and, when the store holds sampled
    answers, at T = 1; first-draft acceptance = acceptance length at K = 1 minus 1."""
    ks = sorted(set(ks) | {1})
    result: dict[str, object] = {}
    for name, sampled in (("t0", False), ("t1", True)):
        if not any(ref.sampled == sampled for ref in store.sequences):
            continue
        lengths = simulate_chain_acceptance(head, store, ks, sampled=sampled)
        result[f"acceptance_length_{name}"] = {str(k): v for k, v in lengths.items()}
        result[f"first_draft_acceptance_{name}"] = lengths[1] - 1.0
    return result


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


@dataclasses.dataclass
class _EvalFeatureConfig:
    target: str
    aux_layers: list[int]
    max_seq_len: int
    topk_logprobs: int = 0


def prepare_eval_dir(
    eval_dir: Path,
    target: str,
    prompt_set: str,
    num_prompts: int,
    max_new_tokens: int,
    aux_layers: list[int],
    sampled_answers: int = 1,
    gen_dtype: str = "float32",
) -> None:
    """Held-out evaluation data in ``eval_dir`` (resumable): the first ``num_prompts`` prompts of
    ``prompt_set`` (held-out split), the target's greedy answers plus ``sampled_answers`` answers
    sampled at T = 1 (vLLM, ``gen_dtype``), and their features."""
    from transformers import AutoTokenizer

    from radar_vllm.offline.head.data import PromptRecord, generate_answers, save_prompts
    from radar_vllm.offline.head.feature_cache import extract_features
    from radar_vllm.offline.prompts import load_prompt_set, tokenize_prompts

    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    if not (eval_dir / "prompts.jsonl").is_file():
        tokenizer = AutoTokenizer.from_pretrained(target)
        prompts = load_prompt_set(prompt_set, split="heldout")[:num_prompts]
        records = [PromptRecord(p.prompt_id, ids) for p, ids in zip(prompts, tokenize_prompts(tokenizer, prompts))]
        save_prompts(eval_dir, records)
    generate_answers(
        eval_dir, target, shard_size=10_000, max_new_tokens=max_new_tokens, max_num_seqs=num_prompts,
        sampled_answers=sampled_answers, temperature=1.0, dtype=gen_dtype,
    )
    extract_features(eval_dir, _EvalFeatureConfig(target, aux_layers, max_seq_len=100_000))
