"""``radar-vllm calibrate-gate``: measure a RADAR checkpoint's depth gate at every batch size on
this machine and write a gate-cost table (JSON) that engines start their gate from
(``"radar": {"gate_costs": PATH}``; see :mod:`radar_vllm.offline.gate_calibration`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from radar_vllm.core.draft_gate import load_gate_table, save_gate_table
    from radar_vllm.offline.assets import ensure_smollm2
    from radar_vllm.offline.gate_calibration import (
        batch_sizes_up_to, calibrate_gate, gate_table_markdown, merge_gate_tables, passes_for)
    from radar_vllm.offline.prompts import load_prompt_set, tokenize_prompts

    if args.context_tokens < 2:
        raise ValueError(f"context_tokens must be >= 2, got {args.context_tokens}")
    checkpoint = Path(args.checkpoint)
    head_config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    if "radar" not in head_config:
        raise ValueError(f"{checkpoint} has no \"radar\" section in config.json: pass a RADAR checkpoint")
    target = args.target or ensure_smollm2(progress=False)
    sizes = batch_sizes_up_to(args.max_batch_size)
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = [ids[: args.context_tokens]
               for ids in tokenize_prompts(tokenizer, load_prompt_set(args.prompt_set, "train")[: max(sizes) * 2])]
    table = calibrate_gate(checkpoint, target, prompts, sizes, tokens=args.tokens,
                           passes=passes_for(args.rounds, args.tokens), dtype=args.dtype,
                           max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                           mode=args.mode or None, metadata={"prompt_set": args.prompt_set, "context_tokens": args.context_tokens,
                                     "note": args.note})
    if Path(args.out).exists():  # keep the other mode's section of the same engine
        table = merge_gate_tables(load_gate_table(args.out), table)
    path = save_gate_table(table, args.out)
    print(gate_table_markdown(table, str(path)))
    print(f"wrote {path}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate-gate", help="measure the depth gate at every batch size and write a gate-cost table")
    parser.add_argument("--checkpoint", required=True, help="RADAR checkpoint folder")
    parser.add_argument("--target", default="", help="target model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", required=True, help="gate-cost table JSON to write")
    parser.add_argument("--max-batch-size", type=int, default=64,
                        help="measure batch sizes 1, 2, 4, ... up to this (the engine's max_num_seqs)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request (ignore_eos)")
    parser.add_argument("--rounds", type=int, default=256, help="engine steps per batch size, about")
    parser.add_argument("--mode", choices=["chain", "tree"], default="",
                        help="the mode to measure (default: the checkpoint's); a table holds both")
    parser.add_argument("--dtype", default="float32", help="model dtype (the engines that use the table's)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--context-tokens", type=int, default=256, help="prompts cut to this many tokens")
    parser.add_argument("--prompt-set", default="sharegpt", choices=["sharegpt", "mtbench", "humaneval"])
    parser.add_argument("--enforce-eager", action="store_true", help="time eager engines (default: compiled)")
    parser.add_argument("--note", default="", help="free text kept in the table (e.g. machine load)")
    parser.set_defaults(func=run)
