"""Offline acceptance of EAGLE-3 head snapshots on an evaluation prompt set (no vLLM at scoring).

Prepares once, in ``--eval-dir``, the target's greedy answers to the prompts and answers
sampled at T = 1 (vLLM, float32), and their features (HF), then replays chain decoding for each
head snapshot (see ``radar_vllm.offline.head.replay``): acceptance length per K at T = 0, first-draft
acceptance (acceptance length at K = 1 minus 1) at T = 0 and T = 1. Writes ``<out>.json`` / ``<out>.md``.

    python benchmarks/head_learning_curve.py --snapshots /work/runs/head-smollm2/snapshots
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from radar_vllm.offline.assets import ensure_smollm2


def _snapshot_order(path: Path) -> tuple[int, str]:
    suffix = path.name.split("-")[-1]
    return (int(suffix) if suffix.isdigit() else 0, path.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", required=True, help="folder of exported heads (step-N sub-folders)")
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--prompt-set", default="mtbench")
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--eval-dir", default="/work/runs/head-eval-mtbench-v2")
    parser.add_argument("--sampled-answers", type=int, default=1, help="answers sampled at T = 1 per prompt (T = 1 rows)")
    parser.add_argument("--ks", default="1,2,3,5,7")
    parser.add_argument("--out", default="benchmarks/results/head_smollm2_learning_curve")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    from radar_vllm.offline.head.replay import load_head_with_target_embeddings, prepare_eval_dir, replay_metrics
    from radar_vllm.offline.head.trainer import FeatureStore

    target = str(ensure_smollm2()) if args.target == "smollm2" else args.target
    heads = sorted((p for p in Path(args.snapshots).iterdir() if (p / "config.json").is_file()), key=_snapshot_order)
    if not heads:
        raise FileNotFoundError(f"no exported heads under {args.snapshots}")
    aux_layers = json.loads((heads[0] / "config.json").read_text())["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    eval_dir = Path(args.eval_dir)
    prepare_eval_dir(eval_dir, target, args.prompt_set, args.num_prompts, args.max_new_tokens, aux_layers,
                     sampled_answers=args.sampled_answers)
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
        if (cached and cached.get("steps") == record.get("steps") and cached.get("cpu_time_s") == record.get("cpu_time_s")
                and all(str(k) in cached["acceptance_length"] for k in ks)):
            rows.append(cached)
            continue
        head = load_head_with_target_embeddings(str(head_dir), target)
        metrics = replay_metrics(head, store, ks)
        rows.append({
            "head": str(head_dir), "steps": record.get("steps"), "tokens_seen": record.get("tokens_seen"),
            "cpu_time_s": record.get("cpu_time_s"),
            "training_data_tokens": (record.get("data") or {}).get("tokens"),
            "acceptance_length": metrics["acceptance_length_t0"],
            "first_draft_acceptance": metrics["first_draft_acceptance_t0"],
            "acceptance_length_t1": metrics.get("acceptance_length_t1"),
            "first_draft_acceptance_t1": metrics.get("first_draft_acceptance_t1"),
        })
        logging.info("%s: %s", head_dir.name, metrics)
    out.parent.mkdir(parents=True, exist_ok=True)
    num_greedy = sum(not ref.sampled for ref in store.sequences)
    summary = {"prompt_set": args.prompt_set, "num_prompts": num_greedy,
               "sampled_answers": len(store.sequences) - num_greedy,
               "max_new_tokens": args.max_new_tokens, "method": "offline greedy chain replay", "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    def fmt(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"# Offline chain acceptance vs training on {args.prompt_set} ({num_greedy} prompts)", "",
             "Acceptance length per K at T = 0 (greedy answers); first-draft acceptance at T = 0 and at T = 1 "
             "(answers sampled by the target, float32 head).", "",
             "| snapshot | steps | tokens seen | training data tokens | " + " | ".join(f"K={k}" for k in ks)
             + " | 1st draft T=0 | 1st draft T=1 | K=5 T=1 |",
             "|---|---|---|---|" + "---|" * len(ks) + "---|---|---|"]
    for row in rows:
        t1 = row.get("acceptance_length_t1") or {}
        lines.append(f"| {Path(row['head']).name} | {row['steps']} | {row['tokens_seen']} | {row['training_data_tokens']} | "
                     + " | ".join(f"{row['acceptance_length'][str(k)]:.3f}" for k in ks)
                     + f" | {fmt(row.get('first_draft_acceptance'))} | {fmt(row.get('first_draft_acceptance_t1'))}"
                     + f" | {fmt(t1.get('5'))} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
