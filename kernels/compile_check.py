"""Compile every Triton kernel for an NVIDIA architecture on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute but not that they pass
Triton's compiler (loop-carried types, early returns, layouts, register pressure). This module
runs each public launcher on small CPU tensors with the kernel launch intercepted, then compiles
the intercepted launch (same signature, constexprs and alignment specialisation as a real launch)
down to a cubin with the ``ptxas`` that ships with Triton, and reports registers, spills and
shared memory per kernel variant.

    python -m radar_vllm.kernels.compile_check            # sm_90 (H100/H200)
    python -m radar_vllm.kernels.compile_check --arch 80  # A100

Must run without ``TRITON_INTERPRET`` (the kernels have to be real JIT functions).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .dispatch import interpreter_enabled

WARP_SIZE = 32


@dataclass
class CompileReport:
    kernel: str
    variant: str
    seconds: float
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None


@dataclass
class _Launch:
    fn: Any
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def _intercept(functions: list[Any]) -> Iterator[list[_Launch]]:
    """Record launches of the given JIT functions instead of running them."""
    launches: list[_Launch] = []

    def recorder(fn: Any) -> Callable[..., None]:
        def run(*args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            launches.append(_Launch(fn, args, kwargs))

        return run

    for fn in functions:
        fn.run = recorder(fn)
    try:
        yield launches
    finally:
        for fn in functions:
            del fn.run  # back to the class method


def _ptxas_tool(name: str) -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, local-memory bytes) from ``cuobjdump -res-usage``."""
    tool = _ptxas_tool("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True).stdout

    def field(name: str) -> int | None:
        match = re.search(rf"{name}:(\d+)", text)
        return int(match.group(1)) if match else None

    return field("REG"), field("LOCAL")


def compile_launch(launch: _Launch, arch: int) -> tuple[float, Any]:
    """Compile one intercepted launch for ``sm_<arch>``; returns (seconds, compiled kernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, WARP_SIZE)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    started = time.perf_counter()
    source = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    return time.perf_counter() - started, compiled


def _variants() -> list[tuple[str, Callable[[], None], list[Any]]]:
    """(variant name, call of a Triton launcher on CPU tensors, the JIT functions it launches)."""
    from .policy_step import kernel as policy_kernel
    from .policy_step import pack_policy_weights
    from .fixtures import random_paged_kv, random_parents
    from .tree_attention import kernel as attention_kernel
    from .tree_mask import kernel as mask_kernel
    from .tree_mask import naive as mask_naive
    from .tree_mask.layout import num_mask_words

    g = torch.Generator().manual_seed(0)
    variants: list[tuple[str, Callable[[], None], list[Any]]] = []

    def policy(batch: int, sampled: bool, with_active: bool) -> Callable[[], None]:
        hidden, state_size, mlp = 128, 10, 128
        weights = pack_policy_weights(
            torch.randn(4 * hidden, state_size), torch.randn(4 * hidden, hidden), torch.randn(4 * hidden),
            torch.randn(4 * hidden), torch.randn(mlp, hidden + state_size), torch.randn(mlp),
            torch.randn(2, mlp), torch.randn(2),
        )

        def call() -> None:
            policy_kernel.policy_step_triton(
                torch.randn(batch, state_size), torch.zeros(batch, hidden), torch.zeros(batch, hidden), weights, 0.5,
                torch.rand(batch) if sampled else None, torch.empty(batch), torch.empty(batch, dtype=torch.bool),
                torch.ones(batch, dtype=torch.bool) if with_active else None,
            )

        return call

    variants.append(("policy_step sampled+active b64", policy(64, True, True), [policy_kernel._policy_step_kernel]))
    variants.append(("policy_step threshold b1", policy(1, False, False), [policy_kernel._policy_step_kernel]))

    def mask(max_nodes: int, dense: bool) -> Callable[[], None]:
        num_nodes = [max_nodes, max_nodes - 1]
        parents = random_parents(num_nodes, max_nodes, g)

        def call() -> None:
            bits = torch.empty(2, max_nodes, num_mask_words(max_nodes), dtype=torch.int64)
            depth = torch.empty(2, max_nodes, dtype=torch.int32)
            dense_mask = torch.empty(2, max_nodes, max_nodes, dtype=torch.bool) if dense else None
            mask_kernel.tree_mask_triton(parents, torch.tensor(num_nodes, dtype=torch.int32), bits, depth, dense_mask)

        return call

    variants.append(("tree_mask 60 nodes dense", mask(60, True), [mask_kernel._tree_mask_kernel]))
    variants.append(("tree_mask 256 nodes", mask(256, False), [mask_kernel._tree_mask_kernel]))

    def attention(dtype: torch.dtype, group: int, kv_heads: int, head_dim: int, page: int, splits: int):
        num_nodes, contexts = [60, 7], [100, 37]
        kv = random_paged_kv(contexts, num_nodes, kv_heads, head_dim, page, dtype, g)
        parents = random_parents(num_nodes, 60, g)
        bits = torch.empty(2, 60, 1, dtype=torch.int64)
        mask_naive.tree_mask_reference(parents, torch.tensor(num_nodes), bits, torch.empty(2, 60, dtype=torch.int32))
        query = torch.randn(sum(num_nodes), kv_heads * group, head_dim).to(dtype)

        def call() -> None:
            attention_kernel.tree_attention_triton(
                query, kv.key_cache, kv.value_cache, kv.block_table, kv.context_lens, kv.cu_num_nodes, bits,
                1 / math.sqrt(head_dim), torch.empty_like(query), num_splits=splits, max_context_len=100,
            )

        return call

    attention_fns = [attention_kernel._tree_attention_kernel, attention_kernel._merge_splits_kernel]
    variants.append(("tree_attention bf16 d128 gqa4 page16", attention(torch.bfloat16, 4, 8, 128, 16, 1), attention_fns))
    variants.append(("tree_attention bf16 d128 gqa4 split4", attention(torch.bfloat16, 4, 8, 128, 16, 4), attention_fns))
    variants.append(("tree_attention fp16 d64 gqa8 page32", attention(torch.float16, 8, 2, 64, 32, 1), attention_fns))
    variants.append(("tree_attention fp32 d64 gqa1", attention(torch.float32, 1, 4, 64, 16, 1), attention_fns))
    return variants


QUICK_VARIANTS = (
    "policy_step sampled+active b64",
    "tree_mask 60 nodes dense",
    "tree_attention bf16 d128 gqa4 split4",
    "tree_attention fp16 d64 gqa8 page32",
)


def compile_all(arch: int = 90, quick: bool = False) -> list[CompileReport]:
    """Compile every kernel variant (``quick``: one or two per kernel) for ``sm_<arch>``;
    raises on the first compiler error."""
    if interpreter_enabled():
        raise RuntimeError("compile_check needs real JIT kernels: run it without TRITON_INTERPRET")
    reports = []
    for variant, call, functions in _variants():
        if quick and variant not in QUICK_VARIANTS:
            continue
        with _intercept(functions) as launches:
            call()
        for launch in launches:
            seconds, compiled = compile_launch(launch, arch)
            registers, spills = _resource_usage(compiled.asm["cubin"])
            shared = compiled.metadata.shared  # dynamic shared memory of the launch
            reports.append(CompileReport(launch.fn.__name__, variant, seconds, registers, spills, shared))
    return reports


def ptxas_available() -> bool:
    """True when Triton's NVIDIA backend and a ``ptxas`` are present (no GPU needed)."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return _ptxas_tool("ptxas") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the Triton kernels for an NVIDIA GPU without one.")
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = sm_90)")
    parser.add_argument("--quick", action="store_true", help="only the variants in QUICK_VARIANTS")
    parser.add_argument("--json", type=Path, default=None, help="also write the reports to this JSON file")
    args = parser.parse_args(argv)
    reports = compile_all(args.arch, quick=args.quick)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=2) + "\n", encoding="utf-8")
    print(f"{'kernel':<24} {'variant':<40} {'regs':>5} {'spill B':>8} {'shared B':>9} {'compile s':>10}")
    for r in reports:
        print(f"{r.kernel:<24} {r.variant:<40} {r.registers!s:>5} {r.spill_bytes!s:>8} {r.shared_bytes!s:>9} "
              f"{r.seconds:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
