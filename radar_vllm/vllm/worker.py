"""RADAR's worker and model-runner classes: vLLM's own, with the drafter swapped for RadarProposer.

Selected through vLLM's ``worker_cls`` setting by the engine plan
(:func:`radar_vllm.vllm.engine_plan.plan_engine`). The runner subclasses install the proposer
before the model is loaded, so ``load_model`` loads the head into it and warm-up runs through it.
In tree mode the CPU worker builds :class:`radar_vllm.vllm.tree_runner.RadarTreeCPUModelRunner`
(tree verification, KV compaction) instead.

- CPU: ``CPUWorker.init_device`` constructs its runner from the module-level name
  ``CPUModelRunner``; :class:`RadarCPUWorker` rebinds that name around the call.
- CUDA: :class:`RadarGPUWorker` overrides ``Worker._make_model_runner``, vLLM's own hook.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner, _torch_cuda_wrapper
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from radar_vllm.vllm.engine_plan import engine_plan
from radar_vllm.vllm.proposer import RadarProposer

logger = logging.getLogger(__name__)


def install_radar_drafter(runner: Any) -> None:
    """Replace the runner's stock EAGLE proposer by a RadarProposer (before ``load_model``)."""
    if not hasattr(runner, "drafter"):
        return  # not the last pipeline stage: no drafter here
    runner.drafter = RadarProposer(runner.vllm_config, runner.device, runner, engine_plan(runner.vllm_config))
    logger.info("RADAR proposer installed in %s", type(runner).__name__)


# sha256 of inspect.getsource(GPUModelRunner.<method>) in the vLLM release the overrides below
# follow (``_sample``'s signature)
UPSTREAM_SHA256 = {"_sample": "5cb5c1da02cfdc689acb7bab51ca7eb56e2ef3b19bea4b92fc6ca4370be2cf5a"}


class _PlainStepSampling:
    """A step in which no request carries drafts (every round skipped: depth 0) samples exactly as
    a step without speculation. vLLM's runner builds speculative metadata whenever speculation is
    configured, which would run rejection sampling over zero drafts."""

    def _sample(self, logits: torch.Tensor | None, spec_decode_metadata: Any) -> Any:
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            spec_decode_metadata = None
        return super()._sample(logits, spec_decode_metadata)


class _SkippedRoundShortcut:
    """A decode step whose round the depth gate skips costs what a step without speculation costs:
    for a step in which every request decoded one token without drafts, the drafter opens its round
    before vLLM prepares the drafter's inputs (next-token selection, padded first-pass rows); a
    skipped round keeps the rows straight from the target's outputs and returns empty drafts (the
    list form vLLM's n-gram drafter uses: no device copy, nothing for the scheduler to strip).
    Every other step, and a round the gate lets draft, goes through vLLM's path unchanged."""

    def propose_draft_token_ids(self, scheduler_output: Any, sampled_token_ids: Any, sampling_metadata: Any,
                                hidden_states: Any, sample_hidden_states: Any, aux_hidden_states: Any,
                                spec_decode_metadata: Any, common_attn_metadata: Any, slot_mappings: Any) -> Any:
        num_reqs = self.input_batch.num_reqs
        drafter = getattr(self, "drafter", None)
        if (isinstance(drafter, RadarProposer) and not self.use_async_scheduling and aux_hidden_states is not None
                and (spec_decode_metadata is None or spec_decode_metadata.max_spec_len == 0)
                and isinstance(sampled_token_ids, torch.Tensor) and sampled_token_ids.shape[0] == num_reqs
                and scheduler_output.total_num_scheduled_tokens == num_reqs
                and not self.discard_request_mask.np[:num_reqs].any()
                and drafter.skip_decode_round(
                    scheduler_output.num_spec_tokens_to_schedule, sampled_token_ids[:, 0], self._get_positions(num_reqs),
                    torch.cat([h[:num_reqs] for h in aux_hidden_states], dim=-1), common_attn_metadata,
                    sampling_metadata)):
            return [[] for _ in range(num_reqs)]
        return super().propose_draft_token_ids(scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                               sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                                               common_attn_metadata, slot_mappings)


class RadarCPUModelRunner(_SkippedRoundShortcut, _PlainStepSampling, CPUModelRunner):
    def __init__(self, vllm_config: Any, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        with _torch_cuda_wrapper():
            install_radar_drafter(self)


class RadarGPUModelRunner(_SkippedRoundShortcut, _PlainStepSampling, GPUModelRunner):
    def __init__(self, vllm_config: Any, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        install_radar_drafter(self)


class _GateReport:
    """``LLM.collective_rpc("radar_gate_summary")``: the depth gate's estimates and the round counts
    of this worker's drafter (for benchmark records and logs); ``"radar_gate_export"``: what the
    gate measured, for a gate-cost table. None without a RADAR drafter (or gate)."""

    def _radar_drafter(self) -> RadarProposer | None:
        drafter = getattr(getattr(self, "model_runner", None), "drafter", None)
        return drafter if isinstance(drafter, RadarProposer) else None

    def radar_gate_summary(self) -> dict[str, Any] | None:
        drafter = self._radar_drafter()
        if drafter is None:
            return None
        return {"gate": drafter.gate.summary() if drafter.gate is not None else None,
                "rounds": dict(drafter.round_counts)}

    def radar_gate_export(self) -> dict[str, Any] | None:
        drafter = self._radar_drafter()
        return drafter.gate.export() if drafter is not None and drafter.gate is not None else None


class RadarCPUWorker(_GateReport, CPUWorker):
    def init_device(self) -> None:
        stock_runner = cpu_worker.CPUModelRunner
        if engine_plan(self.vllm_config).tree:
            from radar_vllm.vllm.tree_runner import RadarTreeCPUModelRunner

            cpu_worker.CPUModelRunner = RadarTreeCPUModelRunner
        else:
            cpu_worker.CPUModelRunner = RadarCPUModelRunner
        try:
            super().init_device()
        finally:
            cpu_worker.CPUModelRunner = stock_runner


class RadarGPUWorker(_GateReport, Worker):
    def _make_model_runner(self) -> GPUModelRunner:
        if self.use_v2_model_runner:
            raise ValueError("RADAR runs on vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")
        return RadarGPUModelRunner(self.vllm_config, self.device)
