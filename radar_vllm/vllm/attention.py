"""Tree attention on vLLM's CPU platform, installed through vLLM's attention backend registry.

:class:`RadarCPUAttentionBackend` is vLLM's ``CPU_ATTN`` backend with two additions, registered
for ``CPU_ATTN`` when the plugin loads (:func:`register_backend`): its metadata may carry a RADAR
plan (``tree_plan``), and its impl applies that plan. Without a plan (every engine that is not a
RADAR tree engine, and every pass of a RADAR engine except the two below) it is the platform's
code path, untouched.

- **Verify** (:class:`TreeVerifyPlan`, set by the tree runner on the target forward of a step
  that verifies trees): the platform kernel attends the whole batch causally, and each layer
  recomputes the rows of tree nodes whose ancestors are not the rows right before them; with
  scratch blocks both happen in one kernel call (:class:`MergedCall`).
- **Frontier drafting** (:class:`DraftFrontierPlan`, set by the proposer on the draft layer's
  metadata for calls 2..D of a tree round): every row is a frontier node that attends to the
  draft layer's cached context and to its own path.

Exactness. A torch re-implementation of attention differs from the C++ kernel by an ULP on some
rows and flips greedy near-ties, so tree rows are computed by the same kernel: for node ``i``
with root-to-node path ``p_1 .. p_d`` the layer writes the path's K/V into the slots right after
the root, runs the kernel for that single query row as a one-token request with
``seq_len = context + 1 + d``, and afterwards rewrites every tree node's own K/V into its own
slot. The query sees exactly what it would see when decoding the path token by token.

By default (``radar.scratch_blocks`` unset) every such row is recomputed in one kernel call per
layer for the whole batch (:class:`ScratchRound`): the tree is cut into root-to-leaf paths
(:func:`~radar_vllm.core.tree.recompute_paths`), each path a causal chain over private copies of the
blocks it goes through (the first a copy of the request's block holding the context's last tokens
and the root, the path's K/V written after them), taken from a pool of KV blocks that RADAR's
scheduler hides from vLLM; tree mode runs 32-token KV blocks where the user chose no block size,
so a copy is small. With ``"scratch_blocks": 0`` rows take turns in the request's own slots
instead (:class:`PathRound`: one node per request per kernel call, batched across requests). Both
show each row the same K/V at the same positions as decoding its path token by token, so the
same bits.

Compaction (the accepted path's K/V moved right after the root once acceptance is known). With
one scratch round (the default pool holds a full batch's paths), the scratch blocks still hold
every recomputed path after the forward, each node at its depth's position behind a copy of the
request's context, so the runner copies the accepted path's job blocks back over the request's
own (:func:`scratch_compaction`, one whole-block copy per layer; nothing is kept during the
forward). Otherwise (path rounds, or a pool reused by several rounds) each layer stashes the tree
rows' K/V and the runner rewrites the accepted ones with the platform's own ``reshape_and_cache``
(the key layout inside a CPU cache block depends on the ISA, so rows are never copied by hand).

Worked example of the verify segment (see :mod:`radar_vllm.core.verify`): context ``C = 10``,
parents ``[-1, 0, -1, 1, 0]``: depths ``[1, 2, 1, 3, 2]``; nodes 0 and 1 are causal-exact
(depth == index + 1); nodes 2, 3 and 4 are recomputed with paths ``[2]``, ``[0, 1, 3]``, ``[0, 4]``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

import vllm.envs as envs
from vllm import _custom_ops as ops
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from radar_vllm.core.tree import causal_exact_nodes, node_path, recompute_paths

logger = logging.getLogger(__name__)


@dataclass
class PathRound:
    """One kernel call recomputing at most one node row per request (rows are batch-global)."""

    # [R] int64: query rows recomputed, one per request
    query_rows: Tensor
    # [R] int64: request index of each query row (its block table row)
    request_indices: Tensor
    # [R] int32: sequence length seen by each recomputed row (context + root + path)
    seq_lens: Tensor
    # [W] int64: rows whose K/V are written (the path nodes' own rows)
    source_rows: Tensor
    # [W] int64: rows whose slots receive them (rows 1..depth after the root)
    destination_rows: Tensor


def path_rounds(segments: Sequence[tuple[int, int, int, Sequence[int]]]) -> list[PathRound]:
    """Rounds of path recomputation for a batch.

    ``segments``: per tree request ``(request_index, first_row, context_len, parents)`` where
    ``first_row`` is the batch row of its root. Only nodes that are not causal-exact are listed.
    """
    per_request: list[list[tuple[int, int, int, list[int], int]]] = []
    for request_index, first_row, context_len, parents in segments:
        jobs = []
        for node, exact in enumerate(causal_exact_nodes(parents)):
            if not exact:
                jobs.append((request_index, first_row, context_len, node_path(parents, node), node))
        per_request.append(jobs)
    rounds = []
    for step in range(max((len(jobs) for jobs in per_request), default=0)):
        query_rows, request_indices, seq_lens, sources, destinations = [], [], [], [], []
        for jobs in per_request:
            if step >= len(jobs):
                continue
            request_index, first_row, context_len, path, node = jobs[step]
            query_rows.append(first_row + 1 + node)
            request_indices.append(request_index)
            seq_lens.append(context_len + 1 + len(path))
            sources += [first_row + 1 + p for p in path]
            destinations += [first_row + 1 + d for d in range(len(path))]
        rounds.append(
            PathRound(
                query_rows=torch.tensor(query_rows, dtype=torch.long),
                request_indices=torch.tensor(request_indices, dtype=torch.long),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                source_rows=torch.tensor(sources, dtype=torch.long),
                destination_rows=torch.tensor(destinations, dtype=torch.long),
            )
        )
    return rounds


@dataclass
class ScratchRound:
    """One kernel call recomputing many node rows: root-to-leaf paths over private scratch blocks.

    Job ``j`` is a path of the tree (:func:`radar_vllm.core.tree.recompute_paths`) verified as a
    causal chain: its query rows are the path's nodes not covered before, and it sees its
    request's context and root through the request's own block table, except that the columns
    from the one where the path starts are swapped for scratch blocks: the first one a copy of the
    request's block at that column (it holds the context's last tokens and the root), the path's
    K/V written after them. Row ``i`` of a job with ``q`` rows and sequence length ``L`` sees the
    first ``L - q + i + 1`` tokens, i.e. the context, the root and its own path.
    """

    # [Q] int64: rows recomputed (batch-global), grouped by job
    query_rows: Tensor
    # [J + 1] int32: first query row of each job (cumulative)
    query_start: Tensor
    # [J] int64: request index of each job (its block-table row)
    request_indices: Tensor
    # [J] int32: sequence length seen by each job's last row (context + root + path)
    seq_lens: Tensor
    # [E] int64: block-table entries replaced: job, column, scratch block id
    table_jobs: Tensor
    table_columns: Tensor
    table_blocks: Tensor
    # [P] int64: blocks copied before the path is written: request, column (source), scratch block
    copy_requests: Tensor
    copy_columns: Tensor
    copy_blocks: Tensor
    # [W] int64: rows whose K/V are written (the path nodes' own rows) and the scratch slots
    source_rows: Tensor
    destination_slots: Tensor


def scratch_blocks_per_job(context_len: int, path_len: int, block_size: int) -> int:
    """Scratch blocks a path of ``path_len`` nodes after ``context_len`` tokens + root spans."""
    start = context_len + 1
    return (start + path_len - 1) // block_size - start // block_size + 1


def max_scratch_blocks_per_job(max_path_len: int, block_size: int) -> int:
    """The most blocks any job of a path of at most ``max_path_len`` nodes can need."""
    return (block_size - 1 + max_path_len - 1) // block_size + 1


def scratch_rounds(
    segments: Sequence[tuple[int, int, int, Sequence[int]]], block_size: int, scratch_blocks: Sequence[int]
) -> list[ScratchRound]:
    """Rounds of path recomputation over scratch blocks (see :class:`ScratchRound`).

    ``segments`` as for :func:`path_rounds`. Jobs (one per path of
    :func:`~radar_vllm.core.tree.recompute_paths`) are packed in order into rounds until the pool
    ``scratch_blocks`` (kernel block ids) runs out; a job never needs more than
    :func:`max_scratch_blocks_per_job` blocks.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    pool = list(scratch_blocks)
    rounds: list[ScratchRound] = []
    current: dict[str, list[int]] = {}

    def flush() -> None:
        if current.get("request_indices"):
            rounds.append(ScratchRound(**{
                name: torch.tensor(values, dtype=torch.int32 if name in ("seq_lens", "query_start") else torch.long)
                for name, values in current.items()
            }))
        current.clear()
        for name in ScratchRound.__dataclass_fields__:
            current[name] = []
        current["query_start"].append(0)

    flush()
    used = 0
    for request_index, first_row, context_len, parents in segments:
        for path, first in recompute_paths(parents):
            needed = scratch_blocks_per_job(context_len, len(path), block_size)
            if needed > len(pool):
                raise ValueError(
                    f"a path of {len(path)} nodes needs {needed} scratch blocks of {block_size} tokens, "
                    f"the pool has {len(pool)}")
            if used + needed > len(pool):
                flush()
                used = 0
            job = len(current["request_indices"])
            start = context_len + 1  # position of the path's first node
            first_column = start // block_size
            blocks = pool[used : used + needed]
            used += needed
            current["query_rows"] += [first_row + 1 + node for node in path[first:]]
            current["query_start"].append(len(current["query_rows"]))
            current["request_indices"].append(request_index)
            current["seq_lens"].append(start + len(path))
            for offset, block in enumerate(blocks):
                current["table_jobs"].append(job)
                current["table_columns"].append(first_column + offset)
                current["table_blocks"].append(block)
            if start % block_size:
                current["copy_requests"].append(request_index)
                current["copy_columns"].append(first_column)
                current["copy_blocks"].append(blocks[0])
            for k, path_node in enumerate(path):
                position = start + k
                current["source_rows"].append(first_row + 1 + path_node)
                current["destination_slots"].append(
                    blocks[position // block_size - first_column] * block_size + position % block_size)
    flush()
    return rounds


@dataclass
class LayerStash:
    """A layer's tree-row K/V of this step, for compaction after acceptance."""

    # [num_stashed, num_kv_heads, head_size]
    key: Tensor
    value: Tensor
    # [num_tokens] slot of every row of the step
    slot_mapping: Tensor
    kv_cache: Tensor
    layer: Any
    impl: Any


@dataclass
class MergedCall:
    """Inputs of one kernel call over the batch's requests followed by a scratch round's jobs."""

    # [N + Q] int64: the batch's N rows, then the round's recomputed rows
    query_rows: Tensor
    # [R + J + 1] int32 cumulative rows, [R + J] int32 sequence lengths, [R + J, max_blocks] tables
    query_start: Tensor
    seq_lens: Tensor
    block_table: Tensor


@dataclass
class TreeVerifyPlan:
    # PathRounds (rows recomputed in the request's own slots, restored afterwards) or ScratchRounds
    # (rows recomputed over scratch blocks); never mixed
    rounds: list[PathRound] | list[ScratchRound]
    # [num_stashed] int64: rows of all tree nodes of the step (restored after path rounds, stashed)
    node_rows: Tensor
    stash: dict[str, LayerStash] = field(default_factory=dict)
    # layer name -> KV cache, where compaction copies scratch blocks (see compacts_from_scratch)
    caches: dict[str, Tensor] = field(default_factory=dict)
    kernel_metadata: dict[tuple[Any, ...], Tensor] = field(default_factory=dict)
    # id of a layer's slot mapping -> a copy (the step's slot of every row, for compaction)
    slot_mappings: dict[int, Tensor] = field(default_factory=dict)
    # round index -> (block table [J, max_blocks] int32, copy source blocks [P] int64, the request's
    # own block at every swapped entry [E] int64), the same in every layer
    _scratch_tables: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    # the causal call and the first scratch round as one kernel call, the same in every layer
    _merged: MergedCall | None = None

    @property
    def uses_scratch(self) -> bool:
        return bool(self.rounds) and isinstance(self.rounds[0], ScratchRound)

    @property
    def compacts_from_scratch(self) -> bool:
        """One scratch round: after the forward its blocks still hold every recomputed path (the
        context's last tokens, the root and the path's K/V at their positions), so compaction copies
        the accepted path's blocks back over the request's instead of rewriting stashed rows."""
        return self.uses_scratch and len(self.rounds) == 1


def scratch_tables(plan: TreeVerifyPlan, index: int, step: ScratchRound,
                   block_table: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Round ``index``'s per-row block table (the request's, with scratch columns swapped in), the
    physical blocks its copies read and the request's own block at every swapped entry; computed
    once per step (all layers share the table)."""
    cached = plan._scratch_tables.get(index)
    if cached is None:
        own = block_table[step.request_indices]
        table = own.clone()
        table[step.table_jobs, step.table_columns] = step.table_blocks.to(table.dtype)
        sources = block_table[step.copy_requests, step.copy_columns].to(torch.long)
        cached = (table.contiguous(), sources, own[step.table_jobs, step.table_columns].to(torch.long))
        plan._scratch_tables[index] = cached
    return cached


def scratch_compaction(plan: TreeVerifyPlan, block_size: int,
                       accepted: Sequence[tuple[int, int, int]]) -> tuple[Tensor, Tensor]:
    """Block copies (scratch blocks, the requests' blocks) that compact accepted paths when
    :attr:`TreeVerifyPlan.compacts_from_scratch`. ``accepted``: per request whose accepted path
    leaves the causal rows, ``(row of its deepest accepted node, context length, that node's depth)``.

    The node is not causal-exact, so one job recomputed its row; that job verified the whole
    root-to-leaf path through it in its scratch blocks, each node at position context + depth, the
    blocks' earlier positions copied from the request's; so
    copying the job's blocks up to the one holding the deepest accepted node onto the request's
    columns puts the accepted path right after the root. What lands after it (the job's deeper
    nodes, stale slots) is past the request's new length and rewritten before it is read."""
    step = plan.rounds[0]
    rows, starts = step.query_rows.tolist(), step.query_start.tolist()
    job_of_row = {row: job for job in range(len(starts) - 1) for row in rows[starts[job] : starts[job + 1]]}
    columns = step.table_columns.tolist()
    scratch = step.table_blocks.tolist()
    own = plan._scratch_tables[0][2].tolist()
    entries: dict[int, list[int]] = {}  # job -> its table entries (columns in order)
    for entry, job in enumerate(step.table_jobs.tolist()):
        entries.setdefault(job, []).append(entry)
    sources: list[int] = []
    destinations: list[int] = []
    for row, context_len, depth in accepted:
        last_column = (context_len + depth) // block_size
        for entry in entries[job_of_row[row]]:
            if columns[entry] <= last_column:
                sources.append(scratch[entry])
                destinations.append(own[entry])
    return torch.tensor(sources, dtype=torch.long), torch.tensor(destinations, dtype=torch.long)


@dataclass
class FrontierRound:
    """One kernel call of a frontier draft pass: each of its rows a one-token request."""

    # [R] int64: rows of the pass computed by this call
    query_rows: Tensor
    # [R, max_blocks] int32: each row's block table (its request's, scratch columns swapped in)
    block_table: Tensor
    # [R] int32: context + root + path length of each row
    seq_lens: Tensor
    # [W] int64: pass index (into the layer's history; the last one is the current pass) and row
    # of every path entry to write, and its destination slot (-1: skipped)
    source_pass: Tensor
    source_rows: Tensor
    destination_slots: Tensor
    # [P] int64: blocks copied before the paths are written (source kernel block -> scratch block)
    copy_sources: Tensor | None = None
    copy_blocks: Tensor | None = None


@dataclass
class DraftFrontierPlan:
    """A frontier draft pass of the EAGLE-3 layer (see :mod:`radar_vllm.vllm.proposer`).

    Every row is a frontier node that attends to the draft layer's cached context and to its own
    path of frontier nodes, whose K/V come from this plan's per-layer history of earlier passes (a
    private dense buffer for the round: the frontier has no KV slots reserved by vLLM) plus the
    current pass. With a scratch pool (tree engines have one unless ``"scratch_blocks": 0``) the
    whole pass is one kernel call per layer (:func:`frontier_scratch_rounds`, more only when the
    pool is short): every row is a one-token request whose block table is its request's with the
    columns from the path's first position swapped for scratch blocks, the first a copy of the
    request's block there (the context's last tokens), the path written after them. Without a
    pool (:func:`frontier_rounds`) the layer writes, for each frontier slot ``f``, the slot's
    paths into the requests' own lookahead slots right after the context and runs row ``f`` of
    every request; the lookahead slots hold nothing of value during drafting (the next verify pass
    rewrites them). Both show a row the same K/V at the same positions as decoding its path.
    """

    rounds: list[FrontierRound]
    # layer name -> [(key [R, kv_heads, head], value)] of earlier frontier passes of the round
    history: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    kernel_metadata: dict[tuple[Any, ...], Tensor] = field(default_factory=dict)


def _frontier_path_sources(depth: int, anc_pass: Tensor, anc_rows: Tensor) -> tuple[Tensor, Tensor]:
    """[B * top_k, depth - 1] pass and row of every node on each frontier row's path (ancestors
    from earlier passes, the row itself in the current pass last); row ``b * top_k + f``."""
    batch, top_k = anc_pass.shape[:2]
    num_rows, level = batch * top_k, depth - 1
    current = torch.full((num_rows, 1), depth - 2, dtype=torch.long)
    source_pass = torch.cat([anc_pass[:, :, : level - 1].reshape(num_rows, -1), current], dim=1)
    source_rows = torch.cat([anc_rows[:, :, : level - 1].reshape(num_rows, -1),
                             torch.arange(num_rows).unsqueeze(1)], dim=1)
    return source_pass, source_rows


def frontier_rounds(depth: int, base_positions: Tensor, block_table: Tensor, anc_pass: Tensor, anc_rows: Tensor,
                    drafting: Tensor, block_size: int, max_model_len: int) -> list[FrontierRound]:
    """Kernel calls of the pass that runs the depth-``depth - 1`` frontier, one per frontier slot.

    ``base_positions`` [B]: position of the row before depth 1; ``anc_pass`` / ``anc_rows``
    [B, top_k, >= depth - 2]: pass and row of every frontier node's ancestors; ``drafting`` [B]
    bool: requests whose drafts are used (a partial prefill chunk writes nothing: its lookahead
    slots may not be allocated).

    Worked example, top_k = 2, context ending at position p: call 2 runs rows [a, b] at p + 1
    (row a sees context + a, row b context + b); call 3 runs the best two children, say c (of a)
    and e (of b), at p + 2: row c's path (a from call 2's history, then c) is written at p + 1,
    p + 2 and the kernel runs with seq_len = p + 3; then row e with path (b, e).
    """
    batch, top_k = anc_pass.shape[:2]
    level = depth - 1  # path length of a frontier node, itself included
    source_pass, source_rows = _frontier_path_sources(depth, anc_pass, anc_rows)
    path_positions = base_positions.unsqueeze(1) + torch.arange(1, level + 1)  # [B, level]
    inside = (path_positions < max_model_len) & drafting.unsqueeze(1)
    block = block_table.gather(1, (path_positions.clamp(max=max_model_len - 1) // block_size).long())
    slots = torch.where(inside, block.long() * block_size + path_positions % block_size, -1)
    seq_lens = (base_positions + 1 + level).clamp(max=max_model_len).to(torch.int32)  # [B]
    rounds = []
    for f in range(top_k):
        rows = torch.arange(batch) * top_k + f
        rounds.append(FrontierRound(query_rows=rows, block_table=block_table, seq_lens=seq_lens,
                                    source_pass=source_pass[rows].reshape(-1),
                                    source_rows=source_rows[rows].reshape(-1), destination_slots=slots.reshape(-1)))
    return rounds


def frontier_scratch_rounds(depth: int, base_positions: Tensor, block_table: Tensor, anc_pass: Tensor,
                            anc_rows: Tensor, drafting: Tensor, block_size: int, max_model_len: int,
                            scratch_blocks: Sequence[int]) -> list[FrontierRound]:
    """Kernel calls of the depth-``depth - 1`` frontier pass over scratch blocks: every row of the
    pass (request ``b``, slot ``f`` -> row ``b * top_k + f``) is a one-token request whose path
    lives in private copies of the blocks it spans; as many rows per call as the pool ``scratch_blocks``
    (kernel block ids) holds, so usually one call. Arguments as for :func:`frontier_rounds`.

    Worked example, block size 4, context ending at position 5 (the root), a frontier node at
    depth 2 with path (a, c): its row gets a copy of the request's block 1 (positions 4-7: the
    context's position 4 and the root at 5), a and c are written at positions 6 and 7 of the
    copy, and the kernel runs the row with seq_len 8 over the request's table with column 1
    swapped for the copy.
    """
    batch, top_k = anc_pass.shape[:2]
    level = depth - 1
    num_rows = batch * top_k
    rows = torch.arange(num_rows)
    start = base_positions.long().repeat_interleave(top_k) + 1  # [J] position of the path's first node
    last_column = (max_model_len - 1) // block_size
    first_column = (start // block_size).clamp(max=last_column)
    positions = start.unsqueeze(1) + torch.arange(level)  # [J, level]
    inside = (positions < max_model_len) & drafting.repeat_interleave(top_k).unsqueeze(1)
    columns = (positions // block_size).clamp(max=last_column) - first_column.unsqueeze(1)  # [J, level]
    per_row = int(columns.max()) + 1
    per_call = len(scratch_blocks) // per_row
    if per_call < 1:
        raise ValueError(f"a frontier path of {level} nodes needs {per_row} scratch blocks of {block_size} tokens, "
                         f"the pool has {len(scratch_blocks)}")
    pool = torch.tensor(list(scratch_blocks[: per_call * per_row]), dtype=torch.long).view(per_call, per_row)
    tables = block_table.repeat_interleave(top_k, dim=0)  # [J, max_blocks]
    source_pass, source_rows = _frontier_path_sources(depth, anc_pass, anc_rows)  # [J, level]
    seq_lens = (start + level).clamp(max=max_model_len).to(torch.int32)
    rounds = []
    for first in range(0, num_rows, per_call):
        chunk = rows[first : first + per_call]
        blocks = pool[: chunk.numel()]  # [R, per_row] this call's scratch blocks, row by row
        table = tables[chunk].clone()
        swap = first_column[chunk].unsqueeze(1) + torch.arange(per_row)  # [R, per_row]
        valid = swap < table.shape[1]
        local = torch.arange(chunk.numel()).unsqueeze(1).expand_as(swap)
        table[local[valid], swap[valid]] = blocks[valid].to(table.dtype)
        copied = (start[chunk] % block_size) != 0  # rows whose first block holds context tokens
        chunk_positions = positions[chunk]
        slots = blocks.gather(1, columns[chunk]) * block_size + chunk_positions % block_size
        rounds.append(FrontierRound(
            query_rows=chunk, block_table=table.contiguous(), seq_lens=seq_lens[chunk],
            source_pass=source_pass[chunk].reshape(-1), source_rows=source_rows[chunk].reshape(-1),
            destination_slots=torch.where(inside[chunk], slots, -1).reshape(-1),
            copy_sources=tables[chunk[copied], first_column[chunk[copied]]].long(),
            copy_blocks=blocks[copied, 0]))
    return rounds


def with_plan(per_layer_metadata: dict[str, Any], plan: Any) -> dict[str, Any]:
    """Copies of the layers' attention metadata carrying ``plan`` (one copy per distinct object)."""
    copies: dict[int, Any] = {}
    for metadata in per_layer_metadata.values():
        if id(metadata) not in copies:
            copies[id(metadata)] = dataclasses.replace(metadata, tree_plan=plan)
    return {name: copies[id(metadata)] for name, metadata in per_layer_metadata.items()}


def _split_cache(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
    """CPU cache ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` -> key, value views."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.size()
    view = kv_cache.view((num_blocks, num_kv_heads, block_size * 2, -1))
    key_cache, value_cache = view.chunk(2, dim=2)
    return key_cache, value_cache


def write_kv(layer: Any, impl: Any, kv_cache: Tensor, key: Tensor, value: Tensor, slots: Tensor) -> None:
    """Write ``key``/``value`` ``[n, num_kv_heads, head_size]`` into ``slots`` with the platform op."""

    key_cache, value_cache = _split_cache(kv_cache)
    ops.cpu_attn_reshape_and_cache(
        key,
        value,
        key_cache,
        value_cache,
        slots,
        layer.isa,
        k_scale=layer._k_scale_float,
        v_scale=layer._v_scale_float,
        kv_cache_dtype=impl.kv_cache_dtype,
    )


def copy_blocks(kv_cache: Tensor, sources: Tensor, destinations: Tensor) -> None:
    """Copy whole KV blocks ``sources`` onto ``destinations`` (kernel block ids, all heads)."""
    if destinations.numel():
        kv_cache.index_copy_(0, destinations, kv_cache.index_select(0, sources))


@dataclass
class RadarCPUAttentionMetadata(CPUAttentionMetadata):
    """vLLM's CPU attention metadata plus the RADAR plan of this forward, if any."""

    tree_plan: TreeVerifyPlan | DraftFrontierPlan | None = None


class RadarCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, *args: Any, **kwargs: Any) -> RadarCPUAttentionMetadata:
        return RadarCPUAttentionMetadata(**vars(super().build(*args, **kwargs)))


class RadarTreeCPUAttentionImpl(CPUAttentionBackendImpl):
    """CPU attention that also applies the plan in its metadata (see the module docstring)."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args: Any, **kwargs: Any):
        plan = getattr(attn_metadata, "tree_plan", None)
        if plan is None or self.attn_type != AttentionType.DECODER:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if isinstance(plan, DraftFrontierPlan):
            self._apply_draft_plan(plan, layer, query, key, value, kv_cache, output)
            return output
        if plan.uses_scratch and attn_metadata.causal is True and attn_metadata.dynamic_causal is None:
            self._apply_plan(plan, layer, query, key, value, kv_cache, attn_metadata, output, merge_first=True)
            return output
        result = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        self._apply_plan(plan, layer, query, key, value, kv_cache, attn_metadata, output)
        return result

    def _run_rows(self, plan: Any, index: int, layer: Any, query: Tensor, kv_cache: Tensor, rows: Tensor,
                  seq_lens: Tensor, block_table: Tensor, query_start: Tensor | None = None) -> Tensor:
        """The platform kernel for ``rows`` of ``query``: causal requests of ``query_start`` [R + 1]
        (cumulative rows; None: each row a one-token request) with ``seq_lens`` [R]."""
        key_cache, value_cache = _split_cache(kv_cache)
        cache_key = (index, self.num_heads, self.num_kv_heads, self.head_size, query.dtype, layer.isa,
                     self.sliding_window)
        metadata = plan.kernel_metadata.get(cache_key)
        if query_start is None:
            query_start = plan.kernel_metadata.get((index, "query_start"))
            if query_start is None:
                query_start = torch.arange(int(rows.numel()) + 1, dtype=torch.int32)
                plan.kernel_metadata[(index, "query_start")] = query_start
        if metadata is None:
            metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=int(seq_lens.numel()), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_size, seq_lens=seq_lens, dtype=query.dtype, query_start_loc=query_start,
                causal=True, sliding_window_size=self.sliding_window, isa=layer.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=self.kv_cache_dtype,
            )
            plan.kernel_metadata[cache_key] = metadata
        rows_query = query[rows].contiguous()
        rows_output = torch.empty_like(rows_query)
        ops.cpu_attention_with_kv_cache(
            query=rows_query, key_cache=key_cache, value_cache=value_cache, output=rows_output,
            query_start_loc=query_start, seq_lens=seq_lens, scale=self.scale, causal=True,
            alibi_slopes=self.alibi_slopes, sliding_window=self.sliding_window,
            block_table=block_table.contiguous(), softcap=self.logits_soft_cap, scheduler_metadata=metadata,
            s_aux=self.sinks, dynamic_causal=None, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        return rows_output

    def _apply_draft_plan(self, plan: DraftFrontierPlan, layer, query, key, value, kv_cache, output) -> None:
        num_rows = plan.rounds[0].query_rows.numel() * len(plan.rounds)
        history = plan.history.setdefault(layer.layer_name, [])
        current = (key[:num_rows].contiguous(), value[:num_rows].contiguous())
        keys = torch.stack([k for k, _ in history] + [current[0]])  # [passes, R, kv_heads, head]
        values = torch.stack([v for _, v in history] + [current[1]])
        view = output.view(output.shape[0], self.num_heads, self.head_size) if output.dim() == 2 else output
        for index, step in enumerate(plan.rounds):
            if step.copy_blocks is not None:
                copy_blocks(kv_cache, step.copy_sources, step.copy_blocks)
            write_kv(layer, self, kv_cache, keys[step.source_pass, step.source_rows],
                     values[step.source_pass, step.source_rows], step.destination_slots)
            rows_output = self._run_rows(plan, index, layer, query, kv_cache, step.query_rows, step.seq_lens,
                                         step.block_table)
            view[step.query_rows] = rows_output.view(-1, self.num_heads, self.head_size)
        history.append(current)

    def _merged_call(self, plan: TreeVerifyPlan, step: ScratchRound, block_table: Tensor, layer, query: Tensor,
                     kv_cache: Tensor, attn_metadata, output: Tensor) -> None:
        """The platform's causal call over the whole batch and the first scratch round's rows in one
        kernel call: the round's jobs follow the batch's requests (each with its own sequence length
        and block table), so every row is computed exactly as the two calls would compute it."""
        num_tokens = attn_metadata.num_actual_tokens
        merged = plan._merged
        if merged is None:
            query_start = attn_metadata.query_start_loc
            merged = plan._merged = MergedCall(
                query_rows=torch.cat([torch.arange(num_tokens), step.query_rows]),
                query_start=torch.cat([query_start, num_tokens + step.query_start[1:]]).to(torch.int32),
                seq_lens=torch.cat([attn_metadata.seq_lens, step.seq_lens]).to(torch.int32),
                block_table=torch.cat([attn_metadata.block_table, block_table]).contiguous(),
            )
        rows_output = self._run_rows(plan, -1, layer, query, kv_cache, merged.query_rows, merged.seq_lens,
                                     merged.block_table, merged.query_start)
        rows_output = rows_output.view(-1, *output.shape[1:])
        output[:num_tokens] = rows_output[:num_tokens]
        output[step.query_rows] = rows_output[num_tokens:]

    def _apply_plan(self, plan: TreeVerifyPlan, layer, query, key, value, kv_cache, attn_metadata, output,
                    merge_first: bool = False) -> None:
        """Recompute the plan's rows after the platform's causal call (``merge_first``: the causal
        call has not run; it runs together with the first scratch round)."""
        slot_mapping = attn_metadata.slot_mapping
        for index, step in enumerate(plan.rounds):
            if isinstance(step, ScratchRound):
                block_table, copy_sources, _ = scratch_tables(plan, index, step, attn_metadata.block_table)
                copy_blocks(kv_cache, copy_sources, step.copy_blocks)
                write_kv(layer, self, kv_cache, key[step.source_rows], value[step.source_rows],
                         step.destination_slots)
                if merge_first and index == 0:
                    self._merged_call(plan, step, block_table, layer, query, kv_cache, attn_metadata, output)
                    continue
            else:
                block_table = attn_metadata.block_table[step.request_indices].contiguous()
                write_kv(layer, self, kv_cache, key[step.source_rows], value[step.source_rows],
                         slot_mapping[step.destination_rows])
            rows_output = self._run_rows(plan, index, layer, query, kv_cache, step.query_rows, step.seq_lens,
                                         block_table, getattr(step, "query_start", None))
            output[step.query_rows] = rows_output.view(-1, *output.shape[1:])
        rows = plan.node_rows
        if rows.numel() == 0:
            return
        if plan.compacts_from_scratch:
            plan.caches[layer.layer_name] = kv_cache
            return
        node_key, node_value = key[rows].contiguous(), value[rows].contiguous()
        if plan.rounds and not plan.uses_scratch:  # path rounds overwrote the nodes' own slots
            write_kv(layer, self, kv_cache, node_key, node_value, slot_mapping[rows])
        slots = plan.slot_mappings.get(id(slot_mapping))  # layers of a KV-cache group share one
        if slots is None:
            slots = plan.slot_mappings[id(slot_mapping)] = slot_mapping.clone()
        plan.stash[layer.layer_name] = LayerStash(
            key=node_key, value=node_value, slot_mapping=slots, kv_cache=kv_cache,
            layer=layer, impl=self,
        )


class RadarCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend whose metadata can carry a RADAR plan (registered for CPU_ATTN)."""

    @staticmethod
    def get_impl_cls() -> type[RadarTreeCPUAttentionImpl]:
        return RadarTreeCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[RadarCPUAttentionMetadataBuilder]:
        return RadarCPUAttentionMetadataBuilder


def register_backend() -> None:
    """Register :class:`RadarCPUAttentionBackend` as the CPU platform's ``CPU_ATTN`` backend."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.backends.registry import register_backend as register

    if current_platform.is_cpu():
        register(AttentionBackendEnum.CPU_ATTN, f"{__name__}.{RadarCPUAttentionBackend.__qualname__}")


def check_backend(layers: Sequence[Any]) -> None:
    """Raise unless every CPU attention layer runs RADAR's impl (e.g. another plugin replaced it)."""
    for layer in layers:
        impl = getattr(layer, "impl", None)
        if impl is not None and not isinstance(impl, RadarTreeCPUAttentionImpl):
            raise ValueError(
                f"RADAR tree mode on CPU needs its CPU attention backend (registered for CPU_ATTN when the "
                f"plugin loads), but layer {getattr(layer, 'layer_name', '?')} uses {type(impl).__name__}; "
                f"is another plugin overriding CPU_ATTN?")


def compact(plan: TreeVerifyPlan, source_index: Tensor, destination_rows: Tensor) -> None:
    """Rewrite stashed node K/V ``source_index`` (into ``plan.node_rows``) at the slots of
    ``destination_rows`` in every stashed layer (plans that do not compact from scratch)."""
    if source_index.numel() == 0:
        return
    for stash in plan.stash.values():
        write_kv(stash.layer, stash.impl, stash.kv_cache, stash.key[source_index], stash.value[source_index],
                 stash.slot_mapping[destination_rows])


def compact_from_scratch(plan: TreeVerifyPlan, sources: Tensor, destinations: Tensor) -> None:
    """Copy blocks ``sources`` onto ``destinations`` (:func:`scratch_compaction`) in every layer the
    plan verified."""
    for kv_cache in plan.caches.values():
        copy_blocks(kv_cache, sources, destinations)
