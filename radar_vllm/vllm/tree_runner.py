"""vLLM CPU model runner and worker that verify RADAR draft trees (greedy and sampled).

One speculative step of a batch, on top of vLLM's V1 runner (numbers refer to issue 7):

1. drafts: :class:`~radar_vllm.vllm.tree_drafter` proposes ``[batch, max_nodes]`` trees; the
   runner keeps each request's parents by request id (``propose_draft_token_ids``);
2. positions: ``_prepare_inputs`` sets each scheduled node's position to context + depth and
   builds the attention plan for the nodes that are not causal-exact (the scheduler may have cut
   the drafts to a prefix: the kept prefix is a tree);
3. attention: ``_model_forward`` activates the plan for the target forward only (recomputed rows
   run in the requests' own slots or, opt-in, over scratch KV blocks, see :mod:`radar_vllm.vllm.scratch`);
4. acceptance: ``_sample`` runs vLLM's sampler (chains and non-tree requests keep its exact
   semantics), then replaces the rows of tree requests by greedy / lossless tree acceptance
   (per-request temperature, top-p, top-k and seeded generator; requests with penalties,
   logprobs, bad words, logit bias, min_tokens/min_p, structured output or custom logits
   processors were drafted as chains and keep vLLM's result);
5. compaction: the accepted path's K/V are rewritten right after the root in every target layer;
6. restart: the segment rows of input ids, positions and EAGLE-3 aux hidden states are permuted
   to ``[root, accepted path, rejected]``, so vLLM's padded first draft pass restarts the drafter
   from the accepted path only (its draft-layer K/V land in the right slots by construction);
7. metrics: ``take_draft_token_ids`` hands the scheduler each request's stop depth with its drafts
   (:class:`radar_vllm.vllm.stats.RadarDraftTokenIds`, see :mod:`radar_vllm.vllm.metrics`).

Tree settings without a RADAR checkpoint: environment variable ``RADAR_TREE`` = JSON
``{"top_k": 4, "max_depth": 4, "policy": DIR, "threshold": 0.5, "drafter": "frontier"}`` (policy
optional: without it every request drafts max_depth levels; drafter "frontier" grows EAGLE-2
trees, "spine" the one-row-per-pass trees of :mod:`radar_vllm.vllm.tree_drafter`); ``num_speculative_tokens`` is the node budget
(total_tokens - 1). Selected with ``worker_cls="radar_vllm.vllm.tree_runner.RadarTreeCPUWorker"``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import torch

from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner, _torch_cuda_wrapper
from vllm.v1.worker.cpu_worker import CPUWorker

from radar_vllm.vllm.attention import TreeVerifyPlan, active_plan, compact, install_tree_attention
from radar_vllm.vllm.scratch import scratch_block_count, scratch_block_ids
from radar_vllm.vllm.stats import RadarDraftTokenIds
from radar_vllm.vllm.tree_drafter import DraftedTree, tree_proposer_class
from radar_vllm.vllm.tree_verify import (
    TreeRequest,
    accept_tree,
    compaction_moves,
    cut_tree,
    is_chain,
    max_scratch_blocks_per_job,
    output_rows,
    path_rounds,
    restart_order,
    scratch_rounds,
    segment_positions,
)

logger = logging.getLogger(__name__)

TREE_ENV = "RADAR_TREE"
ORACLE_ENV = "RADAR_TREE_ORACLE"  # test-only drafter, see radar_vllm.vllm.tree_oracle
DRAFTERS = ("frontier", "spine")
NO_STOP_DEPTH = 0  # a request without a drafted tree this step (not counted in the metrics)
DEFAULT_TREE: dict[str, Any] = {"top_k": 4, "max_depth": 4, "policy": None, "threshold": None, "decision": None,
                                "drafter": "frontier"}


def tree_settings_from_env() -> dict[str, Any]:
    """Tree settings from ``RADAR_TREE`` (JSON): top_k, max_depth, and optionally a stop-policy
    checkpoint path with its decision mode and threshold (without a policy every request drafts
    max_depth levels)."""
    settings = dict(DEFAULT_TREE)
    text = os.environ.get(TREE_ENV)
    if text:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{TREE_ENV} must be a JSON object, got {text!r}")
        unknown = set(data) - set(DEFAULT_TREE)
        if unknown:
            raise ValueError(f"{TREE_ENV}: unknown keys {sorted(unknown)}; allowed {sorted(DEFAULT_TREE)}")
        settings.update(data)
    for key in ("top_k", "max_depth"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{TREE_ENV}.{key} must be an integer >= 1, got {value!r}")
    if settings["drafter"] not in DRAFTERS:
        raise ValueError(f"{TREE_ENV}.drafter must be one of {DRAFTERS}, got {settings['drafter']!r}")
    if settings["policy"] is not None and not isinstance(settings["policy"], str):
        raise ValueError(f"{TREE_ENV}.policy must be a path string, got {settings['policy']!r}")
    return settings


def tree_settings(vllm_config: Any) -> dict[str, Any]:
    """A RADAR checkpoint's settings (mode "tree") when RADAR is selected, else ``RADAR_TREE``."""
    from radar_vllm.vllm.selection import is_radar, radar_settings

    if not is_radar(vllm_config):
        return tree_settings_from_env()
    radar = radar_settings(vllm_config)
    return {
        "top_k": radar.config.top_k,
        "max_depth": radar.config.max_depth,
        "policy": str(radar.policy_path),
        "threshold": radar.threshold,
        "decision": radar.decision,
        "drafter": "frontier",
    }


def make_policy_runner(settings: dict[str, Any], max_batch_size: int, device: torch.device) -> Any:
    """The stop policy's batched runner, or None for fixed-depth trees."""
    if settings.get("policy") is None:
        return None
    from radar_vllm.core.policy import PolicyRunner, load_policy

    policy = load_policy(settings["policy"], device=device)
    return PolicyRunner(policy, max_batch_size=max_batch_size, device=device,
                        decision=settings.get("decision"), threshold=settings.get("threshold"))


class _StepTrees:
    """Trees verified in the current step."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, int, int, list[int], list[int]]] = []  # (batch idx, first row, C, parents, tokens)
        self.plan: TreeVerifyPlan | None = None
        self.aux_hidden_states: list[torch.Tensor] | None = None


class RadarTreeCPUModelRunner(CPUModelRunner):
    def __init__(self, vllm_config: Any, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        if self.uses_mrope:
            raise ValueError("RADAR tree verification sets 1-D RoPE positions; M-RoPE targets are not supported")
        if self.use_async_scheduling:
            raise ValueError("RADAR tree verification needs synchronous scheduling; pass --no-async-scheduling")
        settings = tree_settings(vllm_config)
        proposer_class = tree_proposer_class()
        if os.environ.get(ORACLE_ENV):
            from radar_vllm.vllm.tree_oracle import make_oracle_class

            proposer_class = make_oracle_class()
            logger.warning("RADAR tree runner: test oracle drafter enabled by %s", ORACLE_ENV)
        with _torch_cuda_wrapper():
            self.drafter = proposer_class(
                vllm_config, self.device, self, top_k=settings["top_k"], max_depth=settings["max_depth"],
                frontier=settings["drafter"] == "frontier",
            )
            self.drafter.policy_runner = make_policy_runner(settings, self.drafter.max_batch_size, self.device)
            if self.drafter.policy_runner is not None:
                self.drafter.policy_top_k = self.drafter.policy_runner.config.state_size
        self._trees: dict[str, DraftedTree] = {}
        self._step: _StepTrees | None = None
        # scratch KV blocks for path recomputation (kernel block ids) and the kernel block size;
        # empty: recompute one node per request per kernel call in the request's own slots
        self._scratch_blocks: list[int] = []
        self._kernel_block_size = 0
        # counters over the engine's life: tree verifications, accepted draft tokens, compacted rows,
        # recomputed (path) rows, kernel calls per layer that recomputed them, accepted paths that left the first branch
        # (drafter.stop_depth_counts has the draft calls per round; nodes / trees = mean tree size)
        self.tree_stats = {"trees": 0, "nodes": 0, "accepted": 0, "moved": 0, "path_rows": 0, "path_rounds": 0,
                           "off_spine": 0}
        # tests: when True, every tree verification records (exact law of the accepted length,
        # realized accepted length)
        self.record_acceptance = False
        self.acceptance_records: list[tuple[list[float], int]] = []
        logger.info("RADAR tree runner: top_k=%d, max_depth=%d, node budget %d, policy %s",
                    settings["top_k"], settings["max_depth"], self.drafter.max_nodes, settings["policy"] or "none")

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        from vllm.model_executor.layers.attention.attention import Attention

        layers = [layer for layer in self.compilation_config.static_forward_context.values()
                  if isinstance(layer, Attention)]
        count = install_tree_attention(layers)
        logger.info("RADAR tree attention installed in %d attention layers", count)

    def initialize_kv_cache(self, kv_cache_config: Any, *args: Any, **kwargs: Any) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        num_blocks = int(self.kv_cache_config.num_blocks)
        # Same call as the scheduler's, so the blocks it hid are exactly the ones used here.
        count = scratch_block_count(self.vllm_config, num_blocks, len(self.kv_cache_config.kv_cache_groups))
        kernel_block_sizes = getattr(self, "_kernel_block_sizes", None) or [self.cache_config.block_size]
        manager_block_size = int(self.cache_config.block_size)
        self._kernel_block_size = int(kernel_block_sizes[0])
        per_manager_block = manager_block_size // self._kernel_block_size
        blocks = scratch_block_ids(num_blocks, count, per_manager_block) if count else []
        needed = max_scratch_blocks_per_job(max(self.drafter.max_nodes, 1), self._kernel_block_size)
        if blocks and len(blocks) < needed:  # excluded by scratch.min_scratch_blocks
            raise RuntimeError(f"RADAR tree verification: {len(blocks)} scratch blocks, a path needs {needed}")
        self._scratch_blocks = blocks
        if blocks:
            logger.info("RADAR tree verification: %d scratch blocks of %d tokens", len(blocks), self._kernel_block_size)

    # ------------------------------------------------------------------ drafts

    def propose_draft_token_ids(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        drafts = super().propose_draft_token_ids(scheduler_output, *args, **kwargs)
        trees = getattr(self.drafter, "last_trees", [])
        self._trees = {req_id: tree for req_id, tree in zip(self.input_batch.req_ids, trees)}
        return drafts

    def take_draft_token_ids(self) -> Any:
        """vLLM's drafts plus each request's stop depth, for RADAR's tree-mode metrics."""
        drafts = super().take_draft_token_ids()
        if drafts is None:
            return None
        # Only drafts that are the drafted tree's tokens carry its stop depth: vLLM replaces the whole
        # batch's drafts by zeros when the drafter cannot run (near max_model_len); no draft call
        # made those.
        stop_depths = []
        for req_id, ids in zip(drafts.req_ids, drafts.draft_token_ids):
            tree = self._trees.get(req_id)
            real = [int(t) for t in ids[: len(tree.tokens)]] if tree is not None else None
            stop_depths.append(tree.stop_depth if real is not None and real == list(tree.tokens) else NO_STOP_DEPTH)
        return RadarDraftTokenIds(req_ids=drafts.req_ids, draft_token_ids=drafts.draft_token_ids,
                                  stop_depths=stop_depths)

    # ------------------------------------------------------------------ positions + plan

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._step = None
        spec_tokens = scheduler_output.scheduled_spec_decode_tokens
        if not spec_tokens:
            return result
        step = _StepTrees()
        query_start = self.query_start_loc.np
        for req_id, draft_ids in spec_tokens.items():
            index = self.input_batch.req_id_to_index[req_id]
            num_nodes = len(draft_ids)
            tree = self._trees.get(req_id)
            if tree is None or num_nodes == 0 or int(num_scheduled_tokens[index]) != num_nodes + 1:
                continue
            if list(tree.tokens[:num_nodes]) != [int(t) for t in draft_ids]:
                logger.debug("request %s: scheduled drafts differ from the proposed tree; verified as a chain", req_id)
                continue
            parents = cut_tree(tree.parents, num_nodes)
            if is_chain(parents):
                continue
            first_row = int(query_start[index])
            context_len = int(self.input_batch.num_computed_tokens_cpu[index])
            positions = segment_positions(context_len, parents)
            self.positions[first_row : first_row + num_nodes + 1] = torch.tensor(
                positions, dtype=self.positions.dtype, device=self.positions.device)
            step.requests.append((index, first_row, context_len, parents, list(tree.tokens[:num_nodes])))
        if step.requests:
            segments = [(index, first_row, context_len, parents)
                        for index, first_row, context_len, parents, _ in step.requests]
            if self._scratch_blocks:
                rounds = scratch_rounds(segments, self._kernel_block_size, self._scratch_blocks)
            else:
                rounds = path_rounds(segments)
            node_rows = [first_row + 1 + i for _, first_row, _, parents, _ in step.requests for i in range(len(parents))]
            step.plan = TreeVerifyPlan(rounds=rounds, node_rows=torch.tensor(node_rows, dtype=torch.long))
            self.tree_stats["path_rows"] += sum(int(r.query_rows.numel()) for r in rounds)
            self.tree_stats["path_rounds"] += len(rounds)
            self._step = step
        return result

    def _model_forward(self, *args: Any, **kwargs: Any) -> Any:
        step = self._step
        if step is None or step.plan is None:
            return super()._model_forward(*args, **kwargs)
        with active_plan(step.plan):
            output = super()._model_forward(*args, **kwargs)
        if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], list):
            step.aux_hidden_states = output[1]
        return output

    # ------------------------------------------------------------------ acceptance

    def _sample(self, logits: torch.Tensor | None, spec_decode_metadata: Any) -> Any:
        sampler_output = super()._sample(logits, spec_decode_metadata)
        step, self._step = self._step, None
        if step is None or spec_decode_metadata is None or logits is None:
            return sampler_output
        metadata = self.input_batch.sampling_metadata
        cu_sampled = spec_decode_metadata.cu_num_sampled_tokens.tolist()
        sampled = sampler_output.sampled_token_ids
        results = []
        node_offset = 0
        move_sources: list[int] = []
        move_destinations: list[int] = []
        for index, first_row, context_len, parents, tokens in step.requests:
            num_nodes = len(parents)
            request = TreeRequest(batch_index=index, first_logit_row=cu_sampled[index] - (num_nodes + 1),
                                  parents=parents, tokens=tokens)
            temperature = 0.0 if metadata.all_greedy or metadata.temperature is None else float(
                metadata.temperature[index])
            top_p = None if metadata.top_p is None else float(metadata.top_p[index])
            if top_p is not None and top_p >= 1.0:
                top_p = None  # no nucleus cut (avoids dropping float-rounding tails)
            top_k = None if metadata.top_k is None else int(metadata.top_k[index])
            result, law = accept_tree(request, logits, temperature, top_p, top_k, metadata.generators.get(index),
                                      with_law=self.record_acceptance)
            results.append((index, result))
            if law is not None:
                self.acceptance_records.append((law.tolist(), int(result.num_accepted[0])))
            accepted = [int(n) for n in result.accepted_nodes[0, : int(result.num_accepted[0])]]
            moves = compaction_moves(first_row, accepted)
            for source_row, destination_row in moves:
                move_sources.append(node_offset + (source_row - first_row - 1))
                move_destinations.append(destination_row)
            self._restart(step, first_row, context_len, num_nodes, accepted)
            self.tree_stats["trees"] += 1
            self.tree_stats["nodes"] += num_nodes
            self.tree_stats["accepted"] += len(accepted)
            self.tree_stats["moved"] += len(moves)
            self.tree_stats["off_spine"] += int(bool(moves))
            node_offset += num_nodes
        output_rows(results, sampled)
        if step.plan is not None:
            compact(step.plan, torch.tensor(move_sources, dtype=torch.long),
                    torch.tensor(move_destinations, dtype=torch.long))
        return sampler_output

    def _restart(self, step: _StepTrees, first_row: int, context_len: int, num_nodes: int, accepted: list[int]) -> None:
        order = torch.tensor(restart_order(num_nodes, accepted), dtype=torch.long) + first_row
        rows = slice(first_row, first_row + num_nodes + 1)
        input_ids = self.input_ids.gpu
        input_ids[rows] = input_ids[order].clone()
        self.positions[rows] = torch.arange(context_len, context_len + num_nodes + 1,
                                            dtype=self.positions.dtype, device=self.positions.device)
        for hidden in step.aux_hidden_states or []:
            hidden[rows] = hidden[order].clone()


class RadarTreeCPUWorker(CPUWorker):
    def init_device(self) -> None:
        stock_runner = cpu_worker.CPUModelRunner
        cpu_worker.CPUModelRunner = RadarTreeCPUModelRunner
        try:
            super().init_device()
        finally:
            cpu_worker.CPUModelRunner = stock_runner


__all__ = ["RadarTreeCPUModelRunner", "RadarTreeCPUWorker", "tree_settings_from_env"]
