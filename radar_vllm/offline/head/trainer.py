"""EAGLE-3 head training with training-time test (several self-fed draft steps), resumable.

Work directory layout (besides the data stages):

- ``draft_vocab.safetensors``: target ids of the draft vocabulary (the most frequent target
  greedy tokens over the features present when training first started) and their counts.
- ``checkpoints/state-SSSSSSS.safetensors`` + ``.json``: fp32 weights, AdamW moments, position.
  ``checkpoints/latest.json`` names the newest; the two newest are kept.
- ``head/``: the newest checkpoint exported for vLLM (bf16), refreshed at every checkpoint.
- ``training_record.json``: data size, steps, wall time, loss curve, command lines.

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


class FeatureStore:
    """Lazy (memory-mapped) access to the feature shards of a work directory."""

    def __init__(self, work_dir: Path, max_seq_len: int) -> None:
        from safetensors import safe_open

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
            for row in range(offsets.numel() - 1):
                start, end = int(offsets[row]), int(offsets[row + 1])
                length = min(end - start, max_seq_len)
                if length >= 3:
                    self.sequences.append(SequenceRef(index, start, length, int(prompt_lens[row])))
        self.num_tokens = sum(s.length for s in self.sequences)
        self.num_answer_tokens = sum(max(0, s.length - s.prompt_len) for s in self.sequences)

    def label_counts(self, vocab_size: int) -> torch.Tensor:
        counts = torch.zeros(vocab_size, dtype=torch.long)  # [vocab]
        for handle in self.handles.values():
            counts += torch.bincount(handle.get_tensor("labels").long(), minlength=vocab_size)[:vocab_size]
        return counts

    def load(self, ref: SequenceRef) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids [L], labels [L], aux [L, A*H]) of one sequence."""
        handle = self.handles[ref.shard]
        end = ref.start + ref.length
        return (
            handle.get_slice("input_ids")[ref.start : end].long(),
            handle.get_slice("labels")[ref.start : end].long(),
            handle.get_slice("aux")[ref.start : end],
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
    store: FeatureStore, refs: list[SequenceRef]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids [B, T], labels [B, T], aux [B, T, A*H], lengths [B])."""
    longest = max(r.length for r in refs)
    loaded = [store.load(r) for r in refs]
    width = loaded[0][2].shape[-1]
    ids = torch.full((len(refs), longest), PADDING_TOKEN, dtype=torch.long)  # [B, T]
    labels = torch.full((len(refs), longest), IGNORE_LABEL, dtype=torch.long)  # [B, T]
    aux = torch.zeros(len(refs), longest, width, dtype=torch.bfloat16)  # [B, T, A*H]
    for row, (seq_ids, seq_labels, seq_aux) in enumerate(loaded):
        length = seq_ids.numel()
        ids[row, :length] = seq_ids
        labels[row, :length] = seq_labels
        aux[row, :length] = seq_aux
    lengths = torch.tensor([r.length for r in refs], dtype=torch.long)  # [B]
    return ids, labels, aux, lengths


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
    base = torch.arange(length)
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
) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Per-step mean cross-entropy losses and (correct, counted) top-1 pairs for one batch.

    labels: [B, T] the target's greedy next token at each position; lengths: [B].
    """
    length = ids.shape[1]
    base = torch.arange(length)
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
            losses.append(F.cross_entropy(flat_logits, flat_targets))
            with torch.no_grad():
                correct = int((flat_logits.argmax(-1) == flat_targets).sum())
        else:
            losses.append(prenorm.sum() * 0.0)
            correct = 0
        accuracy.append((correct, int(flat_targets.numel())))
    return losses, accuracy


# ----------------------------------------------------------------------------- setup


def build_draft_vocab(work_dir: Path, store: FeatureStore, vocab_size: int, draft_vocab_size: int) -> torch.Tensor:
    """Target ids of the draft vocabulary (ascending); computed once, then read back."""
    from safetensors.torch import load_file, save_file

    path = work_dir / DRAFT_VOCAB_FILE
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


def initial_head(config: Any, head_config: Eagle3HeadConfig, draft_to_target: torch.Tensor) -> Eagle3Head:
    """A seeded head: target embeddings (frozen), lm_head rows and final norm from the target."""
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
    copy_target_embedding(head, embed)
    with torch.no_grad():
        head.lm_head.weight.copy_(lm_head[draft_to_target])
        head.norm.weight.copy_(final_norm)
    return head


def _trainable(head: Eagle3Head) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in head.named_parameters() if p.requires_grad}


def learning_rate(config: Any, step: int, total_steps: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at ``total_steps``."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


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
        tensors[f"param.{name}"] = param.detach().contiguous()
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"adam.{key}.{name}"] = state[key].contiguous()
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
                    "exp_avg": tensors[f"adam.exp_avg.{name}"].clone(),
                    "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"].clone(),
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


def _record(work_dir: Path, config: Any, store: FeatureStore, meta: dict[str, Any], coverage: float) -> dict[str, Any]:
    return {
        "target": config.target,
        "data": {
            "prompts_file": str(work_dir / "prompts.jsonl"),
            "sequences": len(store.sequences),
            "tokens": store.num_tokens,
            "answer_tokens": store.num_answer_tokens,
            "feature_shards": len(store.handles),
            "source": "ShareGPT train split first turns; answers regenerated greedily by the target",
        },
        "draft_vocab_size": config.draft_vocab_size,
        "draft_vocab_coverage": coverage,
        "aux_layer_ids": list(config.aux_layers),
        "ttt_steps": config.ttt_steps,
        "steps": meta["step"],
        "epochs_done": meta["epochs_done"],
        "tokens_seen": meta["tokens_seen"],
        "wall_time_s": meta["wall_time_s"],
        "loss_curve": meta["loss_curve"],
        "command_lines": meta["command_lines"],
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config)),
    }


def train(work_dir: Path, config: Any) -> dict[str, Any]:
    """Train (or resume training) the head; returns the training record."""
    from tqdm import tqdm

    work_dir = Path(work_dir)
    store = FeatureStore(work_dir, config.max_seq_len)
    head_config, target_config = _head_config(config)
    draft_to_target = build_draft_vocab(work_dir, store, head_config.vocab_size, head_config.draft_vocab_size)
    counts = store.label_counts(head_config.vocab_size)
    coverage = float(counts[draft_to_target].sum()) / max(1, int(counts.sum()))
    head = initial_head(config, head_config, draft_to_target)
    head.embed_tokens.to(torch.bfloat16)  # frozen and never exported: keep it in the compute dtype
    target_to_draft = head.target_to_draft_ids()
    params = list(_trainable(head).values())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    meta = load_checkpoint(work_dir, head, optimizer) or {
        "step": 0,
        "epochs_done": 0.0,
        "tokens_seen": 0,
        "wall_time_s": 0.0,
        "loss_curve": [],
        "command_lines": [],
    }
    meta["command_lines"].append(" ".join(sys.argv))
    lengths = [s.length for s in store.sequences]
    batches_per_epoch = len(epoch_batches(lengths, config.batch_tokens, config.seed, 0))
    total_steps = config.max_steps or int(math.ceil(config.epochs * batches_per_epoch))
    weights = [config.ttt_decay**j for j in range(config.ttt_steps)]
    logger.info(
        "training: %d sequences, %d tokens, %d batches/epoch, steps %d -> %d",
        len(store.sequences), store.num_tokens, batches_per_epoch, meta["step"], total_steps,
    )
    head.train()
    step = meta["step"]
    window_loss: list[float] = []
    window_acc = [[0, 0] for _ in range(config.ttt_steps)]
    started = time.time()
    wall_before = meta["wall_time_s"]
    bar = tqdm(total=total_steps, initial=step, desc="train-head", unit="step")

    def checkpoint() -> None:
        meta["step"] = step
        meta["wall_time_s"] = wall_before + time.time() - started
        save_checkpoint(work_dir, head, optimizer, meta)
        record = _record(work_dir, config, store, meta, coverage)
        (work_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        export_head(head, work_dir / HEAD_EXPORT_DIR, record, int(target_config["hidden_size"]))

    stop_requested: list[int] = []
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.append(signum))
    while step < total_steps and not stop_requested:
        epoch, position = divmod(step, batches_per_epoch)
        batches = epoch_batches(lengths, config.batch_tokens, config.seed, epoch)
        for batch_indices in batches[position:]:
            if step >= total_steps or stop_requested:
                break
            ids, labels, aux, batch_lengths = collate(store, [store.sequences[i] for i in batch_indices])
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step, total_steps)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses, accuracy = ttt_forward(
                    head, ids, labels, aux, batch_lengths, target_to_draft, config.ttt_steps
                )
            loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
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
            if step % config.checkpoint_every == 0 or step == total_steps:
                meta["loss_curve"].append(
                    {
                        "step": step,
                        "tokens_seen": meta["tokens_seen"],
                        "loss": sum(window_loss) / len(window_loss),
                        "top1_accuracy": acc,
                        "lr": optimizer.param_groups[0]["lr"],
                    }
                )
                window_loss = []
                window_acc = [[0, 0] for _ in range(config.ttt_steps)]
                checkpoint()
    bar.close()
    signal.signal(signal.SIGTERM, previous_handler)
    if meta["step"] != step or not (work_dir / HEAD_EXPORT_DIR).is_dir():
        checkpoint()  # also on SIGTERM: stop cleanly with a checkpoint at the current step
    if stop_requested:
        logger.info("stopped by SIGTERM at step %d (checkpoint saved)", step)
    return _record(work_dir, config, store, meta, coverage)


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
