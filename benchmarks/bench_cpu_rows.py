"""Time of the target's matrix products as a function of the rows in a step, as a vLLM CPU worker runs them.

    python benchmarks/bench_cpu_rows.py --out benchmarks/results/cpu_rows_smollm2

A decode step of batch B with K drafts per request multiplies B x (K + 1) rows through every
linear layer. On the CPU build these products go through vLLM's oneDNN wrapper
(``vllm._custom_ops.create_onednn_mm`` / ``onednn_mm``, as ``dispatch_cpu_unquantized_gemm``
sets them up for float32 weights), and their time is not monotone in the rows: the kernel oneDNN
picks depends on the row count. This script builds layers of SmolLM2-135M's shapes (30 layers of
q/k/v, o, gate/up and down projections, plus the tied 49,152-token LM head) with random weights
(every layer its own weights: the whole model does not fit in cache, as in the engine), runs one
OpenMP thread pinned to one core with the settings vLLM's CPU worker uses, and times the 30 layers
and the LM head for each row count. Each row count is measured ``--repeats`` times, interleaved;
the median and the range are reported. It needs the CPU build of vLLM; run it on a quiet machine.
The worker environment must be set before the OpenMP runtime loads, so the script re-executes
itself with it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, KV_HEADS_DIM = 576, 1536, 30, 49152, 192
SHAPES = [(HIDDEN + 2 * KV_HEADS_DIM, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
WORKER_ENV = {"OMP_NUM_THREADS": "1", "KMP_AFFINITY": "granularity=fine,explicit,proclist=[0]",
              "KMP_BLOCKTIME": "5", "KMP_TPAUSE": "0"}  # as vLLM's CPU worker sets them for one core


def measure(rows: list[int], repeats: int, inner: int) -> dict[int, dict[str, list[float]]]:
    import torch
    from vllm import _custom_ops as ops

    torch.manual_seed(0)
    layers = [[ops.create_onednn_mm(torch.randn(*shape).t(), 32) for shape in SHAPES] for _ in range(LAYERS)]
    head = ops.create_onednn_mm(torch.randn(VOCAB, HIDDEN).t(), 32)
    out: dict[int, dict[str, list[float]]] = {m: {"layers_ms": [], "head_ms": []} for m in rows}
    inputs = {m: ([torch.randn(m, shape[1]) for shape in SHAPES], torch.randn(m, HIDDEN)) for m in rows}
    for repeat in range(repeats + 1):  # the first pass warms every row count up and is dropped
        for m in rows:
            xs, x_head = inputs[m]
            start = time.perf_counter()
            for _ in range(inner):
                for handlers in layers:
                    for handler, x in zip(handlers, xs):
                        ops.onednn_mm(handler, x, None)
            layers_ms = 1000 * (time.perf_counter() - start) / inner
            start = time.perf_counter()
            for _ in range(inner):
                ops.onednn_mm(head, x_head, None)
            head_ms = 1000 * (time.perf_counter() - start) / inner
            if repeat:
                out[m]["layers_ms"].append(layers_ms)
                out[m]["head_ms"].append(head_ms)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,5,6,8,12,16,24,32,48,64,96,128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=4, help="passes over the model per measurement")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args()
    if any(os.environ.get(k) != v for k, v in WORKER_ENV.items()):
        from radar_vllm.bench.harness import preload_intel_openmp

        os.execve(sys.executable, [sys.executable, *sys.argv], preload_intel_openmp(dict(os.environ, **WORKER_ENV)))
    rows = [int(r) for r in args.rows.split(",")]
    results = measure(rows, args.repeats, args.inner)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    one = statistics.median(results[1]["layers_ms"]) + statistics.median(results[1]["head_ms"]) if 1 in results else None
    lines = [f"# Target matrix products vs rows per step (SmolLM2-135M shapes, float32, vLLM oneDNN, 1 core; {machine})",
             "", f"Command: `python benchmarks/bench_cpu_rows.py --rows {args.rows} --repeats {args.repeats} "
             f"--inner {args.inner} --out {args.out}`", "",
             "rows = requests x (1 + drafts) in one step; ms = median [min-max] over repeats; per row = total / rows; "
             "vs 1 row = total / total at 1 row (a plain batch-1 decode step).", "",
             "| rows | 30 layers ms | LM head ms | total ms | ms per row | vs 1 row |", "|---|---|---|---|---|---|"]
    for m in rows:
        layer, head = results[m]["layers_ms"], results[m]["head_ms"]
        total = statistics.median(layer) + statistics.median(head)
        lines.append(f"| {m} | {statistics.median(layer):.1f} [{min(layer):.1f}-{max(layer):.1f}] | "
                     f"{statistics.median(head):.2f} | {total:.1f} | {total / m:.2f} | "
                     + (f"{total / one:.2f}x |" if one else "– |"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                                         "results": results}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
