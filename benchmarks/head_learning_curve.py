"""Offline acceptance of EAGLE-3 head snapshots on an evaluation prompt set (no vLLM at scoring).

Prepares once, in ``--eval-dir``, the target's greedy answers to the prompts (vLLM) and their
features (HF), then replays greedy chain decoding for each head snapshot (see
``radar_vllm.offline.head.replay``) and writes ``<out>.json`` / ``<out>.md``.

    python benchmarks/head_learning_curve.py --snapshots /work/runs/head-smollm2/snapshots
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from radar_vllm.offline.assets import ensure_smollm2
from radar_vllm.offline.prompts import load_prompt_set, tokenize_prompts


@dataclasses.dataclass
class _EvalConfig:
    target: str
    aux_layers: list[int]
    max_seq_len: int


def prepare(eval_dir: Path, target: str, prompt_set: str, num_prompts: int, max_new_tokens: int,
            aux_layers: list[int]) -> None:
    from transformers import AutoTokenizer

    from radar_vllm.offline.head.data import PromptRecord, generate_answers, save_prompts
    from radar_vllm.offline.head.feature_cache import extract_features

    eval_dir.mkdir(parents=True, exist_ok=True)
    if not (eval_dir / "prompts.jsonl").is_file():
        tokenizer = AutoTokenizer.from_pretrained(target)
        prompts = load_prompt_set(prompt_set, split="heldout")[:num_prompts]
        save_prompts(eval_dir, [PromptRecord(p.prompt_id, ids) for p, ids in zip(prompts, tokenize_prompts(tokenizer, prompts))])
    generate_answers(eval_dir, target, shard_size=10_000, max_new_tokens=max_new_tokens, max_num_seqs=num_prompts)
    extract_features(eval_dir, _EvalConfig(target, aux_layers, max_seq_len=100_000))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", required=True, help="folder of exported heads (step-N sub-folders)")
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--prompt-set", default="mtbench")
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--eval-dir", default="/work/runs/head-eval-mtbench")
    parser.add_argument("--ks", default="1,2,3,5,7")
    parser.add_argument("--out", default="benchmarks/results/head_smollm2_learning_curve")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    from radar_vllm.offline.head.replay import load_head_with_target_embeddings, simulate_chain_acceptance
    from radar_vllm.offline.head.trainer import FeatureStore

    target = str(ensure_smollm2()) if args.target == "smollm2" else args.target
    heads = sorted((p for p in Path(args.snapshots).iterdir() if (p / "config.json").is_file()),
                   key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else 0)
    if not heads:
        raise FileNotFoundError(f"no exported heads under {args.snapshots}")
    aux_layers = json.loads((heads[0] / "config.json").read_text())["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    eval_dir = Path(args.eval_dir)
    prepare(eval_dir, target, args.prompt_set, args.num_prompts, args.max_new_tokens, aux_layers)
    store = FeatureStore(eval_dir, max_seq_len=100_000)
    ks = [int(k) for k in args.ks.split(",")]
    out = Path(args.out)
    previous: dict[str, dict] = {}
    if out.with_suffix(".json").is_file():  # reuse rows of unchanged snapshots
        old = json.loads(out.with_suffix(".json").read_text())
        if old.get("prompt_set") == args.prompt_set and old.get("max_new_tokens") == args.max_new_tokens:
            previous = {row["head"]: row for row in old.get("rows", [])}
    rows = []
    for head_dir in heads:
        record_path = head_dir / "training_record.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        cached = previous.get(str(head_dir))
        if cached and cached.get("steps") == record.get("steps") and all(str(k) in cached["acceptance_length"] for k in ks):
            rows.append(cached)
            continue
        head = load_head_with_target_embeddings(str(head_dir), target)
        acceptance = simulate_chain_acceptance(head, store, ks)
        rows.append({
            "head": str(head_dir), "steps": record.get("steps"), "tokens_seen": record.get("tokens_seen"),
            "training_data_tokens": (record.get("data") or {}).get("tokens"),
            "acceptance_length": {str(k): v for k, v in acceptance.items()},
        })
        logging.info("%s: %s", head_dir.name, acceptance)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"prompt_set": args.prompt_set, "num_prompts": len(store.sequences),
               "max_new_tokens": args.max_new_tokens, "method": "offline greedy chain replay", "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# Offline chain acceptance vs training on {args.prompt_set} ({len(store.sequences)} prompts, greedy)", "",
             "| snapshot | steps | tokens seen | training data tokens | " + " | ".join(f"K={k}" for k in ks) + " |",
             "|---|---|---|---|" + "---|" * len(ks)]
    for row in rows:
        lines.append(f"| {Path(row['head']).name} | {row['steps']} | {row['tokens_seen']} | {row['training_data_tokens']} | "
                     + " | ".join(f"{row['acceptance_length'][str(k)]:.3f}" for k in ks) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
