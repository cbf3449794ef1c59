"""Benchmark the Triton kernels of radar_vllm against their torch references.

  * policy_step: fused stop-policy step vs the torch reference (batch 1..64).
  * tree_mask: bitmask/depth kernel vs the torch reference (60-node trees, batch 1..64).
  * tree_attention: paged tree attention vs the torch reference and vs PyTorch SDPA computing
    the same masked attention on a contiguous copy of the KV (Llama-3.1-8B attention shape:
    32 query heads, 8 KV heads, head dim 128, bf16; contexts 1k..8k; batch 1..64).

GPU mode (default, needs CUDA) times with CUDA events, eager and (for the Triton kernels and
capturable references) as CUDA-graph replays, which is how a decode loop runs them. ``--tiny``
runs tiny sizes on CPU with the Triton interpreter: it only checks that everything runs and
agrees. Prints a table and writes JSON (machine, versions, results) under benchmarks/results/.

    python benchmarks/bench_kernels.py            # on a GPU machine, about a minute
    python benchmarks/bench_kernels.py --tiny     # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench_kernels")

# Performance goals (GPU): microseconds per call, and the SDPA ratio for tree attention.
GOAL_POLICY_STEP_US = 10.0  # batch 64
GOAL_TREE_MASK_US = 5.0  # batch 64
GOAL_ATTENTION_VS_SDPA = 1.2


@dataclass(frozen=True)
class Sizes:
    policy_batches: tuple[int, ...]
    mask_batches: tuple[int, ...]
    tree_nodes: int
    tree_depth: int
    attention_batches: tuple[int, ...]
    attention_contexts: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype_name: str
    iters: int
    reference_iters: int


GPU_SIZES = Sizes(
    policy_batches=(1, 8, 64),
    mask_batches=(1, 8, 64),
    tree_nodes=60,
    tree_depth=7,
    attention_batches=(1, 8, 64),
    attention_contexts=(1024, 4096, 8192),
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    block_size=16,
    dtype_name="bfloat16",
    iters=50,
    reference_iters=3,
)

TINY_SIZES = Sizes(
    policy_batches=(1, 5),
    mask_batches=(1, 3),
    tree_nodes=12,
    tree_depth=4,
    attention_batches=(1, 2),
    attention_contexts=(40,),
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    block_size=16,
    dtype_name="float16",
    iters=2,
    reference_iters=1,
)


@dataclass
class Row:
    kernel: str
    config: str
    triton_us: float | None = None
    triton_graph_us: float | None = None
    reference_us: float | None = None
    reference_graph_us: float | None = None
    sdpa_us: float | None = None
    max_abs_err: float | None = None
    agrees: bool | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# timing


class Timer:
    """Per-call time in microseconds: CUDA events on a GPU, wall clock on CPU."""

    def __init__(self, torch_module: Any, device: Any) -> None:
        self.torch = torch_module
        self.device = device
        self.cuda = device.type == "cuda"

    def eager(self, fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
        torch = self.torch
        for _ in range(warmup):
            fn()
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - start) / iters * 1e6
        samples = []
        for _ in range(3):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            begin.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(begin.elapsed_time(end) * 1e3 / iters)
        return statistics.median(samples)

    def graph(self, fn: Callable[[], Any], calls: int, replays: int = 10) -> float | None:
        """Per-call time of ``calls`` back-to-back calls captured in one CUDA graph (None if the
        function cannot be captured, e.g. it synchronizes with the host)."""
        if not self.cuda:
            return None
        torch = self.torch
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
        except Exception as error:  # capture is optional: report and go on
            logger.info("graph capture failed: %s", str(error).splitlines()[0] if str(error) else type(error).__name__)
            torch.cuda.synchronize()
            return None
        graph.replay()
        torch.cuda.synchronize()
        samples = []
        for _ in range(3):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            samples.append(begin.elapsed_time(end) * 1e3 / (replays * calls))
        return statistics.median(samples)


# ----------------------------------------------------------------------------------------------
# benchmarks


def bench_policy_step(torch: Any, device: Any, sizes: Sizes, timer: Timer) -> list[Row]:
    from radar_vllm.kernels import force_backend, policy_step
    from radar_vllm.core.policy import StopPolicy

    torch.manual_seed(0)
    policy = StopPolicy().eval()
    weights = policy.packed_weights(device)
    rows = []
    for batch in sizes.policy_batches:
        g = torch.Generator(device="cpu").manual_seed(batch)
        state = policy.features(-torch.rand(batch, policy.config.state_size, generator=g) * 12).to(device)
        hidden0 = (torch.randn(batch, policy.config.lstm_hidden, generator=g) * 0.5).to(device)
        cell0 = torch.randn(batch, policy.config.lstm_hidden, generator=g).to(device)
        uniform = torch.rand(batch, generator=g).to(device)
        outputs = {}
        row = Row("policy_step", f"batch={batch} sampled")
        for backend in ("triton", "torch"):
            h, c = hidden0.clone(), cell0.clone()
            p = torch.empty(batch, device=device)
            flags = torch.empty(batch, dtype=torch.bool, device=device)

            def call() -> None:
                with force_backend(backend):
                    policy_step(state, h, c, weights, 0.5, uniform, p, flags)

            call()
            outputs[backend] = (h.clone(), p.clone())
            eager = timer.eager(call, sizes.iters)
            graphed = timer.graph(call, calls=20)
            if backend == "triton":
                row.triton_us, row.triton_graph_us = eager, graphed
            else:
                row.reference_us, row.reference_graph_us = eager, graphed
        err = max(float((a - b).abs().max()) for a, b in zip(outputs["triton"], outputs["torch"]))
        row.max_abs_err, row.agrees = err, err < 1e-4
        rows.append(row)
    return rows


def layered_parents(torch: Any, batch: int, num_nodes: int, max_depth: int, seed: int) -> Any:
    """Random trees shaped like draft trees: each node's parent is an earlier node of depth
    < max_depth (or the root), ``[batch, num_nodes]`` int32."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.empty(batch, num_nodes, dtype=torch.int32)
    for b in range(batch):
        depth = []
        for i in range(num_nodes):
            options = [-1] + [j for j in range(i) if depth[j] < max_depth]
            parent = options[int(torch.randint(len(options), (1,), generator=g))]
            parents[b, i] = parent
            depth.append(1 if parent < 0 else depth[parent] + 1)
    return parents


def bench_tree_mask(torch: Any, device: Any, sizes: Sizes, timer: Timer) -> list[Row]:
    from radar_vllm.kernels import TreeMask, force_backend, num_mask_words, tree_mask

    rows = []
    n = sizes.tree_nodes
    for batch in sizes.mask_batches:
        parents = layered_parents(torch, batch, n, sizes.tree_depth, seed=batch).to(device)
        num_nodes = torch.full((batch,), n, dtype=torch.int32, device=device)
        num_nodes[::2] = n - 3  # ragged
        row = Row("tree_mask", f"batch={batch} nodes={n} dense")
        results = {}
        for backend in ("triton", "torch"):
            out = TreeMask(
                torch.empty(batch, n, num_mask_words(n), dtype=torch.int64, device=device),
                torch.empty(batch, n, dtype=torch.int32, device=device),
                torch.empty(batch, n, n, dtype=torch.bool, device=device),
            )

            def call() -> None:
                with force_backend(backend):
                    tree_mask(parents, num_nodes, build_dense=True, out=out)

            call()
            results[backend] = out
            eager = timer.eager(call, sizes.iters)
            graphed = timer.graph(call, calls=20) if backend == "triton" else None  # the reference syncs
            if backend == "triton":
                row.triton_us, row.triton_graph_us = eager, graphed
            else:
                row.reference_us = eager
        row.agrees = all(torch.equal(a, b) for a, b in zip(results["triton"], results["torch"]))
        row.max_abs_err = 0.0 if row.agrees else float("nan")
        rows.append(row)
    return rows


def bench_tree_attention(torch: Any, device: Any, sizes: Sizes, timer: Timer) -> list[Row]:
    from radar_vllm.kernels import force_backend, tree_attention, tree_mask
    from radar_vllm.kernels.fixtures import TOLERANCES

    dtype = getattr(torch, sizes.dtype_name)
    n, heads, kv_heads = sizes.tree_nodes, sizes.num_heads, sizes.num_kv_heads
    dim, page = sizes.head_dim, sizes.block_size
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim)
    atol, rtol = TOLERANCES[dtype]
    rows = []
    for batch in sizes.attention_batches:
        parents = layered_parents(torch, batch, n, sizes.tree_depth, seed=100 + batch).to(device)
        counts = torch.full((batch,), n, dtype=torch.int32, device=device)
        mask = tree_mask(parents, counts, build_dense=True)
        for context in sizes.attention_contexts:
            seq = context + n
            blocks_per_request = -(-seq // page)
            g = torch.Generator(device=device).manual_seed(context + batch)
            total_blocks = batch * blocks_per_request + 1
            key_cache = torch.randn(total_blocks, page, kv_heads, dim, device=device, dtype=dtype, generator=g)
            value_cache = torch.randn(total_blocks, page, kv_heads, dim, device=device, dtype=dtype, generator=g)
            block_table = torch.randperm(total_blocks - 1, device=device, generator=g)[: batch * blocks_per_request]
            block_table = block_table.view(batch, blocks_per_request).to(torch.int32)
            context_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            cu = torch.arange(0, (batch + 1) * n, n, dtype=torch.int32, device=device)
            query = torch.randn(batch * n, heads, dim, device=device, dtype=dtype, generator=g)
            out = torch.empty_like(query)
            row = Row("tree_attention", f"batch={batch} ctx={context} nodes={n} {sizes.dtype_name}")

            def call(backend: str) -> Callable[[], None]:
                def run() -> None:
                    with force_backend(backend):
                        tree_attention(
                            query, key_cache, value_cache, block_table, context_lens, cu, mask.ancestor_bits,
                            scale, out=out, max_context_len=context,
                        )

                return run

            # SDPA on a contiguous copy: [batch, heads, seq, dim] with GQA heads expanded
            def contiguous(cache: Any) -> Any:
                flat = cache[block_table.long()].reshape(batch, blocks_per_request * page, kv_heads, dim)[:, :seq]
                return flat.permute(0, 2, 1, 3).repeat_interleave(group, dim=1).contiguous()

            keys, values = contiguous(key_cache), contiguous(value_cache)
            allowed = torch.cat(
                [torch.ones(batch, n, context, dtype=torch.bool, device=device), mask.dense_mask], dim=2
            ).unsqueeze(1)  # [batch, 1, nodes, seq]
            q4 = query.view(batch, n, heads, dim).transpose(1, 2).contiguous()  # [batch, heads, nodes, dim]

            def sdpa() -> Any:
                return torch.nn.functional.scaled_dot_product_attention(
                    q4, keys, values, attn_mask=allowed, scale=scale
                )

            expected = sdpa().transpose(1, 2).reshape(batch * n, heads, dim)
            call("triton")()
            err = float((out.float() - expected.float()).abs().max())
            row.max_abs_err = err
            row.agrees = bool(torch.allclose(out.float(), expected.float(), atol=atol, rtol=rtol))
            row.triton_us = timer.eager(call("triton"), sizes.iters)
            row.triton_graph_us = timer.graph(call("triton"), calls=5)
            row.sdpa_us = timer.eager(sdpa, sizes.iters)
            row.reference_us = timer.eager(call("torch"), sizes.reference_iters, warmup=1)
            rows.append(row)
            del keys, values, key_cache, value_cache
    return rows


# ----------------------------------------------------------------------------------------------
# reporting


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[Row]) -> None:
    header = (
        "kernel", "config", "triton us", "triton graph us", "ref us", "ref graph us", "sdpa us", "vs sdpa",
        "max err", "ok",
    )
    lines = [header]
    for r in rows:
        best = r.triton_graph_us if r.triton_graph_us is not None else r.triton_us
        ratio = None if (r.sdpa_us is None or best is None) else best / r.sdpa_us
        lines.append((
            r.kernel, r.config, fmt(r.triton_us), fmt(r.triton_graph_us), fmt(r.reference_us),
            fmt(r.reference_graph_us), fmt(r.sdpa_us), fmt(ratio, 2),
            "-" if r.max_abs_err is None else f"{r.max_abs_err:.2e}", str(r.agrees),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def goals(rows: list[Row]) -> dict[str, Any]:
    """The performance goals, judged on the largest batch (GPU mode only)."""
    def best(r: Row) -> float | None:
        return r.triton_graph_us if r.triton_graph_us is not None else r.triton_us

    report: dict[str, Any] = {}
    policy = [r for r in rows if r.kernel == "policy_step" and r.config.startswith("batch=64 ")]
    mask = [r for r in rows if r.kernel == "tree_mask" and r.config.startswith("batch=64 ")]
    if policy and best(policy[0]) is not None:
        report["policy_step_batch64_us"] = {"value": best(policy[0]), "goal": GOAL_POLICY_STEP_US,
                                            "met": best(policy[0]) < GOAL_POLICY_STEP_US}
    if mask and best(mask[0]) is not None:
        report["tree_mask_batch64_us"] = {"value": best(mask[0]), "goal": GOAL_TREE_MASK_US,
                                          "met": best(mask[0]) < GOAL_TREE_MASK_US}
    ratios = {r.config: best(r) / r.sdpa_us for r in rows if r.kernel == "tree_attention" and r.sdpa_us and best(r)}
    if ratios:
        report["tree_attention_vs_sdpa"] = {"ratios": ratios, "goal": GOAL_ATTENTION_VS_SDPA,
                                            "met": all(v <= GOAL_ATTENTION_VS_SDPA for v in ratios.values())}
    return report


def machine_info(torch: Any, device: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (Triton interpreter); a smoke run")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--only", choices=("policy_step", "tree_mask", "tree_attention"), action="append",
                        help="run only these kernels (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.tiny:
        # must be set before any Triton kernel is defined (they are imported lazily)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if args.tiny:
        device, sizes = torch.device("cpu"), TINY_SIZES
    else:
        if not torch.cuda.is_available():
            print("bench_kernels: GPU mode needs CUDA; use --tiny on CPU", file=sys.stderr)
            return 2
        device, sizes = torch.device("cuda"), GPU_SIZES
    timer = Timer(torch, device)
    selected = args.only or ["policy_step", "tree_mask", "tree_attention"]
    benches = {"policy_step": bench_policy_step, "tree_mask": bench_tree_mask, "tree_attention": bench_tree_attention}
    rows: list[Row] = []
    started = time.perf_counter()
    for name in selected:
        logger.info("benchmarking %s", name)
        rows.extend(benches[name](torch, device, sizes, timer))
    print_table(rows)
    info = machine_info(torch, device)
    report = {
        "mode": "tiny-cpu" if args.tiny else "gpu",
        "machine": info,
        "sizes": asdict(sizes),
        "results": [asdict(r) for r in rows],
        "goals": {} if args.tiny else goals(rows),
        "seconds": time.perf_counter() - started,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    output = args.output or RESULTS_DIR / f"bench_kernels_{'tiny_' if args.tiny else ''}{slug}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    if report["goals"]:
        for name, goal in report["goals"].items():
            print(f"goal {name}: {'met' if goal['met'] else 'NOT met'}")
    return 0 if all(r.agrees is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
