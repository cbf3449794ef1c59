"""Tree drafting inside vLLM's EAGLE proposer: EAGLE-2 frontier trees (default) or spine trees.

Both drafters start like vLLM's chain drafter: draft call 1 runs the EAGLE-3 layer over the newly
verified tokens and gives, per request, the log-probs at the root. Per request the stop policy
(state = the ``top_k`` frontier scores) decides after every call whether to draft one more level.

**Frontier trees** (radar-algorithm.md section 1, :class:`radar_vllm.core.tree.DraftTreeBuilder`):
calls 2..D run the ``top_k`` frontier nodes of every request as ``B * top_k`` rows in one forward
of the EAGLE-3 layer. Each frontier row must attend to the draft layer's cached context and to its
own draft ancestors, whose K/V have no slots reserved by vLLM's scheduler (it reserves
``num_speculative_tokens`` lookahead slots per request, not ``top_k`` times that). Design: the
rows' own K/V are not written to the paged cache (slot -1); instead the tree-aware attention
(:class:`radar_vllm.vllm.attention.DraftFrontierPlan`) keeps them in a private dense history for
the round and, for frontier slot ``f`` of every request, writes that node's root-to-node path
into the request's lookahead slots right after the context and runs the platform kernel for the
row as a one-token request. The lookahead slots hold nothing of value during drafting (the next
verify pass rewrites them), so nothing is restored. Same kernel as vLLM's chain passes: with
``top_k = 1`` the drafts equal the stock drafter's exactly (tested).

Worked example, top_k = 2, context ends at position p (the row whose output predicted the root's
children): call 1 -> depth-1 frontier (a, b). Call 2 runs rows [a, b] at position p + 1; row a
sees context + a (a's K/V written at p + 1), row b sees context + b. Builder: children (c, d) of a
and (e, g) of b; the best two, say (c, e), form the new frontier with parent slots (0, 1). Call 3
runs rows [c, e] at position p + 2; row c's path (a from call 2's history, then c) is written at
p + 1, p + 2, and the kernel runs with seq_len = p + 3; then row e with path (b, e).

**Spine trees** (``drafter: "spine"``, a cheaper alternative): every call runs one row per request
(the best token so far, exactly vLLM's chain pass); the other ``top_k - 1`` tokens of each call's
distribution become side branches at that depth. Worked example, top_k = 2, depth 2, max_nodes =
3: call 1 top-2 = (a: -0.1, b: -2.0), spine a; call 2 (after a) top-2 = (c: -0.3, d: -1.0).
Candidates: a -0.1, c -0.4, d -1.1, b -2.0; kept [a, c, d], parents [-1, 0, 0].

Both keep the best ``max_nodes`` nodes by score with parents first, so every prefix of a tree is a
tree (the scheduler may cut drafts to a prefix). Requests whose sampling cannot be verified
exactly over a tree (:func:`tree_eligible`) get a chain instead (the tree's best-first descent),
verified by vLLM's own sampler.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from radar_vllm.core.config import TreeConfig
from radar_vllm.core.tree import NO_PARENT, PADDING_TOKEN

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftedTree:
    """One request's proposal: node parents and tokens (target vocabulary), parents first."""

    parents: tuple[int, ...]
    tokens: tuple[int, ...]
    stop_depth: int = field(default=0, compare=False)  # draft calls of the request's round


def tree_eligible(params: Any, has_custom_logits_processors: bool = False) -> bool:
    """True when a request's sampling can be verified exactly over a tree.

    Penalties, logprobs, bad words, logit bias, allowed-token masks, min_tokens/min_p and
    structured output depend on the chain position or need the stock sampler: those requests
    draft chains instead.
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


def caterpillar_tree(
    # [depth, top_k] per call: log-probs of the call's top_k tokens, descending
    values: Sequence[Sequence[float]],
    # [depth, top_k] token ids (target vocabulary); column 0 is the spine
    tokens: Sequence[Sequence[int]],
    max_nodes: int,
    chain_only: bool = False,
) -> DraftedTree:
    """The kept nodes of one request's spine tree (see the module docstring)."""
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
    candidates = []  # (score, depth, rank, node key)
    prefix = 0.0
    for depth, (row_values, row_tokens) in enumerate(zip(values, tokens), start=1):
        width = 1 if chain_only else len(row_values)
        for rank in range(width):
            score = prefix + min(float(row_values[rank]), 0.0)
            candidates.append((score, depth, rank, int(row_tokens[rank])))
        prefix += min(float(row_values[0]), 0.0)
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    kept = candidates[:max_nodes]
    # A node's parent is the spine node one level up, which is kept whenever the child is
    # (score order); spine nodes have rank 0.
    index_of = {(depth, rank): i for i, (_, depth, rank, _) in enumerate(kept)}
    parents, node_tokens = [], []
    for score, depth, rank, token in kept:
        parent = NO_PARENT if depth == 1 else index_of[(depth - 1, 0)]
        parents.append(parent)
        node_tokens.append(token)
    return DraftedTree(parents=tuple(parents), tokens=tuple(node_tokens), stop_depth=len(values))


def best_chain(parents: Sequence[int], tokens: Sequence[int]) -> tuple[list[int], list[int]]:
    """The chain a tree's best-first descent follows: node 0, then its first child, and so on
    (node order is by score, so each step takes the best-scored child)."""
    chain_tokens: list[int] = []
    current = NO_PARENT
    while True:
        child = next((i for i, p in enumerate(parents) if p == current), None)
        if child is None:
            break
        chain_tokens.append(int(tokens[child]))
        current = child
    return [NO_PARENT] + list(range(len(chain_tokens) - 1)) if chain_tokens else [], chain_tokens


def _make_proposer_class() -> type:
    from vllm.forward_context import set_forward_context
    from vllm.v1.spec_decode.eagle import EagleProposer

    from radar_vllm.core.policy_state import chain_frontier_scores
    from radar_vllm.vllm.proposer import begin_single_token_passes

    class TreeProposer(EagleProposer):
        """EAGLE-3 proposer emitting per-request spine trees ``[batch, max_nodes]`` padded with -1."""

        def __init__(self, vllm_config: Any, device: torch.device, runner: Any, *, top_k: int, max_depth: int,
                     policy_runner: Any = None, policy_top_k: int | None = None, frontier: bool = True) -> None:
            super().__init__(vllm_config, device, runner)
            self.model_runner = runner
            self.max_nodes = self.num_speculative_tokens
            if max_depth > self.max_nodes:
                raise ValueError(
                    f"tree max_depth={max_depth} exceeds num_speculative_tokens={self.max_nodes} (the tree's "
                    f"node budget, total_tokens - 1)"
                )
            if self.uses_mrope or self.parallel_drafting:
                raise ValueError("RADAR trees support plain EAGLE-3 drafting only (no M-RoPE, no parallel drafting)")
            self.top_k = top_k
            self.max_depth = max_depth
            # frontier trees need top_k frontier rows per request in one draft pass
            self.frontier = frontier
            self.policy_runner = policy_runner
            self.policy_top_k = policy_top_k or top_k
            self.chain_logprob = torch.zeros(self.max_batch_size, dtype=torch.float32, device=device)
            self.last_trees: list[DraftedTree] = []
            # [max_depth + 1] rounds per stop depth (draft calls per round), over the engine's life
            self.stop_depth_counts = [0] * (max_depth + 1)
            # tests: set to a list to record every proposed tree
            self.recorded_trees: list[DraftedTree] | None = None
            self.last_eligible: list[bool] = []

        def take_last_draft_probs(self) -> None:
            return None

        def _eligibility(self, batch_size: int) -> list[bool]:
            runner = self.model_runner
            req_ids = runner.input_batch.req_ids[:batch_size]
            custom = bool(getattr(self.vllm_config.model_config, "logits_processors", None))
            return [tree_eligible(getattr(runner.requests.get(r), "sampling_params", None), custom) for r in req_ids]

        def _step_outputs(self, last_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            logits = self.model.compute_logits(last_hidden)  # [batch, vocab]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            values, tokens = torch.topk(logprobs, self.top_k, dim=-1)  # [batch, top_k]
            return logprobs, values, tokens

        def _decide(self, logprobs: torch.Tensor, batch_size: int, first: bool) -> torch.Tensor:
            if self.policy_runner is None:
                return torch.ones(batch_size, dtype=torch.bool, device=logprobs.device)
            prefix = self.chain_logprob[:batch_size]
            if first:
                prefix.zero_()
            scores, next_prefix = chain_frontier_scores(prefix, logprobs, self.policy_top_k)
            prefix.copy_(next_prefix)
            return self.policy_runner.step(scores)

        def _drafting_rows(self, batch: int) -> torch.Tensor:
            """[B] bool: requests whose drafts are used (not a partial prefill chunk); the others
            write nothing (their lookahead slots may not be allocated)."""
            mask = getattr(self.model_runner, "discard_request_mask", None)
            if mask is None:
                return torch.ones(batch, dtype=torch.bool)
            return ~torch.from_numpy(mask.np[:batch].copy()).bool()

        def _frontier_rounds(self, depth: int, base_positions: torch.Tensor, block_table: torch.Tensor,
                             anc_pass: torch.Tensor, anc_rows: torch.Tensor) -> list[Any]:
            """Plan of the pass that runs the depth-``depth - 1`` frontier (see the module docstring)."""
            from radar_vllm.vllm.attention import FrontierRound

            batch, top_k = anc_pass.shape[:2]
            level = depth - 1  # path length of a frontier node, itself included
            current = torch.full((batch, 1), depth - 2, dtype=torch.long)
            offsets = torch.arange(1, level + 1)
            path_positions = base_positions.unsqueeze(1) + offsets  # [B, level]
            limit = self.max_model_len
            inside = (path_positions < limit) & self._drafting_rows(batch).unsqueeze(1)
            block = block_table.gather(1, (path_positions.clamp(max=limit - 1) // self.block_size).long())
            slots = torch.where(inside, block.long() * self.block_size + path_positions % self.block_size, -1)
            seq_lens = (base_positions + 1 + level).clamp(max=limit).to(torch.int32)  # [B]
            rounds = []
            for f in range(top_k):
                rows = torch.arange(batch) * top_k + f
                source_pass = torch.cat([anc_pass[:, f, : level - 1], current], dim=1)  # [B, level]
                source_rows = torch.cat([anc_rows[:, f, : level - 1], rows.unsqueeze(1)], dim=1)
                rounds.append(FrontierRound(
                    query_rows=rows, block_table=block_table, seq_lens=seq_lens,
                    source_pass=source_pass.reshape(-1), source_rows=source_rows.reshape(-1),
                    destination_slots=slots.reshape(-1),
                ))
            return rounds

        def _propose_frontier(self, max_nodes: int, depth_limit: int, eligible: list[bool],
                              base_positions: torch.Tensor, root_hidden: torch.Tensor, root_logprobs: torch.Tensor,
                              cad: Any, attn_metadata: Any) -> torch.Tensor:
            """EAGLE-2 style growth: every pass runs the top_k frontier nodes of every request."""
            from radar_vllm.core.tree import DraftTreeBuilder
            from radar_vllm.vllm.attention import DraftFrontierPlan, active_draft_plan

            batch, top_k, hidden_size = root_hidden.shape[0], self.top_k, root_hidden.shape[-1]
            # node budget capped by what top_k and the depth can grow (a narrow tree uses fewer nodes)
            reachable = top_k * (1 + top_k * (depth_limit - 1))
            config = TreeConfig(top_k=top_k, max_depth=depth_limit, total_tokens=min(max_nodes, reachable) + 1)
            builder = DraftTreeBuilder(config, batch, device=root_logprobs.device)
            builder.start(root_logprobs)
            if self.policy_runner is not None:
                self.policy_runner.begin_round(batch)
            active = self._decide_frontier(builder.frontier_scores) if depth_limit > 1 else None
            base_positions = base_positions.long().cpu()
            block_table = cad.block_table_tensor[:batch].cpu()
            parent_hidden = root_hidden.unsqueeze(1).expand(batch, top_k, hidden_size)
            anc_pass = torch.zeros(batch, top_k, max(depth_limit - 1, 1), dtype=torch.long)
            anc_rows = torch.zeros_like(anc_pass)
            plan = DraftFrontierPlan(rounds=[])
            num_rows = batch * top_k
            no_slots = {name: torch.full((num_rows,), -1, dtype=torch.long) for name in self._draft_attn_layer_names}
            for depth in range(2, depth_limit + 1):
                if not bool(active.any()):
                    break
                plan.rounds = self._frontier_rounds(depth, base_positions, block_table, anc_pass, anc_rows)
                plan._scheduler_metadata = {}
                model_kwargs = {
                    "input_ids": builder.frontier_target_tokens.reshape(num_rows).int(),
                    "positions": (base_positions + depth - 1).repeat_interleave(top_k).to(self.positions.dtype),
                    "inputs_embeds": None,
                    "hidden_states": parent_hidden.reshape(num_rows, hidden_size).contiguous(),
                }
                with set_forward_context(attn_metadata, self.vllm_config, num_tokens=num_rows, slot_mapping=no_slots), \
                        active_draft_plan(plan):
                    last_hidden_states, hidden_states = self.model(**model_kwargs)
                logits = self.model.compute_logits(last_hidden_states[:num_rows])
                child_logprobs = torch.log_softmax(logits.float(), dim=-1).view(batch, top_k, -1)
                builder.extend(child_logprobs, active)
                parent_slots = builder.frontier_parent_slots.clamp(min=0).cpu()  # [B, top_k]
                parent_hidden = hidden_states[:num_rows].view(batch, top_k, hidden_size).gather(
                    1, parent_slots.unsqueeze(-1).expand(batch, top_k, hidden_size))
                gather = parent_slots.unsqueeze(-1).expand_as(anc_pass)
                anc_pass = anc_pass.gather(1, gather)
                anc_rows = anc_rows.gather(1, gather)
                anc_pass[:, :, depth - 2] = depth - 2
                anc_rows[:, :, depth - 2] = torch.arange(batch).unsqueeze(1) * top_k + parent_slots
                if depth < depth_limit:
                    active = self._decide_frontier(builder.frontier_scores) & active
            tree = builder.finalize().to("cpu")
            stops = tree.stop_depth.tolist()
            output = torch.full((batch, max_nodes), PADDING_TOKEN, dtype=torch.int64)
            trees = []
            for b, request in enumerate(tree.to_lists()):
                self.stop_depth_counts[stops[b]] += 1
                parents, tokens = request["parents"], request["target_tokens"]
                if not eligible[b]:
                    parents, tokens = best_chain(parents, tokens)
                drafted = DraftedTree(parents=tuple(parents), tokens=tuple(tokens), stop_depth=int(stops[b]))
                trees.append(drafted)
                output[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            self.last_trees = trees
            self.last_eligible = eligible
            if self.recorded_trees is not None:
                self.recorded_trees.extend(trees)
            return output.to(root_logprobs.device)

        def _decide_frontier(self, frontier_scores: torch.Tensor) -> torch.Tensor:
            if self.policy_runner is None:
                return torch.ones(frontier_scores.shape[0], dtype=torch.bool, device=frontier_scores.device)
            return self.policy_runner.step(frontier_scores[:, : self.policy_top_k]).clone()

        def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                    next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                    mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None) -> torch.Tensor:
            max_nodes = num_speculative_tokens
            depth_limit = min(self.max_depth, max_nodes)
            cad = common_attn_metadata
            batch_size = cad.batch_size()
            eligible = self._eligibility(batch_size)

            target_hidden_states = self.model.combine_hidden_states(target_hidden_states)
            num_tokens, token_indices_to_sample, cad = self.set_inputs_first_pass(
                target_token_ids=target_token_ids, next_token_ids=next_token_ids,
                target_positions=target_positions, target_hidden_states=target_hidden_states,
                token_indices_to_sample=token_indices_to_sample, cad=cad,
                num_rejected_tokens_gpu=num_rejected_tokens_gpu,
            )
            _, per_layer_attn_metadata = self.build_per_group_and_layer_attn_metadata(cad)
            cudagraph_mode, num_input_tokens, num_tokens_across_dp = self._determine_batch_execution_and_padding(
                num_tokens)
            model_kwargs, slot_mapping_size = self.build_model_inputs_first_pass(
                num_tokens, num_input_tokens, mm_embed_inputs)
            with set_forward_context(
                per_layer_attn_metadata, self.vllm_config, num_tokens=num_input_tokens,
                num_tokens_across_dp=num_tokens_across_dp, cudagraph_runtime_mode=cudagraph_mode,
                slot_mapping=self._get_slot_mapping(slot_mapping_size, cad.slot_mapping),
            ):
                last_hidden_states, hidden_states = self.model(**model_kwargs)
            positions = self.positions[token_indices_to_sample]  # [batch]
            hidden_states = hidden_states[token_indices_to_sample]  # [batch, hidden]
            logprobs, values, tokens = self._step_outputs(last_hidden_states[token_indices_to_sample])
            if self.frontier:
                if num_rejected_tokens_gpu is not None:
                    cad.seq_lens -= num_rejected_tokens_gpu
                return self._propose_frontier(max_nodes, depth_limit, eligible, positions, hidden_states, logprobs,
                                              cad, per_layer_attn_metadata)
            all_values, all_tokens = [values], [tokens]  # per depth [batch, top_k]
            stop_depth = torch.ones(batch_size, dtype=torch.long, device=values.device)  # [batch]

            if self.policy_runner is not None:
                self.policy_runner.begin_round(batch_size)
            active = self._decide(logprobs, batch_size, first=True) if depth_limit > 1 else None

            cudagraph_mode, input_batch_size, batch_size_across_dp = begin_single_token_passes(
                self, cad, batch_size, num_rejected_tokens_gpu)
            for depth in range(2, depth_limit + 1):
                if not bool(active.any()):
                    break
                positions = self._update_positions_dependent_metadata(
                    positions, cad, batch_size, input_batch_size, self.block_size)
                _, per_layer_attn_metadata = self.build_per_group_and_layer_attn_metadata(
                    cad, draft_index=depth - 1)
                spine = tokens[:, 0]
                self.input_ids[:batch_size] = spine.int()
                self.hidden_states[:batch_size] = hidden_states
                model_kwargs = {
                    "input_ids": self.input_ids[:input_batch_size],
                    "positions": self._get_positions(input_batch_size),
                    "inputs_embeds": None,
                    "hidden_states": self.hidden_states[:input_batch_size],
                }
                with set_forward_context(
                    per_layer_attn_metadata, self.vllm_config, num_tokens=input_batch_size,
                    num_tokens_across_dp=batch_size_across_dp, cudagraph_runtime_mode=cudagraph_mode,
                    slot_mapping=self._get_slot_mapping(input_batch_size),
                ):
                    last_hidden_states, hidden_states = self.model(**model_kwargs)
                hidden_states = hidden_states[:batch_size]
                logprobs, values, tokens = self._step_outputs(last_hidden_states[:batch_size])
                all_values.append(values)
                all_tokens.append(tokens)
                stop_depth = torch.where(active, depth, stop_depth)
                if depth < depth_limit:
                    active = self._decide(logprobs, batch_size, first=False) & active

            values_host = torch.stack(all_values, dim=1).tolist()  # [batch, depth, top_k]
            tokens_host = torch.stack(all_tokens, dim=1).tolist()
            stops = stop_depth.tolist()
            output = torch.full((batch_size, max_nodes), PADDING_TOKEN, dtype=torch.int64)
            trees = []
            for b in range(batch_size):
                depth = stops[b]
                self.stop_depth_counts[depth] += 1
                tree = caterpillar_tree(values_host[b][:depth], tokens_host[b][:depth], max_nodes,
                                        chain_only=not eligible[b])
                trees.append(tree)
                output[b, : len(tree.tokens)] = torch.tensor(tree.tokens, dtype=torch.int64)
            self.last_trees = trees
            self.last_eligible = eligible
            if self.recorded_trees is not None:
                self.recorded_trees.extend(trees)
            return output.to(values.device)

    return TreeProposer


_proposer_class: type | None = None


def tree_proposer_class() -> type:
    global _proposer_class
    if _proposer_class is None:
        _proposer_class = _make_proposer_class()
    return _proposer_class


__all__ = ["DraftedTree", "best_chain", "caterpillar_tree", "tree_eligible", "tree_proposer_class"]
