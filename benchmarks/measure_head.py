"""Measure a shipped EAGLE-3 head with stock vLLM: greedy chain drafting at several K.

For each K a fresh engine with ``"method": "eagle3"`` generates greedy answers to the chosen
prompts; mean acceptance length is vLLM's own ``1 + accepted / drafts`` from its counters. A
no-speculation engine in the same run gives the reference outputs and tokens/s. Results go to
``<out>.json`` and ``<out>.md``.

    python benchmarks/measure_head.py --prompt-set mtbench --num-prompts 40 --ks 1,3,5
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

from radar_vllm.offline.assets import CHECKPOINTS_DIR, SMOLLM2_HEAD_DIRNAME, ensure_smollm2
from radar_vllm.offline.prompts import load_prompt_set, tokenize_prompts

logger = logging.getLogger(__name__)


def _engine(target: str, max_model_len: int, max_num_seqs: int, head: str | None, k: int) -> Any:
    from radar_vllm.offline.generate import make_llm

    kwargs: dict[str, Any] = {"disable_log_stats": False}
    if head is not None:
        kwargs["speculative_config"] = {"method": "eagle3", "model": head, "num_speculative_tokens": k}
    return make_llm(target, max_model_len=max_model_len, max_num_seqs=max_num_seqs, **kwargs)


def _measure(
    target: str, head: str | None, k: int, prompts: list[list[int]], args: argparse.Namespace
) -> dict[str, Any]:
    from radar_vllm.offline.generate import spec_decode_counters, timed_greedy_run

    max_model_len = max(len(p) for p in prompts) + args.max_new_tokens + 16
    started = time.perf_counter()
    llm = _engine(target, max_model_len, max(len(prompts), 1), head, k)
    startup = time.perf_counter() - started
    batched = timed_greedy_run(llm, prompts, args.max_new_tokens, batch_size=len(prompts))
    counters = spec_decode_counters(llm) if head is not None else None
    single = timed_greedy_run(llm, prompts[: args.batch1_prompts], args.max_new_tokens, batch_size=1)
    del llm
    gc.collect()
    result: dict[str, Any] = {
        "k": k if head is not None else 0,
        "engine_startup_s": startup,
        "batched": {key: batched[key] for key in ("tokens", "seconds", "tokens_per_s")},
        "batch1": {key: single[key] for key in ("tokens", "seconds", "tokens_per_s")},
        "outputs": batched["outputs"],
    }
    if counters is not None:
        drafts = counters["num_drafts"]
        result["counters"] = counters
        result["mean_acceptance_length"] = 1.0 + counters["num_accepted_tokens"] / drafts if drafts else None
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default=str(CHECKPOINTS_DIR / SMOLLM2_HEAD_DIRNAME))
    parser.add_argument("--target", default="smollm2", help="target HF folder or 'smollm2'")
    parser.add_argument("--prompt-set", default="mtbench", choices=["mtbench", "humaneval", "sharegpt"])
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--ks", default="1,3,5")
    parser.add_argument("--batch1-prompts", type=int, default=4, help="prompts timed one at a time")
    parser.add_argument("--out", default="benchmarks/results/head_smollm2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    from transformers import AutoTokenizer

    target = str(ensure_smollm2()) if args.target == "smollm2" else args.target
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompt_set = load_prompt_set(args.prompt_set, split="heldout")[: args.num_prompts]
    prompts = tokenize_prompts(tokenizer, prompt_set)
    ks = [int(k) for k in args.ks.split(",") if k.strip()]

    baseline = _measure(target, None, 0, prompts, args)
    runs = []
    for k in ks:
        run = _measure(target, args.head, k, prompts, args)
        same = sum(a == b for a, b in zip(run["outputs"], baseline["outputs"]))
        run["outputs_identical_to_baseline"] = f"{same}/{len(prompts)}"
        run["speedup_batched"] = run["batched"]["tokens_per_s"] / baseline["batched"]["tokens_per_s"]
        run["speedup_batch1"] = run["batch1"]["tokens_per_s"] / baseline["batch1"]["tokens_per_s"]
        runs.append(run)
    for run in [baseline] + runs:
        run.pop("outputs")

    record_path = Path(args.head) / "training_record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    summary = {
        "head": args.head,
        "target": target,
        "prompt_set": args.prompt_set,
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch1_prompts": min(args.batch1_prompts, len(prompts)),
        "greedy": True,
        "machine": f"{platform.machine()} CPU, vLLM CPU build",
        "head_training": {key: record.get(key) for key in ("steps", "tokens_seen", "wall_time_s", "data")},
        "baseline": baseline,
        "eagle3_chain": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# EAGLE-3 chain with {Path(args.head).name} on {args.prompt_set} ({len(prompts)} prompts, greedy)",
        "",
        f"Stock vLLM (CPU build), {args.max_new_tokens} new tokens; batched = all prompts at once, "
        f"batch 1 = first {summary['batch1_prompts']} prompts one at a time.",
        "",
        "| K | mean acceptance length | tok/s batched | speed-up batched | tok/s batch 1 | speed-up batch 1 | outputs identical |",
        "|---|---|---|---|---|---|---|",
        f"| none | - | {baseline['batched']['tokens_per_s']:.1f} | 1.00 | {baseline['batch1']['tokens_per_s']:.1f} | 1.00 | - |",
    ]
    for run in runs:
        mal = run.get("mean_acceptance_length")
        lines.append(
            f"| {run['k']} | {mal:.3f} | {run['batched']['tokens_per_s']:.1f} | {run['speedup_batched']:.2f} | "
            f"{run['batch1']['tokens_per_s']:.1f} | {run['speedup_batch1']:.2f} | {run['outputs_identical_to_baseline']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
