"""``radar-vllm collect``: record full-depth drafting rounds into round tables (offline RL data).

For each temperature, writes shards into ``OUT/T<temperature>/`` (see radar_vllm.offline.rl.table).
Prompts come from a prompt set and split (ShareGPT train by default; the held-out split is for
evaluation tables only), in a seeded random order; ``prompt_index`` is the position in that
order. Re-running the same command resumes: prompts already in complete shards are skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def temperature_dir(out: Path, temperature: float) -> Path:
    return out / f"T{temperature:g}"


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from radar_vllm.core.config import TreeConfig
    from radar_vllm.offline.prompts import load_prompt_set, tokenize_prompts
    from radar_vllm.offline.reference.record import collect_prompts, describe_versions
    from radar_vllm.offline.reference.decoder import ReferenceDecoder
    from radar_vllm.offline.reference.runners import directory_identity, load_head, load_target
    from radar_vllm.offline.rl.table import (
        COMPATIBILITY_KEYS,
        TableMetadata,
        check_compatible,
        read_shard_records,
        write_shard,
    )

    torch.set_num_threads(max(1, args.threads))
    if args.split == "heldout" and args.prompt_set == "sharegpt":
        logger.warning("collecting the ShareGPT held-out split: use it for evaluation only")
    tree_config = TreeConfig.for_mode(args.mode, args.max_depth, args.top_k, args.total_tokens)
    chain_state_size = args.chain_state_size if args.mode == "chain" else None
    dtype = getattr(torch, DTYPES[args.dtype])
    model_id, model_hash = directory_identity(args.target)
    head_id, head_hash = directory_identity(args.head)
    target = load_target(args.target, dtype=dtype, device=args.device)
    head = load_head(args.head, target, dtype=dtype, device=args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    eos = tokenizer.eos_token_id
    decoder = ReferenceDecoder(target, head, tree_config, chain_state_size=chain_state_size)

    prompts = load_prompt_set(args.prompt_set, args.split)
    excluded = read_excluded_prompt_ids(args.exclude_prompts or [])
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))
    permuted = [prompts[i] for i in order.tolist()]
    chosen = [p for p in permuted if p.prompt_id not in excluded][: args.num_prompts]
    num_excluded = sum(p.prompt_id in excluded for p in permuted)
    if excluded:
        print(f"excluding {num_excluded} prompts of this split listed in "
              f"{', '.join(args.exclude_prompts)}", file=sys.stderr)
    token_ids = tokenize_prompts(tokenizer, chosen)

    for temperature in args.temperatures:
        out = temperature_dir(Path(args.out), temperature)
        metadata = TableMetadata(
            model_id=model_id, model_hash=model_hash, head_id=head_id, head_hash=head_hash,
            temperature=temperature, mode=args.mode, top_k=tree_config.top_k,
            max_depth=tree_config.max_depth, total_tokens=tree_config.total_tokens,
            state_size=chain_state_size or tree_config.top_k, prompt_set=args.prompt_set,
            split=args.split,
            seed=args.seed, versions=describe_versions(),
            extra={"max_new_tokens": args.max_new_tokens,
                   "max_prompt_tokens": args.max_prompt_tokens, "dtype": args.dtype,
                   "device": str(args.device), "prompt_order": "torch.randperm(seed)",
                   "excluded_prompts": num_excluded},
        )
        done: set[int] = set()
        for record in read_shard_records(out):
            check_compatible(metadata.to_dict(), record["metadata"],
                             f"existing shards in {out} and this run", COMPATIBILITY_KEYS)
            shard = record.get("shard", {})
            check_shard_prompts(shard, chosen, out)
            done.update(int(i) for i in shard.get("prompt_positions", []))
        todo = [i for i in range(len(chosen)) if i not in done]
        bar = tqdm(total=len(chosen), initial=len(chosen) - len(todo),
                   desc=f"collect T={temperature:g}", file=sys.stderr)
        skipped = 0
        for start in range(0, len(todo), args.prompts_per_shard):
            positions = todo[start: start + args.prompts_per_shard]
            usable = [i for i in positions if len(token_ids[i]) <= args.max_prompt_tokens]
            skipped += len(positions) - len(usable)

            def progress(index: int, num_rounds: int) -> None:
                bar.update(1)
                bar.set_postfix(rounds=num_rounds)

            table = collect_prompts(decoder, [token_ids[i] for i in usable], usable,
                                    args.max_new_tokens, temperature, metadata, seed=args.seed,
                                    eos_token_id=eos, on_prompt=progress)
            bar.update(len(positions) - len(usable))
            write_shard(table, out, extra={
                "prompt_positions": positions,
                "prompt_ids": [chosen[i].prompt_id for i in usable],
                "skipped_too_long": [i for i in positions if i not in usable],
            })
        bar.close()
        print(f"T={temperature:g}: {out} ({len(todo)} prompts collected now, {len(done)} "
              f"before, {skipped} skipped as longer than {args.max_prompt_tokens} tokens)")
    return 0


def read_excluded_prompt_ids(paths: list[str]) -> set[str]:
    """Prompt ids listed in ``paths``: JSONL rows with a ``prompt_id`` field, or one id a line."""
    excluded: set[str] = set()
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ValueError(f"--exclude-prompts {path}: {error}") from error
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    excluded.add(str(json.loads(line)["prompt_id"]))
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(f"--exclude-prompts {path} line {number}: expected a JSON "
                                     f"object with a 'prompt_id' field ({error})") from error
            else:
                excluded.add(line)
    return excluded


def check_shard_prompts(shard: dict, chosen: list, out: Path) -> None:
    """Refuse to resume into shards whose prompts are not this run's prompts at the same
    positions (another seed, split or exclusion list would mix prompt selections)."""
    skipped = {int(i) for i in shard.get("skipped_too_long", [])}
    recorded = [int(i) for i in shard.get("prompt_positions", []) if int(i) not in skipped]
    for position, prompt_id in zip(recorded, shard.get("prompt_ids", [])):
        if position < len(chosen) and chosen[position].prompt_id != prompt_id:
            raise ValueError(
                f"existing shards in {out} hold prompt {prompt_id!r} at position {position}, "
                f"this run selects {chosen[position].prompt_id!r} there (another seed, split or "
                "--exclude-prompts list); use another --out")



def add_round_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The drafting-round shape options shared by ``collect`` and ``calibrate``."""
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--max-depth", type=int, default=7)
    parser.add_argument("--total-tokens", type=int, default=60)
    parser.add_argument("--mode", choices=["tree", "chain"], default="tree",
                        help="chain: top_k 1, the round sends the drafted chain, chain state")
    parser.add_argument("--chain-state-size", type=int, default=10,
                        help="chain mode: width of the policy state")

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "collect", help="record full-depth drafting rounds (states + exact acceptance laws of "
                        "every stop) with the reference decoder")
    parser.add_argument("--target", required=True, help="HF target model folder")
    parser.add_argument("--head", required=True, help="EAGLE-3 head folder")
    parser.add_argument("--out", required=True, help="output directory (T<temperature>/ inside)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--prompt-set", default="sharegpt",
                        choices=["sharegpt", "mtbench", "humaneval"])
    parser.add_argument("--split", default="train", choices=["train", "heldout"])
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--prompts-per-shard", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    add_round_shape_arguments(parser)
    parser.add_argument("--exclude-prompts", nargs="+", default=None, metavar="FILE",
                        help="skip these prompt ids (JSONL with 'prompt_id', or one id a line), "
                             "e.g. the prompts the EAGLE-3 head was trained on (train-head's "
                             "WORK/prompts.jsonl): rounds on them overstate the head's acceptance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.set_defaults(func=run)
