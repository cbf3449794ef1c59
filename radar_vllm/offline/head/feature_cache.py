"""Target features for head training: aux hidden states, the target's greedy next tokens and,
optionally, its top-K next-token distribution (for soft-label distillation).

For each answer shard, ``features/shard-NNNNN.safetensors`` holds, over the concatenated
sequences (prompt + answer, the greedy answer first, then any sampled answers) of the shard:

- ``input_ids``  int32 [N]           the tokens
- ``labels``     int32 [N]           the target's argmax next token at each position
- ``aux``        bf16  [N, A * H]    inputs of the aux layers (vLLM's aux hidden states)
- ``offsets``    int64 [S + 1]       sequence boundaries
- ``prompt_lens`` int32 [S]          prompt length of each sequence
- ``answer_kinds`` int8 [S]          (only with sampled answers) 0 = greedy answer, 1 = sampled
- ``topk_ids``   int32 [N, K]        (K > 0 only) the target's K most likely next tokens
- ``topk_logprobs`` f32 [N, K]       (K > 0 only) their log-probabilities (softmax over the full
                                     vocabulary, temperature 1), in decreasing order

The target runs in float32 here (bf16 matmuls are very slow on CPUs without AVX-512 BF16); the
aux hidden states are stored as bf16. Files are safetensors only.

vLLM's aux layer id ``i`` is the residual stream entering decoder layer ``i``; with HF
transformers that is the input of ``model.layers[i]``, captured here by forward pre-hooks.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from radar_vllm.offline.head.data import iter_answer_shards, record_sequences

logger = logging.getLogger(__name__)

FEATURES_DIR = "features"
LOGITS_CHUNK = 1024
FEATURE_BATCH_TOKENS = 32768


def feature_shard_path(work_dir: Path, index: int) -> Path:
    return work_dir / FEATURES_DIR / f"shard-{index:05d}.safetensors"


class AuxHiddenCapture:
    """Forward pre-hooks that record the inputs of chosen decoder layers of an HF Llama model."""

    def __init__(self, model: Any, layer_ids: Sequence[int]) -> None:
        layers = model.model.layers
        for layer_id in layer_ids:
            if not 0 <= layer_id < len(layers):
                raise ValueError(f"aux layer id {layer_id} outside [0, {len(layers) - 1}]")
        self.layer_ids = list(layer_ids)
        self.captured: dict[int, torch.Tensor] = {}
        self._handles = [
            layers[layer_id].register_forward_pre_hook(self._hook(layer_id), with_kwargs=True)
            for layer_id in self.layer_ids
        ]

    def _hook(self, layer_id: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.captured[layer_id] = hidden.detach()

        return hook

    def concatenated(self) -> torch.Tensor:
        """[B, T, A * H] in layer-id order."""
        return torch.cat([self.captured[i] for i in self.layer_ids], dim=-1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def load_target(target_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to(torch.device(device))
    model.eval()
    return model


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def target_features(
    model: Any, capture: AuxHiddenCapture, sequence: Sequence[int], prompt_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux [T, A*H], greedy next tokens [T]) of one sequence (prompt + the target's greedy answer).

    Inside a greedy answer the target's greedy next token is the answer's next token itself, so
    the lm_head runs only over the prompt positions and the last position.
    """
    device = _device(model)
    ids = torch.tensor([list(sequence)], dtype=torch.long, device=device)  # [1, T]
    hidden = model.model(input_ids=ids).last_hidden_state[0]  # [T, H]
    aux = capture.concatenated()[0].cpu()  # [T, A*H]
    length = ids.shape[1]
    labels = torch.empty(length, dtype=torch.long, device=device)  # [T]
    scored = min(max(prompt_len - 1, 0), length - 1)  # positions [0, scored) are prompt positions
    labels[scored : length - 1] = ids[0, scored + 1 :]
    rows = torch.cat([torch.arange(scored, device=device), torch.tensor([length - 1], device=device)])
    weight = model.lm_head.weight
    for start in range(0, rows.numel(), LOGITS_CHUNK):
        chunk = rows[start : start + LOGITS_CHUNK]
        labels[chunk] = (hidden[chunk] @ weight.T).argmax(-1)
    return aux, labels.cpu()


@torch.no_grad()
def target_topk_features_batch(
    model: Any, capture: AuxHiddenCapture, sequences: Sequence[Sequence[int]], k: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`target_topk_features` of several sequences in one right-padded forward pass (causal
    attention keeps padding invisible to the real positions). Results are on the CPU."""
    device = _device(model)
    longest = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long, device=device)  # [B, T]
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(list(sequence), device=device)
    hidden = model.model(input_ids=ids).last_hidden_state  # [B, T, H]
    aux = capture.concatenated()  # [B, T, A*H]
    weight = model.lm_head.weight
    results = []
    for row, sequence in enumerate(sequences):
        length = len(sequence)
        top_ids = torch.empty(length, k, dtype=torch.long, device=device)  # [T, k]
        top_logprobs = torch.empty(length, k, dtype=torch.float32, device=device)  # [T, k]
        for start in range(0, length, LOGITS_CHUNK):
            end = min(length, start + LOGITS_CHUNK)
            logits = (hidden[row, start:end] @ weight.T).float()  # [C, vocab]
            values, indices = torch.topk(logits, k, dim=-1)
            top_logprobs[start:end] = values - torch.logsumexp(logits, dim=-1, keepdim=True)
            top_ids[start:end] = indices
        top_ids, top_logprobs = top_ids.cpu(), top_logprobs.cpu()
        results.append((aux[row, :length].cpu(), top_ids[:, 0].clone(), top_ids, top_logprobs))
    return results


def target_topk_features(
    model: Any, capture: AuxHiddenCapture, sequence: Sequence[int], k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(aux [T, A*H], argmax next tokens [T], top-k ids [T, k], top-k log-probs [T, k]).

    The lm_head runs over every position (the answer may be sampled, so its next token need not
    be the target's argmax). Labels are the argmax of the float32 logits.
    """
    return target_topk_features_batch(model, capture, [sequence], k)[0]


def extract_features(work_dir: Path, config: Any, deadline: float | None = None) -> int:
    """Features for every answer shard that has none yet; returns the tokens processed. Past
    ``deadline`` (a ``time.time()`` value) no new shard starts."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from radar_vllm.offline.head.trainer import epoch_batches

    (work_dir / FEATURES_DIR).mkdir(parents=True, exist_ok=True)
    pending = [
        (index, records)
        for index, records in iter_answer_shards(work_dir)
        if not feature_shard_path(work_dir, index).is_file()
    ]
    if not pending:
        return 0
    topk = int(getattr(config, "topk_logprobs", 0) or 0)
    device = getattr(config, "device", "cpu") or "cpu"
    model = load_target(config.target, device=device)
    # On an accelerator, sequences go through the target in padded batches of this many tokens.
    batch_tokens = 0 if torch.device(device).type == "cpu" else FEATURE_BATCH_TOKENS
    capture = AuxHiddenCapture(model, config.aux_layers)
    made = 0
    try:
        for index, records in pending:
            if deadline is not None and time.time() >= deadline:
                logger.info("deadline reached: features stop before shard %d", index)
                break
            pairs = [(r, answer) for r in records for answer in record_sequences(r)]
            kinds = [kind for r in records for kind in [0] + [1] * (len(record_sequences(r)) - 1)]
            sequences = [(r["prompt_ids"] + answer)[: config.max_seq_len] for r, answer in pairs]
            aux_rows: dict[int, torch.Tensor] = {}
            label_rows: dict[int, torch.Tensor] = {}
            topk_id_rows: dict[int, torch.Tensor] = {}
            topk_logprob_rows: dict[int, torch.Tensor] = {}
            bar = tqdm(total=sum(len(s) for s in sequences), desc=f"features shard {index}", unit="tok")
            # padded batches of at most batch_tokens (0: one sequence each); results are kept by index
            groups = epoch_batches([len(s) for s in sequences], batch_tokens if topk else 0, 0, 0)
            for group in groups:
                if topk:
                    batch = target_topk_features_batch(model, capture, [sequences[i] for i in group], topk)
                    for i, (aux, labels, top_ids, top_logprobs) in zip(group, batch):
                        topk_id_rows[i] = top_ids.to(torch.int32)
                        topk_logprob_rows[i] = top_logprobs
                        aux_rows[i] = aux.to(torch.bfloat16).clone()
                        label_rows[i] = labels.to(torch.int32)
                else:
                    (i,) = group
                    aux, labels = target_features(model, capture, sequences[i], len(pairs[i][0]["prompt_ids"]))
                    aux_rows[i] = aux.to(torch.bfloat16).clone()
                    label_rows[i] = labels.to(torch.int32)
                bar.update(sum(len(sequences[i]) for i in group))
            bar.close()
            lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
            offsets = torch.zeros(len(sequences) + 1, dtype=torch.long)  # [S + 1]
            offsets[1:] = torch.cumsum(lengths, 0)
            tensors = {
                "input_ids": torch.tensor([t for s in sequences for t in s], dtype=torch.int32),
                "labels": torch.cat([label_rows[i] for i in range(len(sequences))]),
                "aux": torch.cat([aux_rows[i] for i in range(len(sequences))]).contiguous(),
                "offsets": offsets,
                "prompt_lens": torch.tensor(
                    [min(len(r["prompt_ids"]), len(s)) for (r, _), s in zip(pairs, sequences)], dtype=torch.int32
                ),
            }
            if any(kinds):
                tensors["answer_kinds"] = torch.tensor(kinds, dtype=torch.int8)
            if topk:
                tensors["topk_ids"] = torch.cat([topk_id_rows[i] for i in range(len(sequences))]).contiguous()
                tensors["topk_logprobs"] = torch.cat([topk_logprob_rows[i] for i in range(len(sequences))]).contiguous()
            path = feature_shard_path(work_dir, index)
            temp = path.with_name(f".{path.name}.tmp")
            save_file(tensors, str(temp))
            temp.replace(path)
            made += int(offsets[-1])
            logger.info("features shard %d: %d sequences, %d tokens", index, len(sequences), int(offsets[-1]))
    finally:
        capture.remove()
    return made
