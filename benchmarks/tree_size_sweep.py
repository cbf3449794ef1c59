"""Tree mode inside vLLM at several tree sizes (total_tokens) against no speculation, same run.

    python benchmarks/tree_size_sweep.py                       # shipped checkpoint, SmolLM2, 60/24/12/8
    python benchmarks/tree_size_sweep.py --sizes 60,12 --repeats 1

For each tree size, one `benchmarks/main_job.py` run (``--methods none,radar-tree``, the size set
through ``RADAR_OVERRIDES``) on the same MT-Bench prompts at batch 1, greedy; every run measures
its own no-speculation baseline, so each ratio comes from one run. Repeats give the median and
spread of the ratio. Writes ``benchmarks/results/tree_size_sweep_smollm2.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH_ENV = "RADAR_TREE_SCRATCH_BLOCKS"  # radar_vllm.vllm.scratch: 0 = recompute one node per kernel call
RESULTS = ROOT / "benchmarks" / "results"


def run_once(size: int, args: argparse.Namespace, out: Path, scratch: bool = True) -> dict:
    env = dict(os.environ, RADAR_OVERRIDES=json.dumps({"total_tokens": size}))
    if not scratch:
        env[SCRATCH_ENV] = "0"
    command = [sys.executable, str(ROOT / "benchmarks" / "main_job.py"), "--methods", "none,radar-tree",
               "--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens),
               "--max-num-seqs", "1", "--json", str(out)]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    none, tree = results["none"], results["radar-tree"]
    return {
        "total_tokens": size,
        "scratch_blocks": scratch,
        "none_tokens_per_s": none["tokens_per_s"],
        "tree_tokens_per_s": tree["tokens_per_s"],
        "ratio": tree["tokens_per_s"] / none["tokens_per_s"],
        "mean_acceptance_length": tree["mean_acceptance_length"],
        "draft_calls_per_round": tree["draft_calls_per_round"],
        "mean_tree_size": tree["mean_tree_size"],
        "outputs_match": tree["outputs_match"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="60,24,12,8", help="comma-separated total_tokens values")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-scratch-sizes", default="60",
                        help="sizes also run without scratch blocks (the one-node-per-kernel-call path), for comparison")
    parser.add_argument("--tag", default="smollm2")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    variants = [(size, True) for size in sizes]
    variants += [(int(s), False) for s in args.no_scratch_sizes.split(",") if s.strip()]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for size, scratch in variants:
                record = run_once(size, args, Path(tmp) / f"{size}_{scratch}_{repeat}.json", scratch)
                record["repeat"] = repeat
                runs.append(record)
                print(f"total_tokens {size} scratch {scratch} repeat {repeat}: tree {record['tree_tokens_per_s']:.1f} tok/s, "
                      f"none {record['none_tokens_per_s']:.1f}, ratio {record['ratio']:.3f}, "
                      f"acceptance {record['mean_acceptance_length']:.2f}", flush=True)
    lines = [
        f"# Tree mode in vLLM by tree size ({args.num_prompts} MT-Bench prompts, {args.max_tokens} tokens, batch 1, "
        "greedy, bf16)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"command: `python benchmarks/tree_size_sweep.py --sizes {args.sizes} --no-scratch-sizes "
        f"{args.no_scratch_sizes} --repeats {args.repeats}`. "
        "Ratio = tree tokens/s over no-speculation tokens/s measured in the same run; median [min, max] over "
        "repeats. Output match is against no speculation (bf16: stock EAGLE-3 itself differs on some prompts, "
        "see greedy_equality_smollm2.md).",
        "",
        "| total_tokens | scratch blocks | tree / no-spec | tree tokens/s | mean acceptance length "
        "| draft calls per round | mean tree size | outputs match |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for size, scratch in variants:
        rows = [r for r in runs if r["total_tokens"] == size and r["scratch_blocks"] == scratch]
        ratios = [r["ratio"] for r in rows]
        lines.append(
            f"| {size} | {'yes' if scratch else 'no'} | {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] | "
            f"{statistics.median(r['tree_tokens_per_s'] for r in rows):.1f} | "
            f"{statistics.median(r['mean_acceptance_length'] for r in rows):.2f} | "
            f"{statistics.median(r['draft_calls_per_round'] for r in rows):.2f} | "
            f"{statistics.median(r['mean_tree_size'] for r in rows):.1f} | {rows[-1]['outputs_match']} |")
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"tree_size_sweep_{args.tag}.md").write_text(table)
    (RESULTS / f"tree_size_sweep_{args.tag}.json").write_text(json.dumps(
        {"args": vars(args), "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
         "runs": runs}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
