"""RadarProposer: vLLM's EAGLE-3 proposer, grown one level per draft call under the stop policy.

One round for a batch of B requests (D = max depth, W = the growth strategy's width):

    call 1 over the newly verified tokens (vLLM's own first pass)  -> growth.start(logits)
    policy step on the device                                       -> which requests continue
    calls d = 2..D: B * W rows (growth.inputs()), one forward       -> growth.extend(logits, active)
                    policy step after every call but the last
    growth.finish() -> DraftTree; drafts [B, nodes], PADDING_TOKEN after each request's drafts

Chain mode (W = 1) runs calls 2..D exactly like vLLM's loop (same metadata updates, same
kernels), so with the policy always continuing its drafts are the stock drafter's. Tree mode
(W = top_k) runs each call's frontier rows with a :class:`~radar_vllm.vllm.attention.DraftFrontierPlan`
carried in the draft layers' attention metadata (see that module).

Stopped requests stay in the draft batch (their rows are computed and masked): shrinking the batch
would need the host to read the decisions. The loop ends when every request has stopped or at
depth D; the check never blocks on CUDA (:class:`~radar_vllm.vllm.stop_monitor.AllStoppedMonitor`).

Before call 1 the depth-0 gate (:class:`~radar_vllm.core.draft_gate.DraftGate`) may decide that
the whole batch does not draft this round: the proposer then only keeps the rows call 1 would have
read (:mod:`radar_vllm.vllm.catch_up`) and returns no drafts, so the next engine step is a plain
decode step (no draft call, no multi-token verify, no rejection sampling); the next round that
drafts brings those rows into its call 1. In a step where every request decoded one token without
drafts the runner opens the round before vLLM prepares the drafter's inputs
(:meth:`RadarProposer.skip_decode_round`), so a skipped round does not pay for that preparation.
The gate's other arms: a cap below the checkpoint's maximum depth drafts exactly that many tokens
per request as a chain, through vLLM's own loop (a stock EAGLE-3 round with K = cap, no policy);
the deepest arm is RADAR's round above (the stop policy decides per request, chain or tree). A
tree engine with ``radar.tree_sizes`` has one more such arm per size: the same round, verifying
the best ``size`` tokens of each tree (on a 2-core CPU at batch 1 a step verifying 6-token trees
measured 1.25x a decode step, one verifying 12-token trees 1.78x), so the gate measures which
size pays at each batch size.

The loop follows ``SpecDecodeBaseProposer.propose`` of vLLM 0.32 and relies on what
``set_inputs_first_pass`` writes; ``UPSTREAM_SHA256`` pins both methods' source
(tests/unit/test_plugin_pure.py), so an upgrade that changes them fails loudly and points here.
Upstream branches RADAR does not follow are refused in ``__init__``.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.sampler import _SAMPLING_EPS as SAMPLING_EPS
from vllm.v1.spec_decode.eagle import EagleProposer

from radar_vllm.core.config import TreeConfig
from radar_vllm.core.draft_gate import DraftGate, gate_arms, round_shape
from radar_vllm.core.growth import ChainGrowth, FrontierGrowth
from radar_vllm.core.policy import PolicyRunner, load_policy
from radar_vllm.core.tree import PADDING_TOKEN, DraftTree
from radar_vllm.vllm.attention import DraftFrontierPlan, frontier_rounds, frontier_scratch_rounds, with_plan
from radar_vllm.vllm.catch_up import DrafterKVWriter, SkippedTokens
from radar_vllm.vllm.engine_plan import EnginePlan
from radar_vllm.vllm.stop_monitor import AllStoppedMonitor

logger = logging.getLogger(__name__)

# What a round does (the depth-0 gate decides between drafting and not; see _open_round)
DRAFT_ROUND = "draft"  # call 1 and as many more as the policy wants; drafts go to the verifier
SKIP_ROUND = "skip"  # no draft call; call 1's rows are kept for the catch-up; no drafts
CATCH_UP_ROUND = "catch_up"  # call 1 only (the drafter's KV, incl. kept rows); no drafts

# sha256 of inspect.getsource(SpecDecodeBaseProposer.<method>) in the vLLM release this loop follows
UPSTREAM_SHA256 = {
    "propose": "00017c139f27a3e7baa4a284b30c1d3782806b91f8adbe85bd7f58551a1eb1b3",
    "set_inputs_first_pass": "00e470090b7c3a350b354ae97d9be7c2e7b07e6cbb51b329b5e6319d483ce2d1",
}


def _padding(batch_size: int, width: int, device: torch.device) -> torch.Tensor:
    """``[batch_size, width]`` draft slots holding ``PADDING_TOKEN`` (no draft)."""
    return torch.full((batch_size, width), PADDING_TOKEN, dtype=torch.int64, device=device)


def tree_eligible(params: Any, has_custom_logits_processors: bool = False) -> bool:
    """True when a request's sampling can be verified exactly over a tree.

    Penalties, logprobs, bad words, logit bias, allowed-token masks, min_tokens/min_p and
    structured output depend on the chain position or need the stock sampler: those requests
    draft chains instead (the best-first chain of their tree), verified by vLLM's sampler.
    """
    if params is None or has_custom_logits_processors:
        return False
    return not (
        getattr(params, "structured_outputs", None) is not None
        or getattr(params, "logprobs", None) is not None
        or getattr(params, "presence_penalty", 0.0) != 0.0
        or getattr(params, "frequency_penalty", 0.0) != 0.0
        or getattr(params, "repetition_penalty", 1.0) != 1.0
        or bool(getattr(params, "bad_words", None))
        or bool(getattr(params, "logit_bias", None))
        or bool(getattr(params, "allowed_token_ids", None))
        or getattr(params, "min_tokens", 0) > 0
        or getattr(params, "min_p", 0.0) > 0.0
    )


def sampling_rows(sampling_metadata: Any, batch_size: int, device: torch.device) -> torch.Tensor:
    """``[batch]`` bool: the requests that sample (temperature > 0), from vLLM's sampling metadata."""
    temperature = getattr(sampling_metadata, "temperature", None)
    if temperature is None:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    return (temperature[:batch_size] >= SAMPLING_EPS).to(device)


class RadarProposer(EagleProposer):
    """EAGLE-3 drafting with per-request depths chosen by the RADAR stop policy (chain or tree)."""

    def __init__(self, vllm_config: Any, device: torch.device, runner: Any, plan: EnginePlan) -> None:
        super().__init__(vllm_config, device, runner)
        self.model_runner = runner
        config = plan.radar.config
        self.plan = plan
        self.max_depth = config.max_depth
        self.fixed_depth = config.fixed_depth
        if self.num_speculative_tokens != config.num_draft_tokens:
            raise ValueError(f"num_speculative_tokens={self.num_speculative_tokens} must equal the RADAR "
                             f"checkpoint's draft budget {config.num_draft_tokens} ({plan.mode} mode)")
        unsupported = [name for name, used in (
            ("M-RoPE", self.uses_mrope), ("parallel drafting", self.parallel_drafting),
            ("local argmax reduction", self.use_local_argmax_reduction),
            ("a heterogeneous draft vocabulary", self.use_heterogeneous_vocab),
            ("constant draft positions", self.constant_draft_positions),
            ("shared MTP indices", self._share_mtp_indices), ("multimodal inputs", self.supports_mm_inputs),
            ("a draft model that does not take hidden states", not self.pass_hidden_states_to_model),
        ) if used]
        if unsupported or self.method != "eagle3":
            raise ValueError(f"RADAR drafts with plain EAGLE-3 heads; this engine needs {unsupported or self.method}, "
                             f"which RADAR's drafting loop does not support")
        self.policy_runner = None
        self.sampled_policy_runner = None  # chain mode: the policy of requests that sample, if any
        if config.fixed_depth is None:
            self.policy_runner = PolicyRunner(load_policy(plan.radar.policy_path, device=device),
                                              max_batch_size=self.max_batch_size, device=device,
                                              decision=plan.radar.decision, threshold=plan.radar.threshold)
            if plan.radar.sampled_policy_path is not None:
                self.sampled_policy_runner = PolicyRunner(
                    load_policy(plan.radar.sampled_policy_path, device=device), max_batch_size=self.max_batch_size,
                    device=device, decision=plan.radar.sampled_decision, threshold=plan.radar.sampled_threshold)
        self._sampling_rows: torch.Tensor | None = None  # this round: [batch] bool, rows that sample (mixed)
        self._round_runners: tuple[Any, ...] = ()  # the policy runners this round steps
        self.state_size = config.top_k
        self.tree_config = TreeConfig(top_k=config.top_k, max_depth=config.max_depth,
                                      total_tokens=config.total_tokens) if plan.tree else None
        # the smaller trees the gate may choose instead (tree mode, gate on): one TreeConfig per size
        self.tree_sizes = config.gate_tree_sizes
        self._tree_configs = {size: dataclasses.replace(self.tree_config, total_tokens=size)
                              for size in self.tree_sizes}
        self.stop_monitor = AllStoppedMonitor(torch.device(device), self.max_depth)
        self.last_tree: DraftTree | None = None  # the last round's drafts (tree mode: read by the runner)
        # Depth 0: the gate and the rows skipped rounds leave for the drafter to catch up on. Its
        # caps below the maximum draft fixed-depth chains (vLLM's loop); the deepest arm's rounds
        # (the policy's, chain or tree; and in tree mode one per smaller tree size) on their own
        caps, own_arms = gate_arms(self.max_depth, self.tree_sizes)
        self.gate = (DraftGate(self.max_depth, arms=caps, own_arms=own_arms, tree_sizes=self.tree_sizes)
                     if config.skip_drafting == "auto" and config.fixed_depth is None else None)
        if self.gate is not None and plan.gate_table is not None:
            self.gate.seed(plan.gate_table)
        self.skipped = SkippedTokens(capacity=self.max_num_tokens)
        self.round_counts = {DRAFT_ROUND: 0, SKIP_ROUND: 0, CATCH_UP_ROUND: 0}
        # (start time, batch size, action, cap, rows caught up before the round, some request samples)
        self._last_round: tuple[float, int, str, int, int, bool] | None = None
        self.clock = time.perf_counter  # what the gate's step times are read from (seconds)
        self._depth_cap = self.max_depth  # the gate's cap for the current round
        self._round_tree_size: int | None = None  # a smaller tree the gate chose for it (None: total_tokens)
        self._opened_action: str | None = None  # a round opened by skip_decode_round, for propose
        self._splice_kept = True  # call 1 brings the kept rows in (False: a catch-up round that keeps them)
        self.kv_writer: DrafterKVWriter | None = None  # set by load_model
        logger.info("RadarProposer: %s mode, max_depth=%d, top_k=%d, %s", plan.mode, self.max_depth, config.top_k,
                    f"fixed depth {config.fixed_depth} (no stop policy)" if config.fixed_depth else
                    f"decision={plan.radar.decision}, threshold={plan.radar.threshold:.3f}")

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        if not self.model_returns_tuple():
            raise ValueError("RADAR needs an EAGLE-3 draft model that returns (last hidden, hidden) states")
        # catch-up rounds write the drafter's K/V only (None: they run the full call 1)
        self.kv_writer = None if self.uses_mrope else DrafterKVWriter.build(self.model)

    # ------------------------------------------------------------------------------------------

    def _growth(self, batch_size: int, device: torch.device) -> Any:
        if self.tree_config is None:
            return ChainGrowth(batch_size, self.max_depth, self.state_size, device)
        config = self._tree_configs.get(self._round_tree_size, self.tree_config)
        return FrontierGrowth(config, batch_size, self.state_size, device)

    def _begin_policy_round(self, batch_size: int, sampling_metadata: Any) -> None:
        """Choose this round's policies: greedy rows run ``policy``, sampling rows ``sampled_policy``."""
        self._sampling_rows = None
        if self.policy_runner is None:
            self._round_runners = ()
            return
        runners: tuple[Any, ...] = (self.policy_runner,)
        if self.sampled_policy_runner is not None and not getattr(sampling_metadata, "all_greedy", True):
            if getattr(sampling_metadata, "all_random", False):
                runners = (self.sampled_policy_runner,)
            else:  # a mixed batch: both policies, each request takes its own's decision
                self._sampling_rows = sampling_rows(sampling_metadata, batch_size, self.positions.device)
                runners = (self.policy_runner, self.sampled_policy_runner)
        for runner in runners:
            runner.begin_round(batch_size)
        self._round_runners = runners

    def _decide(self, growth: Any, active: torch.Tensor) -> torch.Tensor:
        """Policy step after a draft call; returns ``[batch]`` bool: still drafting."""
        if self._round_runners:
            state = growth.policy_state()
            keep = self._round_runners[0].step(state)
            if len(self._round_runners) == 2:
                keep = torch.where(self._sampling_rows, self._round_runners[1].step(state), keep)
            active = keep & active
        self.stop_monitor.record(active)
        return active

    def _eligible(self, batch_size: int) -> torch.Tensor:
        """[batch] bool: requests whose sampling can be verified over a tree."""
        runner = self.model_runner
        custom = bool(getattr(self.vllm_config.model_config, "logits_processors", None))
        return torch.tensor([tree_eligible(getattr(runner.requests.get(r), "sampling_params", None), custom)
                             for r in runner.input_batch.req_ids[:batch_size]], dtype=torch.bool)

    def propose(
        self,
        num_speculative_tokens: int,
        target_token_ids: torch.Tensor,  # [num_tokens]
        target_positions: torch.Tensor,  # [num_tokens]
        target_hidden_states: torch.Tensor,  # [num_tokens, num_aux * target_hidden]
        next_token_ids: torch.Tensor,  # [batch_size]
        token_indices_to_sample: torch.Tensor | None,
        common_attn_metadata: CommonAttentionMetadata,
        sampling_metadata: SamplingMetadata,
        mm_embed_inputs: tuple[list[torch.Tensor], torch.Tensor] | None = None,
        num_rejected_tokens_gpu: torch.Tensor | None = None,
        slot_mappings: Any = None,
    ) -> torch.Tensor:
        tree = self.tree_config is not None
        self.last_tree = None
        action, self._opened_action = self._opened_action, None
        if action is None:
            action = self._open_round(common_attn_metadata, token_indices_to_sample, num_speculative_tokens,
                                      target_token_ids.shape[0], sampling_metadata)
        if action == SKIP_ROUND:
            return self._skip_round(num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                                    next_token_ids, token_indices_to_sample, common_attn_metadata,
                                    num_rejected_tokens_gpu)
        # vLLM's own loop where there is nothing to decide: a catch-up writes the drafter's K/V only
        # (or, for a drafter the KV writer does not know, asks vLLM's loop for 0 drafts: call 1
        # without logits), a gate arm below the maximum depth for a
        # chain of exactly that depth, a chain engine limited to one draft for one
        if action == CATCH_UP_ROUND:
            stock_drafts = 0
            self._splice_kept = not self._keep_rows_through_catch_up(next_token_ids, target_positions,
                                                                     target_hidden_states, common_attn_metadata)
            if self.kv_writer is not None:
                try:
                    self._write_first_pass_kv(target_token_ids, target_positions, target_hidden_states,
                                              next_token_ids, token_indices_to_sample, common_attn_metadata,
                                              num_rejected_tokens_gpu)
                finally:
                    self._splice_kept = True
                return _padding(common_attn_metadata.batch_size(), num_speculative_tokens, target_token_ids.device)
        elif self.gate is not None and self._depth_cap < self.max_depth:
            stock_drafts = min(self._depth_cap, num_speculative_tokens)
        elif not tree and min(self.fixed_depth or self.max_depth, num_speculative_tokens) <= 1:
            stock_drafts = 1
        else:
            stock_drafts = None
        if stock_drafts is not None:
            try:
                drafts = super().propose(stock_drafts, target_token_ids, target_positions, target_hidden_states,
                                         next_token_ids, token_indices_to_sample, common_attn_metadata,
                                         sampling_metadata, mm_embed_inputs, num_rejected_tokens_gpu, slot_mappings)
            finally:
                self._splice_kept = True
            self.num_speculative_tokens = num_speculative_tokens  # upstream stored its own count
            output = _padding(drafts.shape[0], num_speculative_tokens, drafts.device)
            output[:, :stock_drafts] = drafts
            return output
        if self.eplb_state is not None:
            raise ValueError("RADAR's drafting loop does not support expert-parallel load balancing (EPLB)")
        self.num_speculative_tokens = num_speculative_tokens
        self._last_draft_probs = None
        cad = common_attn_metadata
        batch_size = cad.batch_size()
        depth_limit = min(self.fixed_depth or self.max_depth, self._depth_cap, num_speculative_tokens)

        # Call 1, as vLLM's loop runs it.
        num_tokens, token_indices_to_sample, cad = self._first_pass(
            target_token_ids, target_positions, target_hidden_states, next_token_ids, token_indices_to_sample, cad,
            num_rejected_tokens_gpu)
        per_group_metadata, per_layer_metadata = self.build_per_group_and_layer_attn_metadata(cad)
        cudagraph_mode, num_input_tokens, num_tokens_across_dp = self._determine_batch_execution_and_padding(num_tokens)
        model_kwargs, slot_mapping_size = self.build_model_inputs_first_pass(num_tokens, num_input_tokens,
                                                                            mm_embed_inputs)
        with set_forward_context(per_layer_metadata, self.vllm_config, num_tokens=num_input_tokens,
                                 num_tokens_across_dp=num_tokens_across_dp, cudagraph_runtime_mode=cudagraph_mode,
                                 slot_mapping=self._get_slot_mapping(slot_mapping_size, cad.slot_mapping)):
            last_hidden_states, hidden_states = self.model(**model_kwargs)
        positions = self.positions[token_indices_to_sample]  # [batch]
        hidden_states = hidden_states[token_indices_to_sample]  # [batch, hidden]
        logits = self.model.compute_logits(last_hidden_states[token_indices_to_sample])  # [batch, vocab]

        growth = self._growth(batch_size, logits.device)
        growth.start(logits)
        self._begin_policy_round(batch_size, sampling_metadata)
        self.stop_monitor.begin_round()
        active = torch.ones(batch_size, dtype=torch.bool, device=logits.device)
        if depth_limit > 1:
            active = self._decide(growth, active)
            if self.allowed_attn_types is not None and not all(
                    isinstance(group, self.allowed_attn_types) for group in per_group_metadata):
                raise ValueError(f"RADAR drafting needs attention metadata of types {self.allowed_attn_types}")
        # Calls 2..D. vLLM's loop after call 1 (one token per request, metadata updated in place),
        # with the padded drafter batch's rejected slots dropped from the sequence lengths.
        cudagraph_mode, input_batch_size, batch_size_across_dp = self._determine_batch_execution_and_padding(
            batch_size)
        cad.num_actual_tokens = batch_size
        cad.max_query_len = 1
        cad.query_start_loc = self.arange[: batch_size + 1]
        cad.query_start_loc_cpu = torch.from_numpy(self.token_arange_np[: batch_size + 1]).clone()
        if num_rejected_tokens_gpu is not None:
            cad.seq_lens -= num_rejected_tokens_gpu
        frontier = _FrontierState(self, cad, positions, batch_size, depth_limit) if tree else None
        parent_hidden = hidden_states.unsqueeze(1)  # [batch, rows of the last call, hidden]
        for depth in range(2, depth_limit + 1):
            if self.fixed_depth is None and self.stop_monitor.all_stopped():
                break
            slots = growth.parent_slots()  # [batch, width]
            parent_hidden = parent_hidden.gather(1, slots.unsqueeze(-1).expand(-1, -1, parent_hidden.shape[-1]))
            tokens = growth.inputs()  # [batch, width]
            if frontier is None:
                positions = self._update_positions_dependent_metadata(positions, cad, batch_size, input_batch_size,
                                                                      self.block_size)
                _, per_layer_metadata = self.build_per_group_and_layer_attn_metadata(cad, draft_index=depth - 1)
                self.input_ids[:batch_size] = tokens[:, 0].int()
                self.hidden_states[:batch_size] = parent_hidden[:, 0]
                model_kwargs = {"input_ids": self.input_ids[:input_batch_size],
                                "positions": self._get_positions(input_batch_size), "inputs_embeds": None,
                                "hidden_states": self.hidden_states[:input_batch_size]}
                with set_forward_context(per_layer_metadata, self.vllm_config, num_tokens=input_batch_size,
                                         num_tokens_across_dp=batch_size_across_dp,
                                         cudagraph_runtime_mode=cudagraph_mode,
                                         slot_mapping=self._get_slot_mapping(input_batch_size)):
                    last_hidden_states, hidden_states = self.model(**model_kwargs)
                rows = batch_size
            else:  # one forward over the batch's frontier rows, attention from the frontier plan
                last_hidden_states, hidden_states = frontier.run(depth, tokens, parent_hidden, per_layer_metadata,
                                                                 growth.parent_slots())
                rows = tokens.numel()
            logits = self.model.compute_logits(last_hidden_states[:rows]).view(batch_size, rows // batch_size, -1)
            parent_hidden = hidden_states[:rows].view(batch_size, -1, hidden_states.shape[-1])
            growth.extend(logits, active)
            if depth < depth_limit:
                active = self._decide(growth, active)

        drafts = growth.finish()
        if tree:  # requests that cannot be verified over a tree keep their best-first chain
            drafts = drafts.to("cpu").best_chains(~self._eligible(batch_size))
            self.last_tree = drafts
        output = _padding(batch_size, num_speculative_tokens, drafts.device)
        width = min(drafts.max_nodes, num_speculative_tokens)
        output[:, :width] = drafts.target_tokens[:, :width]
        return output.to(positions.device)

    def _first_pass(self, target_token_ids: torch.Tensor, target_positions: torch.Tensor,
                    target_hidden_states: torch.Tensor, next_token_ids: torch.Tensor,
                    token_indices_to_sample: torch.Tensor | None, cad: CommonAttentionMetadata,
                    num_rejected_tokens_gpu: torch.Tensor | None) -> tuple[int, torch.Tensor, Any]:
        """Call 1's inputs in the drafter's buffers: the target's hidden states combined by the
        drafter's input layer, vLLM's first pass and the kept rows (:meth:`set_inputs_first_pass`)."""
        return self.set_inputs_first_pass(
            target_token_ids=target_token_ids, next_token_ids=next_token_ids, target_positions=target_positions,
            target_hidden_states=self.model.combine_hidden_states(target_hidden_states),
            token_indices_to_sample=token_indices_to_sample, cad=cad, num_rejected_tokens_gpu=num_rejected_tokens_gpu)

    # -- depth 0 ---------------------------------------------------------------------------------

    def _write_first_pass_kv(self, target_token_ids: torch.Tensor, target_positions: torch.Tensor,
                             target_hidden_states: torch.Tensor, next_token_ids: torch.Tensor,
                             token_indices_to_sample: torch.Tensor | None, cad: CommonAttentionMetadata,
                             num_rejected_tokens_gpu: torch.Tensor | None) -> None:
        """A catch-up round's call 1 without drafts: vLLM's first-pass inputs (and the kept rows
        spliced in front, unless this round keeps them), then only the drafter's K/V of those rows
        (:class:`~radar_vllm.vllm.catch_up.DrafterKVWriter`)."""
        self._last_draft_probs = None  # (no drafts: nothing for sampled verification to read)
        num_tokens, _, cad = self._first_pass(target_token_ids, target_positions, target_hidden_states, next_token_ids,
                                              token_indices_to_sample, cad, num_rejected_tokens_gpu)
        self.kv_writer(self.input_ids[:num_tokens], self.positions[:num_tokens], self.hidden_states[:num_tokens],
                       cad.slot_mapping[:num_tokens])

    def skip_decode_round(self, num_speculative_tokens: int, sampled_token_ids: torch.Tensor,
                          positions: torch.Tensor, target_hidden_states: torch.Tensor,
                          cad: CommonAttentionMetadata, sampling_metadata: SamplingMetadata) -> bool:
        """The runner's shortcut for a step in which every request decoded one token without drafts
        (row i of each tensor is request i's): open the round here, before vLLM prepares the drafter's
        inputs. True: the gate skipped the round and its rows are kept (no drafts, nothing for vLLM to
        prepare); False: the round goes on through vLLM's path, and :meth:`propose` takes the action
        chosen here."""
        if self.gate is None:
            return False
        action = self._open_round(cad, None, num_speculative_tokens, cad.batch_size(), sampling_metadata)
        if action == SKIP_ROUND and self._keep_decode_rows(sampled_token_ids, positions, target_hidden_states, cad):
            self.last_tree = None
            return True
        self._opened_action = action
        return False

    def _keep_decode_rows(self, token_ids: torch.Tensor, positions: torch.Tensor, target_hidden_states: torch.Tensor,
                          cad: CommonAttentionMetadata) -> bool:
        """Keep a skipped round in which request i had one new token (row i of the first ``batch``
        rows: the token the target sampled, its position, the target's hidden states, its slot) as
        one batch record; False when the kept rows do not allow it (:meth:`SkippedTokens.stash_decode`)."""
        batch_size = cad.batch_size()
        return self.skipped.stash_decode(self.model_runner.input_batch.req_ids[:batch_size],
                                         token_ids[:batch_size].to(self.input_ids.dtype), positions[:batch_size],
                                         target_hidden_states[:batch_size], cad.slot_mapping[:batch_size])

    def _keep_rows_through_catch_up(self, next_token_ids: torch.Tensor, target_positions: torch.Tensor,
                                    target_hidden_states: torch.Tensor, cad: CommonAttentionMetadata) -> bool:
        """A round the gate skipped runs call 1 only for a prefill chunk's drafter KV: the requests
        with kept rows keep them, and keep this round's row after them (its KV, written now over
        the holes, is written again when they catch up), instead of every kept row of the batch
        going through the drafter at each arrival. True when so (call 1 then splices nothing in);
        False (call 1 brings every kept row in, as a drafting round does) when some request with
        kept rows has more than one new row or the kept rows would fill half the drafter's buffers."""
        if not self.skipped:
            return False
        batch_size = cad.batch_size()
        if not self.skipped.has_room(batch_size):
            return False
        req_ids = self.model_runner.input_batch.req_ids[:batch_size]
        starts = cad.query_start_loc_cpu[: batch_size + 1]
        lengths = (starts[1:] - starts[:-1]).tolist()
        rows = [row for row, req_id in enumerate(req_ids) if req_id in self.skipped.next_position]
        if not rows or any(lengths[row] != 1 for row in rows):
            return False
        index = starts[rows].to(target_positions.device)
        select = torch.tensor(rows, dtype=torch.long, device=next_token_ids.device)
        kept = self.skipped.stash_decode([req_ids[row] for row in rows],
                                         next_token_ids.index_select(0, select).to(self.input_ids.dtype),
                                         target_positions.index_select(0, index),
                                         target_hidden_states.index_select(0, index.to(target_hidden_states.device)),
                                         cad.slot_mapping.index_select(0, index.to(cad.slot_mapping.device)))
        if kept:
            self.skipped.rounds_kept_through_catch_up += 1
        return kept

    def _open_round(self, cad: CommonAttentionMetadata, token_indices_to_sample: torch.Tensor | None,
                    num_speculative_tokens: int, num_rows: int, sampling_metadata: Any) -> str:
        """Drop the kept rows of requests that are gone, report the engine step that just ended to
        the gate, then choose this round's action.

        The step is measured from the previous round's start to this one's, and counted only when
        it had the same requests, all in decode (a prefill chunk would charge its cost to an arm).
        A round the gate skips still writes the drafter's KV of its rows (``CATCH_UP_ROUND``: K/V
        projections only, no drafts) when it carries a prefill chunk (prompt blocks are shared
        through the prefix cache), or when the rows kept for the catch-up would no longer fit the
        drafter's buffers."""
        if self.skipped:
            self.skipped.forget(self.model_runner.requests)
        sampling = not getattr(sampling_metadata, "all_greedy", True)
        now = self.clock()
        batch_size = cad.batch_size()
        action, cap = DRAFT_ROUND, self.max_depth
        if self.gate is not None:
            decode_only = cad.max_query_len <= num_speculative_tokens + 1
            if self._last_round is not None:
                start, last_batch_size, last_action, last_cap, caught_up_before, last_sampling = self._last_round
                if (last_batch_size == batch_size and last_sampling == sampling and decode_only
                        and last_action != CATCH_UP_ROUND):
                    drafted = None
                    if token_indices_to_sample is None:  # one token per request
                        emitted = [1] * batch_size
                    else:  # (request i's rows: its verified drafts after the token before them)
                        starts = cad.query_start_loc_cpu[: batch_size + 1]
                        emitted = (token_indices_to_sample.to("cpu")[:batch_size] - starts[:-1] + 1).tolist()
                        if self.tree_config is None and last_cap in self.gate.own_arms:
                            drafted = (starts[1:] - starts[:-1] - 1).tolist()  # the policy's cut chains
                    # a round whose call 1 caught up on more than one skipped round per request
                    # paid for the skipped rounds too: not a measurement of its arm
                    typical = self.skipped.rows_caught_up - caught_up_before <= batch_size
                    self.gate.observe(batch_size, last_cap, now - start, emitted, typical=typical, sampling=sampling,
                                      drafted=drafted)
            cap = self.gate.decide(batch_size, sampling)
            if cap == 0:
                action = SKIP_ROUND if decode_only and self.skipped.has_room(num_rows) else CATCH_UP_ROUND
        depth, self._round_tree_size = round_shape(cap, self.max_depth, self.tree_sizes)
        self._depth_cap = max(depth, 1)
        self._last_round = (now, batch_size, action, cap, self.skipped.rows_caught_up, sampling)
        self.round_counts[action] += 1
        return action

    def _skip_round(self, num_speculative_tokens: int, target_token_ids: torch.Tensor,
                    target_positions: torch.Tensor, target_hidden_states: torch.Tensor, next_token_ids: torch.Tensor,
                    token_indices_to_sample: torch.Tensor | None, cad: CommonAttentionMetadata,
                    num_rejected_tokens_gpu: torch.Tensor | None) -> torch.Tensor:
        """A round without drafts: keep call 1's rows for the catch-up, return no draft tokens."""
        batch_size = cad.batch_size()
        output = _padding(batch_size, num_speculative_tokens, target_token_ids.device)
        # One new token per request (so nothing verified, nothing rejected): its drafter row is what
        # vLLM's first pass would write, (sampled token, position, hidden state, slot); kept for the
        # whole batch at once, combined by the drafter's input layer when a round drafts again.
        if (target_token_ids.shape[0] == batch_size and cad.max_query_len == 1
                and self._keep_decode_rows(next_token_ids, target_positions, target_hidden_states, cad)):
            return output
        self.skipped.materialize(self.model.combine_hidden_states)
        hidden = self.model.combine_hidden_states(target_hidden_states)
        _, sample_indices, cad = super().set_inputs_first_pass(  # the plain first pass: no catch-up here
            target_token_ids=target_token_ids, next_token_ids=next_token_ids, target_positions=target_positions,
            target_hidden_states=hidden, token_indices_to_sample=token_indices_to_sample, cad=cad,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu)
        self.skipped.stash(self.model_runner.input_batch.req_ids, cad, sample_indices, self.input_ids,
                           self.positions, self.hidden_states)
        return output

    def set_inputs_first_pass(self, target_token_ids: torch.Tensor, next_token_ids: torch.Tensor,
                              target_positions: torch.Tensor, target_hidden_states: torch.Tensor,
                              token_indices_to_sample: torch.Tensor | None, cad: CommonAttentionMetadata,
                              num_rejected_tokens_gpu: torch.Tensor | None) -> tuple[int, torch.Tensor, Any]:
        # vLLM's first pass, then the rows of this batch's skipped rounds in front of each request's.
        num_tokens, sample_indices, cad = super().set_inputs_first_pass(
            target_token_ids=target_token_ids, next_token_ids=next_token_ids, target_positions=target_positions,
            target_hidden_states=target_hidden_states, token_indices_to_sample=token_indices_to_sample, cad=cad,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu)
        if self.skipped and self._splice_kept:
            self.skipped.materialize(self.model.combine_hidden_states)
            num_tokens, sample_indices, cad = self.skipped.splice(
                self.model_runner.input_batch.req_ids, num_tokens, sample_indices, cad, self.input_ids,
                self.positions, self.hidden_states)
        return num_tokens, sample_indices, cad

    @torch.inference_mode()
    def dummy_run(self, num_tokens: int, use_cudagraphs: bool = True, is_graph_capturing: bool = False,
                  slot_mappings: dict[str, torch.Tensor] | None = None) -> None:
        # The stock warm-up runs the draft calls; add the policy steps of a full-depth round.
        super().dummy_run(num_tokens, use_cudagraphs, is_graph_capturing, slot_mappings)
        if self.policy_runner is None:
            return
        batch_size = max(1, min(num_tokens, self.max_batch_size))
        device = self.positions.device
        growth = ChainGrowth(batch_size, self.max_depth, self.state_size, device)
        logits = torch.zeros(batch_size, max(self.state_size, 2), device=device)
        growth.start(logits)
        for runner in (self.policy_runner, self.sampled_policy_runner):
            if runner is not None:
                runner.begin_round(batch_size)
        self._round_runners = tuple(r for r in (self.policy_runner, self.sampled_policy_runner) if r is not None)
        self._sampling_rows = torch.arange(batch_size, device=device) % 2 == 1  # both policies warm up
        active = torch.ones(batch_size, dtype=torch.bool, device=device)
        for _ in range(1, self.max_depth):
            active = self._decide(growth, active)
        self.stop_monitor.begin_round()


class _FrontierState:
    """Bookkeeping of one tree round's frontier passes: where every frontier node's path lives.

    Row ``f`` of request ``b`` in call ``d`` attends to the draft layer's cached context and to its
    own path (one node per earlier call). The path's K/V are kept by the attention layers per call
    (:class:`DraftFrontierPlan` history); ``anc_pass`` / ``anc_rows`` [batch, top_k, depth] say,
    for every frontier slot, which call and which row of it holds each path node.
    """

    def __init__(self, proposer: RadarProposer, cad: Any, positions: torch.Tensor, batch_size: int,
                 depth_limit: int) -> None:
        self.proposer = proposer
        self.batch_size = batch_size
        self.top_k = proposer.tree_config.top_k
        self.base_positions = positions.long().cpu()  # [batch] position of the row before depth 1
        self.block_table = cad.block_table_tensor[:batch_size].cpu()
        self.anc_pass = torch.zeros(batch_size, self.top_k, max(depth_limit - 1, 1), dtype=torch.long)
        self.anc_rows = torch.zeros_like(self.anc_pass)
        self.plan = DraftFrontierPlan(rounds=[])
        runner = proposer.model_runner
        mask = getattr(runner, "discard_request_mask", None)  # partial prefill chunks draft nothing
        self.drafting = (torch.ones(batch_size, dtype=torch.bool) if mask is None
                         else ~torch.from_numpy(mask.np[:batch_size].copy()).bool())
        self.no_slots = {name: torch.full((batch_size * self.top_k,), -1, dtype=torch.long)
                         for name in proposer._draft_attn_layer_names}
        # the tree runner's scratch pool (free while drafting: verification is over), when its
        # blocks are the drafter's kernel blocks: one kernel call per pass instead of one per slot
        scratch = getattr(runner, "_scratch_blocks", None) or []
        same_blocks = getattr(runner, "_kernel_block_size", 0) == proposer.block_size
        self.scratch_blocks = scratch if same_blocks else []

    def run(self, depth: int, tokens: torch.Tensor, parent_hidden: torch.Tensor, per_layer_metadata: dict,
            parent_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        proposer, batch, top_k = self.proposer, self.batch_size, self.top_k
        if depth > 2:  # the frontier slots of the last call grew from these rows of the call before
            slots = parent_slots.cpu()
            gather = slots.unsqueeze(-1).expand_as(self.anc_pass)
            self.anc_pass = self.anc_pass.gather(1, gather)
            self.anc_rows = self.anc_rows.gather(1, gather)
            self.anc_pass[:, :, depth - 3] = depth - 3
            self.anc_rows[:, :, depth - 3] = torch.arange(batch).unsqueeze(1) * top_k + slots
        if self.scratch_blocks:
            self.plan.rounds = frontier_scratch_rounds(depth, self.base_positions, self.block_table, self.anc_pass,
                                                       self.anc_rows, self.drafting, proposer.block_size,
                                                       proposer.max_model_len, self.scratch_blocks)
        else:
            self.plan.rounds = frontier_rounds(depth, self.base_positions, self.block_table, self.anc_pass,
                                               self.anc_rows, self.drafting, proposer.block_size,
                                               proposer.max_model_len)
        self.plan.kernel_metadata = {}
        num_rows = batch * top_k
        model_kwargs = {"input_ids": tokens.reshape(num_rows).int(),
                        "positions": (self.base_positions + depth - 1).repeat_interleave(top_k).to(
                            proposer.positions.dtype),
                        "inputs_embeds": None,
                        "hidden_states": parent_hidden.reshape(num_rows, -1).contiguous()}
        with set_forward_context(with_plan(per_layer_metadata, self.plan), proposer.vllm_config, num_tokens=num_rows,
                                 slot_mapping=self.no_slots):
            return proposer.model(**model_kwargs)


__all__ = ["RadarProposer", "tree_eligible"]
