"""EAGLE-3 head training with training-time test (several self-fed draft steps), resumable.

Training directory layout (the work directory unless ``train_dir`` is given; the feature shards
are always read from the work directory):

- ``draft_vocab.safetensors``: target ids of the draft vocabulary (the most frequent target
  greedy tokens over the features present when training first started) and their counts.
- ``checkpoints/state-SSSSSSS.safetensors`` + ``.json``: fp32 weights, AdamW moments, position.
  ``checkpoints/latest.json`` names the newest; the two newest are kept.
- ``head/``: the newest checkpoint exported for vLLM (bf16), refreshed at every checkpoint.
- ``snapshots/step-NNNNNNN/``: exported heads kept every ``snapshot_every`` steps (if set).
- ``training_record.json``: data size, steps, wall and CPU time, loss curve, command lines.

Recipe options (``HeadTrainingConfig`` fields; the defaults are the original recipe):

- ``ttt_steps`` / ``ttt_decay``: draft steps of the training-time test; step ``j``'s loss weighs
  ``ttt_decay ** j``.
- ``soft_label_weight``: mix of the distillation loss (cross-entropy against the target's stored
  top-K next-token distribution, restricted to the draft vocabulary and renormalised) with the
  argmax cross-entropy: ``(1 - w) * hard + w * soft``. Needs features with ``topk_logprobs``.
- ``draft_vocab_size``: the most frequent target argmax tokens of the training data.
- ``learning_rate``, ``warmup_steps``, ``lr_schedule`` (linear warm-up then ``cosine`` decay to
  ``min_lr_ratio`` of the peak, or ``constant``), ``adam_beta1/2``, ``grad_clip``.
- ``init_from_target``: the draft layer starts from the target's last decoder layer (the
  hidden-state half of q/k/v, o_proj, the MLP and the norms); the embedding half stays random.
- ``init_from_head``: start from an exported head (a folder ``export_head`` wrote, e.g. the
  shipped one or a previous run's ``head/``): its weights and its draft vocabulary, which then
  must have ``draft_vocab_size`` tokens. Continues a run across machines from the small export
  alone (fresh optimiser moments; use a short warm-up).
- ``device``: where training runs (``cpu`` or e.g. ``cuda``); on an accelerator the features are
  held in its memory and batches are gathered there.
- ``train_dtype``: float32 (default; bf16 matmuls are slow on CPUs without AVX-512 BF16) or
  bfloat16 autocast (the original).
- ``budget_cpu_s``: stop after this many process CPU seconds of training, summed over resumes;
  the lr schedule then runs on the CPU time spent instead of the step count, so variants trained
  at one budget all finish their schedule. ``budget_wall_s``: the same in wall seconds (for an
  accelerator, ``device``, where the process CPU time does not measure the work).
  ``stop_after_s``: leave (with a checkpoint) after this many wall seconds of one invocation;
  running the command again continues.

Training-time test: at step ``j`` the query at base position ``t`` reads the embedding of token
``t + 1 + j`` and the pre-norm hidden state produced at step ``j - 1`` (the fc output of the
target's aux hidden states at step 0), sits at rotary position ``t + j``, and predicts the
target's greedy token after ``t + 1 + j``. It attends to the step-0 keys of positions ``<= t``
and to the keys of steps ``1..j`` at base ``t`` only, which is what the draft model sees at
inference when it extends a chain.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from radar_vllm.offline.head.eagle3 import HEAD_ARCHITECTURE, NOT_IN_DRAFT_VOCAB, Eagle3Head, Eagle3HeadConfig
from radar_vllm.offline.head.feature_cache import FEATURES_DIR

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest.json"
DRAFT_VOCAB_FILE = "draft_vocab.safetensors"
HEAD_EXPORT_DIR = "head"
SNAPSHOTS_DIR = "snapshots"
RECORD_FILE = "training_record.json"
EXPORT_FILES = frozenset({"config.json", "model.safetensors", RECORD_FILE})
KEEP_CHECKPOINTS = 2
PADDING_TOKEN = 0  # id placed in padded slots; those slots never reach the loss
IGNORE_LABEL = -100


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class SequenceRef:
    shard: int
    start: int
    length: int
    prompt_len: int
    sampled: bool = False  # the answer was sampled from the target (not its greedy answer)


class FeatureStore:
    """Lazy (memory-mapped) access to the feature shards of a work directory."""

    def __init__(self, work_dir: Path, max_seq_len: int) -> None:
        from safetensors import safe_open

        self.device = torch.device("cpu")
        self.resident: dict[int, dict[str, torch.Tensor]] = {}
        self.handles: dict[int, Any] = {}
        self.sequences: list[SequenceRef] = []
        paths = sorted((work_dir / FEATURES_DIR).glob("shard-*.safetensors"))
        if not paths:
            raise FileNotFoundError(f"no feature shards under {work_dir / FEATURES_DIR}; run the features stage")
        for path in paths:
            index = int(path.stem.split("-")[1])
            handle = safe_open(str(path), framework="pt")
            self.handles[index] = handle
            offsets = handle.get_tensor("offsets")
            prompt_lens = handle.get_tensor("prompt_lens")
            kinds = handle.get_tensor("answer_kinds") if "answer_kinds" in handle.keys() else None
            for row in range(offsets.numel() - 1):
                start, end = int(offsets[row]), int(offsets[row + 1])
                length = min(end - start, max_seq_len)
                if length >= 3:
                    sampled = bool(kinds[row]) if kinds is not None else False
                    self.sequences.append(SequenceRef(index, start, length, int(prompt_lens[row]), sampled))
        self.num_tokens = sum(s.length for s in self.sequences)
        self.num_answer_tokens = sum(max(0, s.length - s.prompt_len) for s in self.sequences)
        self.topk = min(
            (h.get_slice("topk_ids").get_shape()[1] if "topk_ids" in h.keys() else 0) for h in self.handles.values()
        )

    def move_to(self, device: torch.device) -> "FeatureStore":
        """Keep every shard's tensors in ``device`` memory (an accelerator's), so that batches are
        gathered there instead of read from the memory-mapped files."""
        return self if device.type == "cpu" else self.load_resident(device)

    def load_resident(self, device: torch.device) -> "FeatureStore":
        """Read every shard into ``device`` memory (what :meth:`move_to` does off the CPU)."""
        names = ("input_ids", "labels", "aux") + (("topk_ids", "topk_logprobs") if self.topk else ())
        for index, handle in self.handles.items():
            self.resident[index] = {name: handle.get_tensor(name).to(device) for name in names}
        self.device = device
        return self

    def _slice(self, ref: SequenceRef, name: str) -> torch.Tensor:
        end = ref.start + ref.length
        if self.resident:
            return self.resident[ref.shard][name][ref.start : end]
        return self.handles[ref.shard].get_slice(name)[ref.start : end]

    def label_counts(self, vocab_size: int) -> torch.Tensor:
        counts = torch.zeros(vocab_size, dtype=torch.long)  # [vocab]
        for handle in self.handles.values():
            counts += torch.bincount(handle.get_tensor("labels").long(), minlength=vocab_size)[:vocab_size]
        return counts

    def load(self, ref: SequenceRef) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids [L], labels [L], aux [L, A*H]) of one sequence."""
        return self._slice(ref, "input_ids").long(), self._slice(ref, "labels").long(), self._slice(ref, "aux")

    def load_topk(self, ref: SequenceRef) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-K ids [L, K], top-K log-probs [L, K]) of the target's next-token distribution."""
        if not self.topk:
            raise ValueError("the feature shards hold no top-K log-probs; extract features with topk_logprobs > 0")
        return (
            self._slice(ref, "topk_ids")[:, : self.topk].long(),
            self._slice(ref, "topk_logprobs")[:, : self.topk].float(),
        )


def epoch_batches(lengths: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches (padded size <= batch_tokens) in a seeded per-epoch order."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])  # stable: equal lengths keep their shuffled order
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(
    store: FeatureStore, refs: list[SequenceRef], dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids [B, T], labels [B, T], aux [B, T, A*H] in ``dtype``, lengths [B])."""
    longest = max(r.length for r in refs)
    loaded = [store.load(r) for r in refs]
    width = loaded[0][2].shape[-1]
    device = store.device
    ids = torch.full((len(refs), longest), PADDING_TOKEN, dtype=torch.long, device=device)  # [B, T]
    labels = torch.full((len(refs), longest), IGNORE_LABEL, dtype=torch.long, device=device)  # [B, T]
    aux = torch.zeros(len(refs), longest, width, dtype=dtype, device=device)  # [B, T, A*H]
    for row, (seq_ids, seq_labels, seq_aux) in enumerate(loaded):
        length = seq_ids.numel()
        ids[row, :length] = seq_ids
        labels[row, :length] = seq_labels
        aux[row, :length] = seq_aux
    lengths = torch.tensor([r.length for r in refs], dtype=torch.long, device=device)  # [B]
    return ids, labels, aux, lengths


def collate_topk(store: FeatureStore, refs: list[SequenceRef]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (top-K ids [B, T, K], top-K log-probs [B, T, K]); padding has log-prob -inf."""
    longest = max(r.length for r in refs)
    ids = torch.zeros(len(refs), longest, store.topk, dtype=torch.long, device=store.device)  # [B, T, K]
    logprobs = torch.full((len(refs), longest, store.topk), float("-inf"), device=store.device)  # [B, T, K]
    for row, ref in enumerate(refs):
        seq_ids, seq_logprobs = store.load_topk(ref)
        ids[row, : ref.length] = seq_ids
        logprobs[row, : ref.length] = seq_logprobs
    return ids, logprobs


# ----------------------------------------------------------------------------- model step


def ttt_attention(
    attn: Any, q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], causal: torch.Tensor
) -> torch.Tensor:
    """Attention of step-j queries q [B, h, T, D] over step-0 keys (causal) + later steps' diagonal.

    keys/values: per step [B, kv_heads, T, D], keys[0] attended causally (mask ``causal``
    [T, T]), keys[1:] only at the query's own base position. Returns [B, h, T, D].
    """
    k0 = attn.expand_kv(keys[0])
    v0 = attn.expand_kv(values[0])
    scores = torch.matmul(q, k0.transpose(-1, -2)) * attn.scale  # [B, h, T, T]
    scores = scores.masked_fill(~causal, float("-inf"))
    diagonal = [(q * attn.expand_kv(k)).sum(-1, keepdim=True) * attn.scale for k in keys[1:]]  # [B, h, T, 1]
    probs = torch.softmax(torch.cat([scores] + diagonal, dim=-1).float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs[..., : scores.shape[-1]], v0)
    for step, v in enumerate(values[1:]):
        out = out + probs[..., scores.shape[-1] + step : scores.shape[-1] + step + 1] * attn.expand_kv(v)
    return out


def ttt_hidden_states(head: Eagle3Head, ids: torch.Tensor, aux: torch.Tensor, steps: int) -> Iterator[torch.Tensor]:
    """Pre-norm hidden states [B, T, H] of draft steps 0..steps-1 under training-time test.

    ids: [B, T] tokens; aux: [B, T, A*H] target aux hidden states. At step j the row for base
    position t reads token t + 1 + j (padding past the end) at rotary position t + j.
    """
    batch, length = ids.shape
    base = torch.arange(length, device=ids.device)
    causal = base.view(-1, 1) >= base.view(1, -1)  # [T, T]
    layer = head.midlayer
    hidden = head.combine_hidden_states(aux)  # [B, T, H]
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for step in range(steps):
        shift = 1 + step
        input_ids = torch.full_like(ids, PADDING_TOKEN)  # [B, T]
        input_ids[:, : max(0, length - shift)] = ids[:, shift:]
        positions = (base + step).view(1, -1).expand(batch, -1)  # [B, T]
        x = layer.attention_input(head.embed_tokens(input_ids), hidden)
        q, k, v = layer.self_attn.project(x, positions)
        keys.append(k)
        values.append(v)
        attended = ttt_attention(layer.self_attn, q, keys, values, causal)
        hidden = layer.finish(layer.self_attn.output(attended), hidden)
        yield hidden


def ttt_forward(
    head: Eagle3Head,
    ids: torch.Tensor,
    labels: torch.Tensor,
    aux: torch.Tensor,
    lengths: torch.Tensor,
    target_to_draft: torch.Tensor,
    steps: int,
    soft: tuple[torch.Tensor, torch.Tensor] | None = None,
    soft_weight: float = 0.0,
) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Per-step mean losses and (correct, counted) top-1 pairs for one batch.

    labels: [B, T] the target's greedy next token at each position; lengths: [B]. The loss is
    the cross-entropy against ``labels``, mixed when ``soft_weight`` > 0 with the cross-entropy
    against the target's distribution ``soft`` = (top-K ids [B, T, K], log-probs [B, T, K]):
    ``(1 - soft_weight) * hard + soft_weight * soft`` (see :func:`soft_label_loss`).
    """
    if soft_weight and soft is None:
        raise ValueError("soft_weight > 0 needs the target's top-K distribution (soft)")
    length = ids.shape[1]
    base = torch.arange(length, device=ids.device)
    losses: list[torch.Tensor] = []
    accuracy: list[tuple[int, int]] = []
    for step, prenorm in enumerate(ttt_hidden_states(head, ids, aux, steps)):
        shift = 1 + step
        targets = torch.full_like(ids, IGNORE_LABEL)  # [B, T]: target greedy token after t + 1 + step
        targets[:, : max(0, length - shift)] = labels[:, shift:]
        in_range = base.view(1, -1) < (lengths.view(-1, 1) - shift)  # [B, T]
        draft_targets = torch.where(
            in_range & (targets >= 0), target_to_draft[targets.clamp(min=0)], NOT_IN_DRAFT_VOCAB
        )
        valid = draft_targets != NOT_IN_DRAFT_VOCAB  # [B, T]
        flat_targets = draft_targets[valid]  # [N]
        if flat_targets.numel():
            # Logits only for the N positions that count: [N, draft_vocab].
            flat_logits = head.compute_logits(head.norm(prenorm[valid])).float()
            loss = F.cross_entropy(flat_logits, flat_targets)
            if soft_weight:
                top_ids = torch.zeros_like(soft[0])  # [B, T, K]: distribution after t + 1 + step
                top_logprobs = torch.full_like(soft[1], float("-inf"))
                top_ids[:, : max(0, length - shift)] = soft[0][:, shift:]
                top_logprobs[:, : max(0, length - shift)] = soft[1][:, shift:]
                soft_loss = soft_label_loss(flat_logits, top_ids[valid], top_logprobs[valid], target_to_draft)
                loss = (1.0 - soft_weight) * loss + soft_weight * soft_loss
            losses.append(loss)
            with torch.no_grad():
                correct = int((flat_logits.argmax(-1) == flat_targets).sum())
        else:
            losses.append(prenorm.sum() * 0.0)
            correct = 0
        accuracy.append((correct, int(flat_targets.numel())))
    return losses, accuracy


def ttt_loss_weights(steps: int, decay: float) -> list[float]:
    """Loss weight of each training-time-test step: ``decay ** j`` for j in 0..steps-1."""
    if steps < 1:
        raise ValueError(f"ttt_steps={steps}; at least one draft step is needed")
    if decay <= 0:
        raise ValueError(f"ttt_decay={decay}; must be positive")
    return [decay**j for j in range(steps)]


def combine_step_losses(losses: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted mean of the per-step losses (weights normalised to sum to 1)."""
    return sum(w * l for w, l in zip(weights, losses)) / sum(weights)


def soft_label_loss(
    logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor, target_to_draft: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of draft ``logits`` [N, draft_vocab] against the target's top-K
    distribution (ids [N, K], log-probs [N, K]) restricted to the draft vocabulary, renormalised.

    Rows whose top-K holds no draft-vocabulary token contribute nothing.
    """
    draft_ids = target_to_draft[top_ids]  # [N, K]
    present = (draft_ids != NOT_IN_DRAFT_VOCAB) & torch.isfinite(top_logprobs)
    weights = torch.where(present, top_logprobs.exp(), torch.zeros_like(top_logprobs))  # [N, K]
    mass = weights.sum(-1, keepdim=True)  # [N, 1]
    weights = weights / mass.clamp(min=1e-12)
    logq = torch.log_softmax(logits.float(), dim=-1).gather(-1, draft_ids.clamp(min=0))  # [N, K]
    per_row = -(weights * logq).sum(-1)  # [N]
    rows = (mass.squeeze(-1) > 0).float()
    return (per_row * rows).sum() / rows.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- setup


DRAFT_VOCAB_COVERAGE_SIZES = (8192, 16384, 32768)


def draft_vocab_coverage(counts: torch.Tensor, sizes: tuple[int, ...] = DRAFT_VOCAB_COVERAGE_SIZES) -> dict[str, float]:
    """Share of the target's argmax tokens (``counts`` [vocab]) covered by the ``size`` most frequent."""
    ordered = torch.sort(counts, descending=True).values.double()
    total = float(ordered.sum()) or 1.0
    return {str(size): float(ordered[:size].sum()) / total for size in sizes if size <= counts.numel()}


def build_draft_vocab(work_dir: Path, store: FeatureStore, vocab_size: int, draft_vocab_size: int,
                      init_from_head: str | None = None) -> torch.Tensor:
    """Target ids of the draft vocabulary (ascending); computed once (or taken from the head
    ``init_from_head``), then read back."""
    from safetensors.torch import load_file, save_file

    path = work_dir / DRAFT_VOCAB_FILE
    if init_from_head and not path.is_file():
        start = load_head(Path(init_from_head))
        if start.config.draft_vocab_size != draft_vocab_size or start.config.vocab_size != vocab_size:
            raise ValueError(
                f"init_from_head={init_from_head} has a draft vocabulary of {start.config.draft_vocab_size} "
                f"over {start.config.vocab_size} target tokens; this run expects {draft_vocab_size} over {vocab_size}"
            )
        ids = start.draft_to_target_ids(torch.arange(draft_vocab_size))
        counts = store.label_counts(vocab_size)
        save_file({"draft_to_target": ids, "counts": counts[ids]}, str(path))
        return ids
    if path.is_file():
        ids = load_file(str(path))["draft_to_target"]
        if ids.numel() != draft_vocab_size:
            raise ValueError(
                f"draft_vocab_size={draft_vocab_size} differs from {ids.numel()} stored in {path}"
            )
        return ids
    counts = store.label_counts(vocab_size)
    top = torch.topk(counts, draft_vocab_size).indices
    ids = torch.sort(top).values.to(torch.long)
    coverage = float(counts[ids].sum()) / max(1, int(counts.sum()))
    save_file({"draft_to_target": ids, "counts": counts[ids]}, str(path))
    logger.info("draft vocabulary: %d tokens cover %.2f%% of target greedy tokens", draft_vocab_size, 100 * coverage)
    return ids


def copy_target_embedding(head: Eagle3Head, embed: torch.Tensor) -> None:
    """Fill the head's token embedding with the target's ``embed`` [vocab, hidden] (checked shape)."""
    if embed.shape != head.embed_tokens.weight.shape:
        raise ValueError(
            f"target embed_tokens has shape {tuple(embed.shape)}; the head expects "
            f"{tuple(head.embed_tokens.weight.shape)} (hidden size mismatch)"
        )
    with torch.no_grad():
        head.embed_tokens.weight.copy_(embed)


def init_from_target_layer(head: Eagle3Head, tensors: dict[str, torch.Tensor], layer: int) -> None:
    """Copy the target's decoder layer ``layer`` (``tensors``: its HF weights by name) into the
    draft layer: q/k/v over the hidden-state half of the input (the second H columns), with the
    target's input_layernorm as ``hidden_norm``; o_proj, the MLP and post_attention_layernorm
    as they are. The token-embedding half of q/k/v and ``input_layernorm`` keep their values."""
    prefix = f"model.layers.{layer}."
    hidden = head.config.hidden_size
    mid = head.midlayer
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            weight = tensors[f"{prefix}self_attn.{name}.weight"].float()
            target = getattr(mid.self_attn, name).weight
            if weight.shape != (target.shape[0], hidden):
                raise ValueError(f"target {name} has shape {tuple(weight.shape)}; the draft layer expects "
                                 f"{(target.shape[0], hidden)}")
            target[:, hidden:] = weight
        mid.self_attn.o_proj.weight.copy_(tensors[f"{prefix}self_attn.o_proj.weight"].float())
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(mid.mlp, name).weight.copy_(tensors[f"{prefix}mlp.{name}.weight"].float())
        mid.hidden_norm.weight.copy_(tensors[f"{prefix}input_layernorm.weight"].float())
        mid.post_attention_layernorm.weight.copy_(tensors[f"{prefix}post_attention_layernorm.weight"].float())


def initial_head(config: Any, head_config: Eagle3HeadConfig, draft_to_target: torch.Tensor) -> Eagle3Head:
    """A seeded head: target embeddings (frozen), lm_head rows and final norm from the target
    (and the draft layer from the target's last decoder layer with ``init_from_target``)."""
    from safetensors import safe_open

    torch.manual_seed(config.seed)
    head = Eagle3Head(head_config)
    head.set_draft_vocab(draft_to_target)
    weights_path = Path(config.target) / "model.safetensors"
    with safe_open(str(weights_path), framework="pt") as handle:
        names = set(handle.keys())
        embed = handle.get_tensor("model.embed_tokens.weight").float()
        lm_head = handle.get_tensor("lm_head.weight").float() if "lm_head.weight" in names else embed
        final_norm = handle.get_tensor("model.norm.weight").float()
        last = None
        if getattr(config, "init_from_target", False):
            last = max(int(n.split(".")[2]) for n in names if n.startswith("model.layers."))
            layer_tensors = {n: handle.get_tensor(n) for n in names if n.startswith(f"model.layers.{last}.")}
    copy_target_embedding(head, embed)
    if last is not None:
        init_from_target_layer(head, layer_tensors, last)
    with torch.no_grad():
        head.lm_head.weight.copy_(lm_head[draft_to_target])
        head.norm.weight.copy_(final_norm)
    start_from = getattr(config, "init_from_head", None)
    if start_from:
        start = load_head(Path(start_from))
        if not torch.equal(start.d2t, head.d2t):
            raise ValueError(f"init_from_head={start_from}: its draft vocabulary differs from this run's")
        trained = {name: t for name, t in start.state_dict().items() if not name.startswith("embed_tokens")}
        head.load_state_dict(trained, strict=False)
    return head


def _trainable(head: Eagle3Head) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in head.named_parameters() if p.requires_grad}


def learning_rate(config: Any, step: int, total_steps: int, progress: float | None = None) -> float:
    """Linear warmup over ``warmup_steps``, then (``lr_schedule``) cosine decay to ``min_lr_ratio``
    of the peak at ``total_steps``, or constant. ``progress`` in [0, 1], when given, replaces the
    step-based position in the decay (training on a CPU-time budget)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    schedule = getattr(config, "lr_schedule", "cosine")
    if schedule == "constant":
        return config.learning_rate
    if schedule != "cosine":
        raise ValueError(f"lr_schedule={schedule!r}; expected 'cosine' or 'constant'")
    if progress is None:
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    progress = min(1.0, max(0.0, progress))
    floor = getattr(config, "min_lr_ratio", 0.1)
    return config.learning_rate * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- checkpoints


def _state_path(work_dir: Path, step: int) -> Path:
    return work_dir / CHECKPOINTS_DIR / f"state-{step:07d}.safetensors"


def save_checkpoint(
    work_dir: Path, head: Eagle3Head, optimizer: torch.optim.Optimizer, meta: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    directory = work_dir / CHECKPOINTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    step = meta["step"]
    tensors: dict[str, torch.Tensor] = {}
    params = _trainable(head)
    for name, param in params.items():
        tensors[f"param.{name}"] = param.detach().cpu().contiguous()
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"adam.{key}.{name}"] = state[key].cpu().contiguous()
        if "step" in state:
            meta["adam_step"] = float(state["step"])
    path = _state_path(work_dir, step)
    temp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temp))
    temp.replace(path)
    (path.with_suffix(".json")).write_text(json.dumps(meta, indent=2) + "\n")
    latest = directory / LATEST_FILE
    temp_latest = latest.with_name(f".{LATEST_FILE}.tmp")
    temp_latest.write_text(json.dumps({"step": step, "file": path.name}) + "\n")
    temp_latest.replace(latest)
    states = sorted(directory.glob("state-*.safetensors"))
    for old in states[:-KEEP_CHECKPOINTS]:
        old.unlink()
        old.with_suffix(".json").unlink(missing_ok=True)


def load_checkpoint(
    work_dir: Path, head: Eagle3Head, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Restore the newest checkpoint into head/optimizer; returns its meta or None."""
    from safetensors.torch import load_file

    latest = work_dir / CHECKPOINTS_DIR / LATEST_FILE
    if not latest.is_file():
        return None
    step = json.loads(latest.read_text())["step"]
    path = _state_path(work_dir, step)
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    params = _trainable(head)
    with torch.no_grad():
        for name, param in params.items():
            stored = tensors[f"param.{name}"]
            if stored.shape != param.shape:
                raise ValueError(
                    f"checkpoint {path} holds {name} with shape {tuple(stored.shape)}; the head "
                    f"expects {tuple(param.shape)}"
                )
            param.copy_(stored)
            if f"adam.exp_avg.{name}" in tensors:
                optimizer.state[param] = {
                    "step": torch.tensor(meta.get("adam_step", float(step))),
                    "exp_avg": tensors[f"adam.exp_avg.{name}"].to(param.device),
                    "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"].to(param.device),
                }
    return meta


# ----------------------------------------------------------------------------- export


def check_output_dir(output: Path) -> None:
    """ValueError unless ``output`` is absent, empty, or a previous head export."""
    if not output.exists():
        return
    if not output.is_dir():
        raise ValueError(f"output={str(output)!r} exists and is not a directory")
    names = {child.name for child in output.iterdir()}
    if not names:
        return
    config_path = output / "config.json"
    is_export = names <= EXPORT_FILES and config_path.is_file()
    if is_export:
        try:
            is_export = json.loads(config_path.read_text()).get("architectures") == [HEAD_ARCHITECTURE]
        except json.JSONDecodeError:
            is_export = False
    if not is_export:
        raise ValueError(
            f"output={str(output)!r} exists with other content ({sorted(names)}); refusing to overwrite"
        )


def export_head(
    head: Eagle3Head, output: Path, record: dict[str, Any] | None = None, target_hidden_size: int | None = None
) -> Path:
    """Write a vLLM-loadable EAGLE-3 checkpoint (bf16 weights, int64 d2t, bool t2d), atomically."""
    from safetensors.torch import save_file

    output = Path(output)
    check_output_dir(output)
    if target_hidden_size is not None and head.config.hidden_size != target_hidden_size:
        raise ValueError(
            f"head hidden_size={head.config.hidden_size} does not match the target hidden size "
            f"{target_hidden_size}"
        )
    tensors = {}
    for name, tensor in head.export_state_dict().items():
        tensor = tensor.detach().cpu()
        tensors[name] = tensor if name in ("d2t", "t2d") else tensor.to(torch.bfloat16)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        save_file(tensors, str(temp / "model.safetensors"), metadata={"format": "pt"})
        (temp / "config.json").write_text(json.dumps(head.config.to_hf_config(), indent=2) + "\n")
        if record is not None:
            (temp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(temp, 0o755)
        if output.exists():
            retired = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, retired)
            os.replace(temp, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temp, output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return output


def load_head(directory: Path) -> Eagle3Head:
    """Load an exported head (float32 weights; embed_tokens left at zero unless stored)."""
    from safetensors.torch import load_file

    config = Eagle3HeadConfig.from_hf_config(json.loads((Path(directory) / "config.json").read_text()))
    head = Eagle3Head(config)
    tensors = load_file(str(Path(directory) / "model.safetensors"))
    missing, unexpected = head.load_state_dict(
        {k: (v if k in ("d2t", "t2d") else v.float()) for k, v in tensors.items()}, strict=False
    )
    missing = [m for m in missing if not m.startswith("embed_tokens")]
    if missing or unexpected:
        raise ValueError(f"{directory}: missing tensors {missing}, unexpected tensors {unexpected}")
    return head


# ----------------------------------------------------------------------------- loop


def _head_config(config: Any) -> tuple[Eagle3HeadConfig, dict[str, Any]]:
    target_config = json.loads((Path(config.target) / "config.json").read_text())
    head_config = Eagle3HeadConfig.for_target(target_config, config.aux_layers, config.draft_vocab_size)
    return head_config, target_config


def _record(work_dir: Path, config: Any, store: FeatureStore, meta: dict[str, Any], coverage: float,
            coverage_by_size: dict[str, float] | None = None) -> dict[str, Any]:
    sampled = int(getattr(config, "sampled_answers", 0) or 0)
    source = "ShareGPT train split first turns; answers regenerated greedily by the target"
    if sampled:
        source += f", plus {sampled} answer(s) per prompt sampled at T={getattr(config, 'answer_temperature', 1.0)}"
    return {
        "target": config.target,
        "data": {
            "prompts_file": str(work_dir / "prompts.jsonl"),
            "sequences": len(store.sequences),
            "tokens": store.num_tokens,
            "answer_tokens": store.num_answer_tokens,
            "feature_shards": len(store.handles),
            "topk_logprobs": store.topk,
            "source": source,
        },
        "draft_vocab_size": config.draft_vocab_size,
        "draft_vocab_coverage": coverage,
        "draft_vocab_coverage_by_size": coverage_by_size or {},
        "aux_layer_ids": list(config.aux_layers),
        "ttt_steps": config.ttt_steps,
        "steps": meta["step"],
        "epochs_done": meta["epochs_done"],
        "tokens_seen": meta["tokens_seen"],
        "wall_time_s": meta["wall_time_s"],
        "cpu_time_s": meta.get("cpu_time_s", 0.0),
        "loss_curve": meta["loss_curve"],
        "command_lines": meta["command_lines"],
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config)),
    }


TRAIN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_optimizer(config: Any, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    betas = (getattr(config, "adam_beta1", 0.9), getattr(config, "adam_beta2", 0.95))
    return torch.optim.AdamW(params, lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay)


def train(work_dir: Path, config: Any, train_dir: Path | None = None) -> dict[str, Any]:
    """Train (or resume training) the head on the features of ``work_dir``; checkpoints, the draft
    vocabulary and the export go to ``train_dir`` (default ``work_dir``). Returns the record."""
    from tqdm import tqdm

    work_dir = Path(work_dir)
    train_dir = Path(train_dir) if train_dir is not None else work_dir
    train_dir.mkdir(parents=True, exist_ok=True)
    dtype_name = getattr(config, "train_dtype", "float32")
    if dtype_name not in TRAIN_DTYPES:
        raise ValueError(f"train_dtype={dtype_name!r}; expected one of {sorted(TRAIN_DTYPES)}")
    compute_dtype = TRAIN_DTYPES[dtype_name]
    soft_weight = float(getattr(config, "soft_label_weight", 0.0) or 0.0)
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"soft_label_weight={soft_weight}; expected a value in [0, 1]")
    device = torch.device(getattr(config, "device", "cpu") or "cpu")
    store = FeatureStore(work_dir, config.max_seq_len)
    if soft_weight and not store.topk:
        raise ValueError(
            f"soft_label_weight={soft_weight} needs top-K log-probs in the features of {work_dir}; "
            "extract them with topk_logprobs > 0 (a fresh work directory)"
        )
    head_config, target_config = _head_config(config)
    draft_to_target = build_draft_vocab(train_dir, store, head_config.vocab_size, head_config.draft_vocab_size,
                                        getattr(config, "init_from_head", None))
    counts = store.label_counts(head_config.vocab_size)
    coverage = float(counts[draft_to_target].sum()) / max(1, int(counts.sum()))
    coverage_by_size = draft_vocab_coverage(counts)
    head = initial_head(config, head_config, draft_to_target).to(device)
    head.embed_tokens.to(compute_dtype)  # frozen and never exported: keep it in the compute dtype
    store.move_to(device)
    target_to_draft = head.target_to_draft_ids()
    params = list(_trainable(head).values())
    optimizer = make_optimizer(config, params)
    meta = load_checkpoint(train_dir, head, optimizer) or {
        "step": 0,
        "epochs_done": 0.0,
        "tokens_seen": 0,
        "wall_time_s": 0.0,
        "cpu_time_s": 0.0,
        "loss_curve": [],
        "command_lines": [],
    }
    meta.setdefault("cpu_time_s", 0.0)
    meta["command_lines"].append(" ".join(sys.argv))
    lengths = [s.length for s in store.sequences]
    batches_per_epoch = len(epoch_batches(lengths, config.batch_tokens, config.seed, 0))
    cpu_budget = getattr(config, "budget_cpu_s", None)
    wall_budget = getattr(config, "budget_wall_s", None)
    if cpu_budget and wall_budget:
        raise ValueError("budget_cpu_s and budget_wall_s both set; give one training budget")
    budget = cpu_budget or wall_budget
    if config.max_steps:
        total_steps = config.max_steps
    elif budget:
        total_steps = 1 << 40  # the CPU budget ends training
    else:
        total_steps = int(math.ceil(config.epochs * batches_per_epoch))
    weights = ttt_loss_weights(config.ttt_steps, config.ttt_decay)
    clip = float(getattr(config, "grad_clip", 1.0) or 0.0)
    stop_after = getattr(config, "stop_after_s", None)
    checkpoint_every_s = getattr(config, "checkpoint_every_s", None)
    snapshot_every = int(getattr(config, "snapshot_every", 0) or 0)
    logger.info(
        "training: %d sequences, %d tokens, %d batches/epoch, steps %d -> %s, draft vocab coverage %s",
        len(store.sequences), store.num_tokens, batches_per_epoch, meta["step"],
        f"{'CPU' if cpu_budget else 'wall'} budget {budget:.0f} s" if budget and not config.max_steps else total_steps,
        {k: round(v, 4) for k, v in coverage_by_size.items()},
    )
    head.train()
    step = meta["step"]
    window_loss: list[float] = []
    window_acc = [[0, 0] for _ in range(config.ttt_steps)]
    started = time.time()
    cpu_started = time.process_time()
    wall_before = meta["wall_time_s"]
    cpu_before = meta["cpu_time_s"]
    last_checkpoint = started
    bar = tqdm(total=None if total_steps >= 1 << 40 else total_steps, initial=step, desc="train-head", unit="step")

    def cpu_spent() -> float:
        return cpu_before + time.process_time() - cpu_started

    def spent() -> float:
        """Training time counted against the budget: process CPU seconds (budget_cpu_s), or wall
        seconds (budget_wall_s, for accelerators, where CPU time says little), over all resumes."""
        return cpu_spent() if cpu_budget else wall_before + time.time() - started

    def out_of_budget() -> bool:
        if budget and spent() >= budget:
            return True
        return bool(stop_after) and time.time() - started >= stop_after

    def checkpoint() -> None:
        meta["step"] = step
        meta["wall_time_s"] = wall_before + time.time() - started
        meta["cpu_time_s"] = cpu_spent()
        save_checkpoint(train_dir, head, optimizer, meta)
        record = _record(work_dir, config, store, meta, coverage, coverage_by_size)
        (train_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        export_head(head, train_dir / HEAD_EXPORT_DIR, record, int(target_config["hidden_size"]))
        if snapshot_every and step and step % snapshot_every == 0:
            export_head(head, train_dir / SNAPSHOTS_DIR / f"step-{step:07d}", record, int(target_config["hidden_size"]))

    def log_window() -> None:
        nonlocal window_loss, window_acc
        if not window_loss:
            return
        meta["loss_curve"].append(
            {
                "step": step,
                "tokens_seen": meta["tokens_seen"],
                "cpu_time_s": cpu_spent(),
                "loss": sum(window_loss) / len(window_loss),
                "top1_accuracy": [c / max(1, n) for c, n in window_acc],
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        window_loss = []
        window_acc = [[0, 0] for _ in range(config.ttt_steps)]

    stop_requested: list[int] = []
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.append(signum))
    while step < total_steps and not stop_requested and not out_of_budget():
        epoch, position = divmod(step, batches_per_epoch)
        batches = epoch_batches(lengths, config.batch_tokens, config.seed, epoch)
        for batch_indices in batches[position:]:
            if step >= total_steps or stop_requested or out_of_budget():
                break
            refs = [store.sequences[i] for i in batch_indices]
            ids, labels, aux, batch_lengths = collate(store, refs, compute_dtype)
            soft = collate_topk(store, refs) if soft_weight else None
            progress = None
            if budget and not config.max_steps:
                if step >= config.warmup_steps and "cpu_at_warmup_end" not in meta:
                    meta["cpu_at_warmup_end"] = spent()  # the budget clock when warm-up ended
                decay_start = meta.get("cpu_at_warmup_end", 0.0)
                progress = (spent() - decay_start) / max(1e-9, budget - decay_start)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step, total_steps, progress)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == torch.bfloat16):
                losses, accuracy = ttt_forward(
                    head, ids, labels, aux, batch_lengths, target_to_draft, config.ttt_steps, soft, soft_weight
                )
            loss = combine_step_losses(losses, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            step += 1
            meta["tokens_seen"] += int(batch_lengths.sum())
            meta["epochs_done"] = step / batches_per_epoch
            window_loss.append(loss.item())
            for j, (correct, counted) in enumerate(accuracy):
                window_acc[j][0] += correct
                window_acc[j][1] += counted
            acc = [c / max(1, n) for c, n in window_acc]
            bar.set_postfix(loss=f"{sum(window_loss) / len(window_loss):.3f}", acc0=f"{acc[0]:.3f}")
            bar.update(1)
            timed = checkpoint_every_s is not None and time.time() - last_checkpoint >= checkpoint_every_s
            if step % config.checkpoint_every == 0 or step == total_steps or timed:
                log_window()
                checkpoint()
                last_checkpoint = time.time()
    bar.close()
    signal.signal(signal.SIGTERM, previous_handler)
    log_window()
    if meta["step"] != step or not (train_dir / HEAD_EXPORT_DIR).is_dir():
        checkpoint()  # also on SIGTERM / budget / stop_after_s: stop cleanly at the current step
    if stop_requested:
        logger.info("stopped by SIGTERM at step %d (checkpoint saved)", step)
    elif step < total_steps and not (budget and spent() >= budget):
        logger.info("stopped after %.0f s at step %d (checkpoint saved); rerun to continue", time.time() - started, step)
    return _record(work_dir, config, store, meta, coverage, coverage_by_size)


def export_latest(work_dir: Path, config: Any, output: Path) -> Path:
    """Copy the newest exported head (with its training record) to ``output``."""
    source = Path(work_dir) / HEAD_EXPORT_DIR
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"no exported head under {source}; run the train stage first")
    check_output_dir(Path(output))
    head = load_head(source)
    target_config = json.loads((Path(config.target) / "config.json").read_text())
    record_path = source / RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    return export_head(head, Path(output), record, int(target_config["hidden_size"]))
