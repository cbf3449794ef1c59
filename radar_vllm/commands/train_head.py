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
    parser.add_argument("--sampled-answers", type=int,
                        help="answers sampled per prompt at --answer-temperature besides the greedy one (data setting)")
    parser.add_argument("--answer-temperature", type=float)
    parser.add_argument("--gen-dtype", choices=("bfloat16", "float32"), help="dtype of the target while generating")
    parser.add_argument("--gen-engine", choices=("vllm", "hf"),
                        help="generate answers with vLLM (default) or transformers (machines without vLLM; data setting)")
    parser.add_argument("--device", help="torch device for the hf engine, the features and training (default cpu; "
                        "e.g. cuda)")
    parser.add_argument("--topk-logprobs", type=int,
                        help="store the target's top-K next-token log-probs per position (needed by --soft-label-weight)")
    parser.add_argument("--train-dir", help="checkpoints, draft vocabulary and head export go here (default: --work-dir)")
    parser.add_argument("--draft-vocab-size", type=int)
    parser.add_argument("--ttt-steps", type=int, help="training-time-test draft steps")
    parser.add_argument("--ttt-decay", type=float, help="loss weight of step j is decay**j")
    parser.add_argument("--soft-label-weight", type=float,
                        help="weight of the distillation loss against the target's top-K distribution (0 = argmax only)")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--lr-schedule", choices=("cosine", "constant"))
    parser.add_argument("--min-lr-ratio", type=float, help="cosine schedule ends at this fraction of the peak")
    parser.add_argument("--adam-beta1", type=float)
    parser.add_argument("--adam-beta2", type=float)
    parser.add_argument("--grad-clip", type=float, help="max gradient norm (0 = no clipping)")
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--init-from-target", action="store_true", default=None,
                        help="initialise the draft layer from the target's last decoder layer")
    parser.add_argument("--init-from-head",
                        help="start from this exported head (weights and draft vocabulary), e.g. the shipped one")
    parser.add_argument("--train-dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--batch-tokens", type=int)
    parser.add_argument("--max-seq-len", type=int)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--budget-cpu-s", type=float,
                        help="stop when training has used this many process CPU seconds (over all resumes); "
                        "the lr schedule then follows the CPU time spent")
    parser.add_argument("--budget-wall-s", type=float,
                        help="like --budget-cpu-s in wall seconds (training on an accelerator)")
    parser.add_argument("--stop-after-s", type=float,
                        help="checkpoint and exit after this many wall seconds of training in this invocation; "
                        "rerun the same command to continue")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    parser.add_argument("--checkpoint-every-s", type=float, help="also checkpoint after this many wall seconds")
    parser.add_argument("--snapshot-every", type=int,
                        help="keep an exported head under <train dir>/snapshots/step-N every N steps (0 = off)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.set_defaults(func=run)
