"""``radar-vllm train-head``: train an EAGLE-3 head for a Llama target (resumable)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging


def run(args: argparse.Namespace) -> int:
    import torch

    from radar_vllm.offline.head.pipeline import STAGES, HeadTrainingConfig, run_pipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    target = args.target
    if target == "smollm2":
        from radar_vllm.offline.assets import ensure_smollm2

        target = str(ensure_smollm2())
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {f.name for f in dataclasses.fields(HeadTrainingConfig)}
    values = {key: value for key, value in vars(args).items() if key in fields and value is not None}
    values["target"] = target
    config = HeadTrainingConfig(**values)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"--stages contains {unknown}; expected names from {STAGES}")
    summary = run_pipeline(config, stages)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-head",
        help="train an EAGLE-3 draft head for a Llama target (rerun the same command to resume)",
    )
    parser.add_argument("--target", required=True, help="target HF folder, or 'smollm2' for the converted SmolLM2")
    parser.add_argument("--work-dir", required=True, help="data, features and checkpoints go here")
    parser.add_argument("--output", help="exported vLLM EAGLE-3 checkpoint folder (must be new or a previous export)")
    parser.add_argument("--stages", default="generate,features,train,export")
    parser.add_argument("--num-prompts", type=int)
    parser.add_argument("--max-prompt-tokens", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--shard-size", type=int)
    parser.add_argument("--gen-batch", type=int)
    parser.add_argument("--aux-layers", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--draft-vocab-size", type=int)
    parser.add_argument("--ttt-steps", type=int)
    parser.add_argument("--ttt-decay", type=float)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--batch-tokens", type=int)
    parser.add_argument("--max-seq-len", type=int)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.set_defaults(func=run)
