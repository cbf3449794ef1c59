"""The ``train-head`` pipeline: prompts -> target answers -> target features -> head training -> export.

Every stage writes under one work directory and skips what is already done, so running the same
command again resumes where it stopped (and ``--epochs``/``--max-steps`` may be raised to train
further).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from radar_vllm.offline.head.data import (
    PROMPTS_FILE,
    answer_shard_path,
    generate_answers,
    load_prompts,
    num_shards,
    read_jsonl,
    save_prompts,
    select_training_prompts,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

STAGES = ("generate", "features", "train", "export")
RUN_CONFIG_FILE = "run_config.json"
# Settings that define the data; changing them inside one work directory would mix datasets.
DATA_KEYS = (
    "target", "max_prompt_tokens", "max_new_tokens", "seed", "shard_size", "aux_layers",
    "sampled_answers", "answer_temperature", "gen_dtype", "topk_logprobs", "gen_engine",
)


@dataclasses.dataclass
class HeadTrainingConfig:
    target: str
    work_dir: str
    output: str | None = None
    num_prompts: int = 4096
    max_prompt_tokens: int = 384
    max_new_tokens: int = 384
    shard_size: int = 256
    gen_batch: int = 128
    aux_layers: list[int] | None = None
    # Data: answers sampled at answer_temperature per prompt besides the greedy one; vLLM dtype of
    # the target while generating; top-K target log-probs stored per position (0 = labels only).
    sampled_answers: int = 0
    answer_temperature: float = 1.0
    gen_dtype: str = "bfloat16"
    topk_logprobs: int = 0
    # "vllm", or "hf" (transformers, for a machine without vLLM); ``device`` runs the hf engine,
    # the features and training (e.g. "cuda").
    gen_engine: str = "vllm"
    device: str = "cpu"
    # Training recipe (see radar_vllm.offline.head.trainer).
    train_dir: str | None = None
    draft_vocab_size: int = 8192
    ttt_steps: int = 3
    ttt_decay: float = 0.8
    soft_label_weight: float = 0.0
    learning_rate: float = 6e-4
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 50
    init_from_target: bool = False
    init_from_head: str | None = None
    train_dtype: str = "float32"
    batch_tokens: int = 4096
    max_seq_len: int = 1024
    epochs: float = 2.0
    max_steps: int | None = None
    budget_cpu_s: float | None = None
    budget_wall_s: float | None = None
    stop_after_s: float | None = None
    checkpoint_every: int = 100
    checkpoint_every_s: float | None = None
    snapshot_every: int = 0
    seed: int = 0
    threads: int | None = None


# Values a work directory recorded before a data key existed had the key's default.
_DATA_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(HeadTrainingConfig)
    if f.name in DATA_KEYS and f.default is not dataclasses.MISSING
}


def _prepare_work_dir(config: HeadTrainingConfig, tokenizer: Any) -> None:
    work_dir = Path(config.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / RUN_CONFIG_FILE
    current = dataclasses.asdict(config)
    if config_path.is_file():
        previous = json.loads(config_path.read_text())
        for key in DATA_KEYS:
            if previous.get(key, _DATA_DEFAULTS.get(key)) != current.get(key):
                raise ValueError(
                    f"{key}={current.get(key)!r} differs from {previous.get(key)!r} recorded in "
                    f"{config_path}; use a fresh --work-dir for different data settings"
                )
    prompts_path = work_dir / PROMPTS_FILE
    if prompts_path.is_file():
        existing = load_prompts(work_dir)
        if len(existing) == config.num_prompts:
            write_text_atomic(config_path, json.dumps(current, indent=2) + "\n")
            return
    selected = select_training_prompts(
        tokenizer, config.num_prompts, config.max_prompt_tokens, config.seed
    )
    if prompts_path.is_file():
        existing = load_prompts(work_dir)
        common = min(len(existing), len(selected))
        if [p.prompt_id for p in existing[:common]] != [p.prompt_id for p in selected[:common]]:
            raise ValueError(f"{prompts_path} does not match the prompt selection; use a fresh --work-dir")
        # Shards whose prompt count changed are regenerated.
        for index in range(num_shards(len(existing), config.shard_size)):
            path = answer_shard_path(work_dir, index)
            expected = len(selected[index * config.shard_size : (index + 1) * config.shard_size])
            if path.is_file() and len(read_jsonl(path)) != expected:
                path.unlink()
    save_prompts(work_dir, selected)
    write_text_atomic(config_path, json.dumps(current, indent=2) + "\n")
    logger.info("selected %d training prompts into %s", len(selected), prompts_path)


def run_pipeline(config: HeadTrainingConfig, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """Run the requested stages in order; returns a summary dict."""
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r}; expected one of {STAGES}")
    from transformers import AutoTokenizer

    from radar_vllm.offline.head.target import check_target

    target_info = check_target(config.target)
    if config.aux_layers is None:
        config.aux_layers = target_info.default_aux_layers()
    target_info.check_aux_layers(config.aux_layers)
    if config.output is not None:
        from radar_vllm.offline.head.trainer import check_output_dir

        check_output_dir(Path(config.output))  # refuse before any work is done
    # stop_after_s bounds the whole invocation: the data stages stop between shards, training
    # leaves with a checkpoint; running the same command again continues.
    deadline = time.time() + config.stop_after_s if config.stop_after_s else None
    tokenizer = AutoTokenizer.from_pretrained(config.target)
    _prepare_work_dir(config, tokenizer)
    work_dir = Path(config.work_dir)
    summary: dict[str, Any] = {"work_dir": str(work_dir)}
    if "generate" in stages:
        summary["answer_tokens_made"] = generate_answers(
            work_dir,
            config.target,
            shard_size=config.shard_size,
            max_new_tokens=config.max_new_tokens,
            max_num_seqs=config.gen_batch,
            seed=config.seed,
            sampled_answers=config.sampled_answers,
            temperature=config.answer_temperature,
            dtype=config.gen_dtype,
            deadline=deadline,
            engine=config.gen_engine,
            device=config.device,
        )
    if "features" in stages:
        from radar_vllm.offline.head.feature_cache import extract_features

        summary["feature_tokens_made"] = extract_features(work_dir, config, deadline=deadline)
    if "train" in stages:
        from radar_vllm.offline.head.trainer import train

        if deadline is not None and time.time() >= deadline:
            logger.info("stop_after_s=%s reached before training; rerun to continue", config.stop_after_s)
            return summary
        train_config = config
        if deadline is not None:
            train_config = dataclasses.replace(config, stop_after_s=max(1.0, deadline - time.time()))
        summary["train"] = train(work_dir, train_config, Path(config.train_dir) if config.train_dir else None)
    if deadline is not None and time.time() >= deadline and "train" not in summary:
        return summary
    if "export" in stages:
        from radar_vllm.offline.head.trainer import export_latest

        if config.output is None:
            raise ValueError("output=None; --output is required for the export stage")
        train_dir = Path(config.train_dir) if config.train_dir else work_dir
        summary["output"] = str(export_latest(train_dir, config, Path(config.output)))
    return summary
