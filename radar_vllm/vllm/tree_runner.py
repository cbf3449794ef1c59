"""vLLM's CPU model runner, verifying RADAR draft trees (greedy and sampled).

One speculative step of a batch, on top of vLLM's V1 runner (see docs/design.md):

1. drafts: :class:`~radar_vllm.vllm.proposer.RadarProposer` proposes a ``DraftTree`` per request;
   the runner keeps it by request id (``propose_draft_token_ids``);
2. positions: ``_prepare_inputs`` sets each scheduled node's position to context + depth and
   builds the verify plan for the nodes that are not causal-exact (the scheduler may have cut
   the drafts to a prefix: the kept prefix is a tree);
3. attention: ``_model_forward`` puts the plan into the target forward's attention metadata
   (rows recomputed in the requests' own slots or over scratch blocks, see
   :mod:`radar_vllm.vllm.attention`);
4. acceptance: ``_sample`` runs vLLM's sampler (chains and non-tree requests keep its exact
   semantics; a step in which every request verifies a greedy tree skips it), then replaces the
   rows of tree requests by greedy / lossless tree acceptance
   (:func:`radar_vllm.core.verify.accept_trees`: the greedy requests in one batched walk, each
   sampling request with its own temperature, top-p, top-k and seeded generator);
5. compaction: the accepted path's K/V are rewritten right after the root in every target layer;
6. restart: the segment rows of input ids, positions and EAGLE-3 aux hidden states are permuted
   to ``[root, accepted path, rejected]`` (one index copy for the batch), so vLLM's padded first
   draft pass restarts the drafter from the accepted path only (its draft-layer K/V land in the
   right slots by construction);
7. metrics: ``take_draft_token_ids`` hands the scheduler each request's stop depth with its drafts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm.forward_context import get_forward_context
from vllm.v1.outputs import SamplerOutput

from radar_vllm.core.tree import DraftTree, is_chain, segment_positions
from radar_vllm.core.verify import OUTPUT_PADDING, accept_trees, compaction_moves, output_rows, restart_order
from radar_vllm.vllm.attention import (
    TreeVerifyPlan,
    check_backend,
    compact,
    compact_from_scratch,
    max_scratch_blocks_per_job,
    path_rounds,
    scratch_compaction,
    scratch_rounds,
)
from radar_vllm.vllm.engine_plan import scratch_block_count, scratch_block_ids
from radar_vllm.vllm.stats import RadarDraftTokenIds
from radar_vllm.vllm.worker import RadarCPUModelRunner

logger = logging.getLogger(__name__)

NO_STOP_DEPTH = 0  # a request without a drafted tree this step (not counted in the metrics)


@dataclass
class _StepTrees:
    """Trees verified in the current step."""

    requests: list[tuple[int, int, int]] = field(default_factory=list)  # (batch index, first row, context)
    tree: DraftTree | None = None  # the verified trees, one per entry of ``requests``
    plan: TreeVerifyPlan | None = None
    aux_hidden_states: list[torch.Tensor] | None = None


class RadarTreeCPUModelRunner(RadarCPUModelRunner):
    def __init__(self, vllm_config: Any, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        if self.uses_mrope:
            raise ValueError("RADAR tree verification sets 1-D RoPE positions; M-RoPE targets are not supported")
        # the last proposal: its trees and each request's row in them
        self._proposal: tuple[DraftTree, dict[str, int]] | None = None
        self._chain_round = False  # the last proposal was chains from vLLM's loop, not trees
        self._step: _StepTrees | None = None
        # scratch KV blocks for path recomputation (kernel block ids) and the kernel block size;
        # empty: recompute one node per request per kernel call in the request's own slots
        self._scratch_blocks: list[int] = []
        self._kernel_block_size = 0
        # counters over the engine's life: steps that verified trees, those of them sampled by tree
        # acceptance alone (no vLLM sampler), tree verifications, nodes, accepted draft tokens,
        # compacted rows, recomputed (path) rows, kernel calls per layer that recomputed them,
        # accepted paths that left the first branch, those compacted by copying scratch blocks
        self.tree_stats = {"steps": 0, "own_sampling": 0, "trees": 0, "nodes": 0, "accepted": 0, "moved": 0,
                           "path_rows": 0, "path_rounds": 0, "off_spine": 0, "block_compactions": 0}
        # tests: when True, every tree verification records (exact law of the accepted length,
        # realized accepted length)
        self.record_acceptance = False
        self.acceptance_records: list[tuple[list[float], int]] = []

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        from vllm.model_executor.layers.attention.attention import Attention

        check_backend([layer for layer in self.compilation_config.static_forward_context.values()
                       if isinstance(layer, Attention)])

    def initialize_kv_cache(self, kv_cache_config: Any, *args: Any, **kwargs: Any) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        num_blocks = int(self.kv_cache_config.num_blocks)
        # Same call as the scheduler's, so the blocks it hid are exactly the ones used here.
        count = scratch_block_count(self.vllm_config, num_blocks, len(self.kv_cache_config.kv_cache_groups))
        kernel_block_sizes = getattr(self, "_kernel_block_sizes", None) or [self.cache_config.block_size]
        self._kernel_block_size = int(kernel_block_sizes[0])
        per_manager_block = int(self.cache_config.block_size) // self._kernel_block_size
        blocks = scratch_block_ids(num_blocks, count, per_manager_block) if count else []
        needed = max_scratch_blocks_per_job(max(self.drafter.num_speculative_tokens, 1), self._kernel_block_size)
        if blocks and len(blocks) < needed:  # excluded by engine_plan.min_scratch_blocks
            raise RuntimeError(f"RADAR tree verification: {len(blocks)} scratch blocks, a path needs {needed}")
        self._scratch_blocks = blocks
        if blocks:
            logger.info("RADAR tree verification: %d scratch blocks of %d tokens", len(blocks), self._kernel_block_size)

    # ------------------------------------------------------------------ drafts

    def propose_draft_token_ids(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        drafts = super().propose_draft_token_ids(scheduler_output, *args, **kwargs)
        tree = self.drafter.last_tree
        self._proposal = None if tree is None else (
            tree, {req_id: row for row, req_id in enumerate(self.input_batch.req_ids[: tree.batch_size])})
        self._chain_round = tree is None  # vLLM's loop drafted chains (a fixed-depth arm of the gate)
        return drafts

    def _proposed(self, req_id: str, draft_ids: list[int]) -> tuple[DraftTree, int] | None:
        """The proposal's tree and row for ``req_id`` when ``draft_ids`` are (a prefix of) its nodes."""
        if self._proposal is None or req_id not in self._proposal[1]:
            return None
        tree, rows = self._proposal
        row = rows[req_id]
        n = len(draft_ids)
        if n > int(tree.num_nodes[row]) or tree.target_tokens[row, :n].tolist() != [int(t) for t in draft_ids]:
            return None
        return tree, row

    def take_draft_token_ids(self) -> Any:
        """vLLM's drafts plus each request's stop depth, for RADAR's tree-mode metrics."""
        drafts = super().take_draft_token_ids()
        if drafts is None:
            return None
        # Only drafts that are the drafted tree's tokens carry its stop depth: vLLM replaces the whole
        # batch's drafts by zeros when the drafter cannot run (near max_model_len).
        # A chain drafted by vLLM's loop took one draft call per token.
        chain_round, self._chain_round = self._chain_round, False
        stop_depths = []
        for req_id, ids in zip(drafts.req_ids, drafts.draft_token_ids):
            kept = [t for t in ids if t >= 0]
            if chain_round:
                stop_depths.append(len(kept) or NO_STOP_DEPTH)
                continue
            found = self._proposed(req_id, kept)
            stop_depths.append(int(found[0].stop_depth[found[1]]) if found else NO_STOP_DEPTH)
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
        rows, counts, segments = [], [], []
        query_start = self.query_start_loc.np
        for req_id, draft_ids in spec_tokens.items():
            index = self.input_batch.req_id_to_index[req_id]
            num_nodes = len(draft_ids)
            found = self._proposed(req_id, draft_ids)
            if found is None or num_nodes == 0 or int(num_scheduled_tokens[index]) != num_nodes + 1:
                continue
            parents = found[0].parents[found[1], :num_nodes].tolist()  # the kernel boundary: plain lists
            if is_chain(parents):  # vLLM's sampler verifies chains
                continue
            first_row = int(query_start[index])
            context_len = int(self.input_batch.num_computed_tokens_cpu[index])
            self.positions[first_row : first_row + num_nodes + 1] = torch.tensor(
                segment_positions(context_len, parents), dtype=self.positions.dtype, device=self.positions.device)
            step.requests.append((index, first_row, context_len))
            rows.append(found[1])
            counts.append(num_nodes)
            segments.append((index, first_row, context_len, parents))
        if not segments:
            return result
        step.tree = self._proposal[0].select(rows).truncate(torch.tensor(counts))
        if self._scratch_blocks:
            rounds = scratch_rounds(segments, self._kernel_block_size, self._scratch_blocks)
        else:
            rounds = path_rounds(segments)
        node_rows = [first_row + 1 + i for (_, first_row, _, parents) in segments for i in range(len(parents))]
        step.plan = TreeVerifyPlan(rounds=rounds, node_rows=torch.tensor(node_rows, dtype=torch.long))
        self.tree_stats["steps"] += 1
        self.tree_stats["path_rows"] += sum(int(r.query_rows.numel()) for r in rounds)
        self.tree_stats["path_rounds"] += len(rounds)
        self._step = step
        return result

    def _model_forward(self, *args: Any, **kwargs: Any) -> Any:
        step = self._step
        if step is None or step.plan is None:
            return super()._model_forward(*args, **kwargs)
        metadata = get_forward_context().attn_metadata
        groups = {id(m): m for m in (metadata.values() if isinstance(metadata, dict) else [])}
        for group in groups.values():
            group.tree_plan = step.plan
        try:
            output = super()._model_forward(*args, **kwargs)
        finally:
            for group in groups.values():
                group.tree_plan = None
        if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], list):
            step.aux_hidden_states = output[1]
        return output

    # ------------------------------------------------------------------ acceptance

    def _sample(self, logits: torch.Tensor | None, spec_decode_metadata: Any) -> Any:
        step, self._step = self._step, None
        if step is None or spec_decode_metadata is None or logits is None:
            return super()._sample(logits, spec_decode_metadata)
        metadata = self.input_batch.sampling_metadata
        if metadata.all_greedy and len(step.requests) == self.input_batch.num_reqs:
            # every request verifies a greedy tree, whose acceptance below writes its whole row:
            # vLLM's rejection sampler (copies of every draft row's logits) would be thrown away.
            # (Steps that sample keep it: its bonus draws advance the requests' random streams.)
            # What vLLM's _sample does before sampling (pinned: worker.UPSTREAM_SHA256):
            self.input_batch.update_async_output_token_ids()
            self.tree_stats["own_sampling"] += 1
            sampler_output = SamplerOutput(
                sampled_token_ids=torch.full((self.input_batch.num_reqs, spec_decode_metadata.max_spec_len + 1),
                                             OUTPUT_PADDING, dtype=torch.int32, device=logits.device),
                logprobs_tensors=None)
        else:
            sampler_output = super()._sample(logits, spec_decode_metadata)
        cu_sampled = spec_decode_metadata.cu_num_sampled_tokens.tolist()
        indices = [index for index, _, _ in step.requests]
        num_nodes = step.tree.num_nodes.tolist()

        def per_request(values: Any, convert: Any) -> list[Any]:
            return [None] * len(indices) if values is None else [convert(values[index]) for index in indices]

        temperatures = ([0.0] * len(indices) if metadata.all_greedy or metadata.temperature is None
                        else per_request(metadata.temperature, float))
        # (top-p 1 is no nucleus cut: it would only drop float-rounding tails)
        top_ps = [None if p is None or p >= 1.0 else p for p in per_request(metadata.top_p, float)]
        result, laws = accept_trees(
            step.tree, logits, [cu_sampled[index] - (n + 1) for index, n in zip(indices, num_nodes)], temperatures,
            top_ps, per_request(metadata.top_k, int), [metadata.generators.get(index) for index in indices],
            with_law=self.record_acceptance)
        output_rows(indices, result, sampler_output.sampled_token_ids)
        counts = result.num_accepted.tolist()
        paths = result.accepted_nodes.tolist()
        from_scratch = step.plan.compacts_from_scratch
        move_sources: list[int] = []
        move_destinations: list[int] = []
        moved_paths: list[tuple[int, int, int]] = []  # compaction from scratch: see scratch_compaction
        restart_rows: list[int] = []
        restart_sources: list[int] = []
        restart_positions: list[int] = []
        node_offset = 0
        for i, (_, first_row, context_len) in enumerate(step.requests):
            accepted = paths[i][: counts[i]]
            if laws is not None:
                self.acceptance_records.append((laws[i].tolist(), counts[i]))
            moves = compaction_moves(first_row, accepted)
            if moves and from_scratch:
                moved_paths.append((first_row + 1 + accepted[-1], context_len, len(accepted)))
            else:
                for source_row, destination_row in moves:
                    move_sources.append(node_offset + (source_row - first_row - 1))
                    move_destinations.append(destination_row)
            # restart: the segment's rows become [root, accepted path, rejected], positions in order
            restart_rows += range(first_row, first_row + num_nodes[i] + 1)
            restart_sources += [first_row + row for row in restart_order(num_nodes[i], accepted)]
            restart_positions += range(context_len, context_len + num_nodes[i] + 1)
            self.tree_stats["trees"] += 1
            self.tree_stats["nodes"] += num_nodes[i]
            self.tree_stats["accepted"] += len(accepted)
            self.tree_stats["moved"] += len(moves)
            self.tree_stats["off_spine"] += int(bool(moves))
            node_offset += num_nodes[i]
        if from_scratch:
            if moved_paths:
                compact_from_scratch(step.plan, *scratch_compaction(step.plan, self._kernel_block_size, moved_paths))
                self.tree_stats["block_compactions"] += len(moved_paths)
        else:
            compact(step.plan, torch.tensor(move_sources, dtype=torch.long),
                    torch.tensor(move_destinations, dtype=torch.long))
        self._restart(step, restart_rows, restart_sources, restart_positions)
        return sampler_output

    def _restart(self, step: _StepTrees, rows: list[int], sources: list[int], positions: list[int]) -> None:
        """Every tree segment's rows of input ids and aux hidden states take those of ``sources``
        (root, accepted path, rejected), and positions ``positions`` (in order from the context)."""
        if not rows:
            return
        rows_index = torch.tensor(rows, dtype=torch.long)
        order = torch.tensor(sources, dtype=torch.long)
        input_ids = self.input_ids.gpu
        input_ids[rows_index] = input_ids[order.to(input_ids.device)]
        self.positions[rows_index] = torch.tensor(positions, dtype=self.positions.dtype, device=self.positions.device)
        for hidden in step.aux_hidden_states or []:
            hidden[rows_index.to(hidden.device)] = hidden[order.to(hidden.device)]
