"""RadarProposer: vLLM's EAGLE proposer with a learned, per-request stop after every draft call.

Chain mode, one round for a batch of B requests (K = max depth):

    call 1 (over the newly verified tokens) -> depth-1 draft token for every request
    policy step on the device               -> which requests continue
    call d = 2..K (one token per request)   -> depth-d tokens; the policy decides again after
                                               every call but the last
    output [B, K]: request b keeps its tokens up to its stop depth, PADDING_TOKEN (-1) after

Stopped requests stay in the draft batch (their rows are computed and masked): shrinking the batch
would need the host to read the decisions. The batch's loop ends when every request has stopped
or at depth K. On CPU the all-stopped check is a plain read. On CUDA it never blocks: after each
policy step the flag "any request still active" is copied to pinned host memory with an event,
and before each draft call the loop reads the newest flag whose event has completed
(``Event.query()``); an unfinished copy just means one more (masked) draft call. Outputs do not
depend on when the loop notices, only the time spent does.

The policy state (:func:`radar_vllm.core.policy_state.chain_frontier_scores`) is the top_k cumulative
log-probs of the chain's would-be children; decisions come from
:class:`radar_vllm.core.policy.PolicyRunner` (fused Triton step on CUDA, torch elsewhere).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from vllm.config import VllmConfig
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.spec_decode.eagle import EagleProposer

from radar_vllm.core.policy_state import chain_frontier_scores
from radar_vllm.core.policy import PolicyRunner, load_policy
from radar_vllm.core.config import ValidatedRadar
from radar_vllm.vllm.stats import PADDING_TOKEN
from radar_vllm.vllm.stop_monitor import AllStoppedMonitor

logger = logging.getLogger(__name__)


def begin_single_token_passes(proposer: EagleProposer, cad: CommonAttentionMetadata, batch_size: int,
                              num_rejected_tokens_gpu: torch.Tensor | None) -> tuple[Any, int, Any]:
    """Switch the drafting metadata to one token per request for the draft passes after the first.

    Returns the proposer's ``(cudagraph_mode, input_batch_size, batch_size_across_dp)`` for
    ``batch_size`` tokens. A padded drafter batch (``num_rejected_tokens_gpu``) also drops the
    rejected slots from the sequence lengths.
    """
    padding = proposer._determine_batch_execution_and_padding(batch_size)
    cad.num_actual_tokens = batch_size
    cad.max_query_len = 1
    cad.query_start_loc = proposer.arange[: batch_size + 1]
    cad.query_start_loc_cpu = torch.from_numpy(proposer.token_arange_np[: batch_size + 1]).clone()
    if num_rejected_tokens_gpu is not None:
        cad.seq_lens -= num_rejected_tokens_gpu
    return padding


class RadarProposer(EagleProposer):
    """EAGLE-3 chain drafting with per-request depths chosen by the RADAR stop policy."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        device: torch.device,
        runner: Any = None,
        radar: ValidatedRadar | None = None,
    ) -> None:
        super().__init__(vllm_config, device, runner)
        if radar is None:
            from radar_vllm.vllm.selection import radar_settings

            radar = radar_settings(vllm_config)
        self.radar = radar
        self.max_depth = radar.config.max_depth
        self.top_k = radar.config.top_k
        if self.num_speculative_tokens != self.max_depth:
            raise ValueError(
                f"num_speculative_tokens={self.num_speculative_tokens} must equal RADAR max_depth={self.max_depth}"
            )
        if self.uses_mrope or self.parallel_drafting or self.use_local_argmax_reduction:
            raise ValueError("RADAR supports plain EAGLE-3 chain drafting only (no M-RoPE, parallel drafting "
                             "or local argmax reduction)")
        policy = load_policy(radar.policy_path, device=device)
        self.policy_runner = PolicyRunner(
            policy,
            max_batch_size=self.max_batch_size,
            device=device,
            decision=radar.decision,
            threshold=radar.threshold,
        )
        self.stop_monitor = AllStoppedMonitor(torch.device(device), self.max_depth)
        # [max_batch] cumulative log-prob of each request's chain so far
        self.chain_logprob = torch.zeros(self.max_batch_size, dtype=torch.float32, device=device)
        if radar.config.fixed_depth is not None:
            logger.info("RadarProposer: chain mode, fixed depth %d (diagnostic: the stop policy is not used)",
                        radar.config.fixed_depth)
        else:
            logger.info(
                "RadarProposer: chain mode, max_depth=%d, top_k=%d, decision=%s, threshold=%.3f",
                self.max_depth, self.top_k, radar.decision, radar.threshold,
            )

    # ---------------------------------------------------------------------------------------
    # one draft call's outputs

    def _draft_tokens_and_logprobs(self, sample_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy draft tokens ``[batch]`` (target ids) and log-probs ``[batch, vocab]``."""
        logits = self.model.compute_logits(sample_hidden_states)  # [batch, vocab]
        return logits.argmax(dim=-1), torch.log_softmax(logits.float(), dim=-1)

    def _decide(self, step_logprobs: torch.Tensor, batch_size: int, first: bool) -> torch.Tensor:
        """Policy step after a draft call; returns ``[batch]`` bool: still drafting."""
        prefix = self.chain_logprob[:batch_size]
        if first:
            prefix.zero_()
        frontier_scores, next_prefix = chain_frontier_scores(prefix, step_logprobs, self.top_k)
        prefix.copy_(next_prefix)
        active = self.policy_runner.step(frontier_scores)
        self.stop_monitor.record(active)
        return active

    # ---------------------------------------------------------------------------------------

    def propose(
        self,
        num_speculative_tokens: int,
        # [num_tokens]
        target_token_ids: torch.Tensor,
        # [num_tokens]
        target_positions: torch.Tensor,
        # [num_tokens, num_aux * target_hidden]
        target_hidden_states: torch.Tensor,
        # [batch_size]
        next_token_ids: torch.Tensor,
        token_indices_to_sample: torch.Tensor | None,
        common_attn_metadata: CommonAttentionMetadata,
        sampling_metadata: SamplingMetadata,
        mm_embed_inputs: tuple[list[torch.Tensor], torch.Tensor] | None = None,
        num_rejected_tokens_gpu: torch.Tensor | None = None,
        slot_mappings: Any = None,
    ) -> torch.Tensor:
        fixed_depth = self.radar.config.fixed_depth
        depth_limit = min(num_speculative_tokens, self.max_depth, fixed_depth or self.max_depth)
        if num_speculative_tokens <= 1:
            # Nothing to decide: at most one draft call.
            return super().propose(
                num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                mm_embed_inputs, num_rejected_tokens_gpu, slot_mappings,
            )
        self.num_speculative_tokens = num_speculative_tokens
        self._last_draft_probs = None
        cad = common_attn_metadata
        batch_size = cad.batch_size()

        # Draft call 1 over the newly verified tokens (same inputs as the stock proposer).
        target_hidden_states = self.model.combine_hidden_states(target_hidden_states)
        num_tokens, token_indices_to_sample, cad = self.set_inputs_first_pass(
            target_token_ids=target_token_ids,
            next_token_ids=next_token_ids,
            target_positions=target_positions,
            target_hidden_states=target_hidden_states,
            token_indices_to_sample=token_indices_to_sample,
            cad=cad,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu,
        )
        _, per_layer_attn_metadata = self.build_per_group_and_layer_attn_metadata(cad)
        cudagraph_mode, num_input_tokens, num_tokens_across_dp = self._determine_batch_execution_and_padding(num_tokens)
        model_kwargs, slot_mapping_size = self.build_model_inputs_first_pass(num_tokens, num_input_tokens, mm_embed_inputs)
        with set_forward_context(
            per_layer_attn_metadata,
            self.vllm_config,
            num_tokens=num_input_tokens,
            num_tokens_across_dp=num_tokens_across_dp,
            cudagraph_runtime_mode=cudagraph_mode,
            slot_mapping=self._get_slot_mapping(slot_mapping_size, cad.slot_mapping),
        ):
            last_hidden_states, hidden_states = self.model(**model_kwargs)
        positions = self.positions[token_indices_to_sample]  # [batch]
        hidden_states = hidden_states[token_indices_to_sample]  # [batch, hidden]
        tokens, step_logprobs = self._draft_tokens_and_logprobs(last_hidden_states[token_indices_to_sample])

        # [batch, num_speculative_tokens] output, padded after each request's stop
        draft_token_ids = torch.full(
            (batch_size, num_speculative_tokens), PADDING_TOKEN, dtype=torch.int64, device=tokens.device
        )
        draft_token_ids[:, 0] = tokens
        self.policy_runner.begin_round(batch_size)
        self.stop_monitor.begin_round()
        if fixed_depth is None:
            active = self._decide(step_logprobs, batch_size, first=True)  # [batch] bool
        else:  # diagnostic mode: no policy, every request drafts depth_limit tokens
            active = torch.ones(batch_size, dtype=torch.bool, device=tokens.device)

        cudagraph_mode, input_batch_size, batch_size_across_dp = begin_single_token_passes(
            self, cad, batch_size, num_rejected_tokens_gpu)
        for depth in range(2, depth_limit + 1):
            if fixed_depth is None and self.stop_monitor.all_stopped():
                break
            positions = self._update_positions_dependent_metadata(
                positions, cad, batch_size, input_batch_size, self.block_size
            )
            _, per_layer_attn_metadata = self.build_per_group_and_layer_attn_metadata(cad, draft_index=depth - 1)
            self.input_ids[:batch_size] = tokens.int()
            self.hidden_states[:batch_size] = hidden_states
            model_kwargs = {
                "input_ids": self.input_ids[:input_batch_size],
                "positions": self._get_positions(input_batch_size),
                "inputs_embeds": None,
                "hidden_states": self.hidden_states[:input_batch_size],
            }
            if self.supports_mm_inputs:
                self.inputs_embeds[:batch_size] = self.model.embed_input_ids(tokens.int())
                model_kwargs["input_ids"] = None
                model_kwargs["inputs_embeds"] = self.inputs_embeds[:input_batch_size]
            with set_forward_context(
                per_layer_attn_metadata,
                self.vllm_config,
                num_tokens=input_batch_size,
                num_tokens_across_dp=batch_size_across_dp,
                cudagraph_runtime_mode=cudagraph_mode,
                slot_mapping=self._get_slot_mapping(input_batch_size),
            ):
                last_hidden_states, hidden_states = self.model(**model_kwargs)
            hidden_states = hidden_states[:batch_size]
            tokens, step_logprobs = self._draft_tokens_and_logprobs(last_hidden_states[:batch_size])
            draft_token_ids[:, depth - 1] = torch.where(active, tokens, PADDING_TOKEN)
            if depth < depth_limit and fixed_depth is None:
                active = self._decide(step_logprobs, batch_size, first=False)
        return draft_token_ids

    @torch.inference_mode()
    def dummy_run(
        self,
        num_tokens: int,
        use_cudagraphs: bool = True,
        is_graph_capturing: bool = False,
        slot_mappings: dict[str, torch.Tensor] | None = None,
    ) -> None:
        # The stock warm-up already runs num_speculative_tokens (= max depth) draft calls; add
        # the policy steps of a full-depth round.
        super().dummy_run(num_tokens, use_cudagraphs, is_graph_capturing, slot_mappings)
        batch_size = max(1, min(num_tokens, self.max_batch_size))
        self.policy_runner.begin_round(batch_size)
        dummy_logprobs = torch.log_softmax(
            torch.zeros(batch_size, max(self.top_k, 2), device=self.chain_logprob.device), dim=-1
        )
        for depth in range(1, self.max_depth):
            self._decide(dummy_logprobs, batch_size, first=depth == 1)
        self.stop_monitor.begin_round()


__all__ = ["AllStoppedMonitor", "RadarProposer", "begin_single_token_passes"]
