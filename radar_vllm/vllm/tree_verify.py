"""Tree verification inside vLLM's step: positions, attention plan, acceptance, compaction, restart.

Pure host-side bookkeeping plus torch ops on small tensors; nothing here imports vLLM, so every
piece is unit-tested without an engine (tests/unit/test_vllm_tree_verify.py).

A request's *verify segment* is what vLLM schedules for it in a speculative step: the root token
(the token sampled last step, not yet in the KV cache) followed by its ``n`` draft nodes, in the
proposer's node order (parents before children). vLLM gives the segment the sequential positions
``C .. C + n`` (``C`` = tokens already computed) and one KV slot per row. Tree mode changes:

- **Positions** (:func:`segment_positions`): node ``i`` gets RoPE position ``C + depth(i)``; its
  KV slot stays the one vLLM assigned (row ``1 + i`` of the segment).
- **Attention** (:func:`path_rounds`): a node sees the context, the root, its ancestors and
  itself. Node ``i`` whose ancestors are exactly nodes ``0 .. i - 1`` (``depth(i) == i + 1``) is
  served by the ordinary causal kernel. Every other node is recomputed by the platform kernel as
  a one-token request after its root-to-node path has been written into the slots right after
  the root (rows ``1 .. depth``): same kernel, same reduction order, hence bit-identical to
  decoding the path token by token. One node per request per round; rounds are batched across
  requests.
- **Acceptance**: rows of the target's logits follow verify.py's convention (row 0 = root, row
  ``1 + i`` = after node ``i``), which is exactly vLLM's ``cu_num_sampled_tokens`` layout.
  :func:`output_rows` writes accepted path + bonus in vLLM's sampler contract (``-1`` padded).
- **Compaction** (:func:`compaction_moves`): the accepted path's K/V move to rows ``1 .. m``
  (sequential slots after the root), so vLLM's rollback by count keeps exactly the right cache
  entries. Destination rows never exceed source rows and sources are read from a stash, so the
  order of writes is irrelevant.
- **Drafter restart** (:func:`restart_order`): the segment's rows (input ids, positions, target
  hidden states) are permuted to ``[root, accepted path..., rejected...]``; vLLM's stock padded
  first draft pass then sees the same inputs as after a chain of the accepted tokens.

Worked example: context ``C = 10``, parents ``[-1, 0, -1, 1, 0]`` (node 0 at depth 1, node 1 its
child, node 2 a second depth-1 token, node 3 under node 1, node 4 a second child of node 0).
Depths ``[1, 2, 1, 3, 2]``; positions of the segment ``[10, 11, 12, 11, 13, 12]``. Nodes 0 and 1
are causal-exact (depth == index + 1); nodes 2, 3 and 4 are not (node 3's path ``[0, 1, 3]`` skips
node 2), so three rounds recompute them with paths ``[2]``, ``[0, 1, 3]`` and ``[0, 4]``. If the
target accepts nodes 0 and 4 (path ``[0, 4]``), the bonus comes from row ``1 + 4 = 5``; compaction
moves row 5 (node 4) to row 2; the restart order is ``[0, 1, 5, 2, 3, 4]``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from radar_vllm.core.tree import NO_PARENT, PADDING_TOKEN, DraftTree, build_tree_from_parents
from radar_vllm.core.verify import (
    SAMPLING_EPS,
    VerifyResult,
    acceptance_length_distribution,
    greedy_verify,
    sample_verify,
    shape_probs,
)

logger = logging.getLogger(__name__)

# Output padding in vLLM's sampler contract (the rejection sampler's PLACEHOLDER_TOKEN_ID).
OUTPUT_PADDING = -1


def check_parents(parents: Sequence[int], name: str = "parents") -> None:
    """Raise ValueError unless ``parents`` is a topologically ordered tree (NO_PARENT or < index)."""
    for i, parent in enumerate(parents):
        if not (parent == NO_PARENT or 0 <= parent < i):
            raise ValueError(f"{name}[{i}]={parent} must be {NO_PARENT} or in [0, {i})")


def chain_parents(num_nodes: int) -> list[int]:
    """Parents of a chain of ``num_nodes`` drafts: ``[-1, 0, 1, ...]``."""
    return [NO_PARENT] + list(range(num_nodes - 1)) if num_nodes > 0 else []


def is_chain(parents: Sequence[int]) -> bool:
    return all(parent == i - 1 for i, parent in enumerate(parents))


def node_depths(parents: Sequence[int]) -> list[int]:
    """1-based depth of every node of a topologically ordered tree."""
    depths: list[int] = []
    for parent in parents:
        depths.append(1 if parent == NO_PARENT else depths[parent] + 1)
    return depths


def node_path(parents: Sequence[int], node: int) -> list[int]:
    """Root-to-node node indices (depth 1 first, ``node`` last)."""
    path = []
    while node != NO_PARENT:
        path.append(node)
        node = parents[node]
    return path[::-1]


def cut_tree(parents: Sequence[int], num_nodes: int) -> list[int]:
    """The first ``num_nodes`` nodes (the scheduler may cut drafts to a prefix): still a tree."""
    if num_nodes < 0 or num_nodes > len(parents):
        raise ValueError(f"num_nodes must be in [0, {len(parents)}], got {num_nodes}")
    return list(parents[:num_nodes])


def segment_positions(context_len: int, parents: Sequence[int]) -> list[int]:
    """Positions of the verify segment: root at ``context_len``, node i at ``context_len + depth(i)``."""
    return [context_len] + [context_len + depth for depth in node_depths(parents)]


def causal_exact_nodes(parents: Sequence[int]) -> list[bool]:
    """Per node: True when the causal kernel over the segment already gives its tree attention."""
    return [depth == i + 1 for i, depth in enumerate(node_depths(parents))]


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
    """One kernel call recomputing many node rows, each over private scratch blocks.

    Job ``j`` (a node whose row is recomputed) sees its request's context and root through the
    request's own block table, except that the columns from the one where its path starts are
    swapped for scratch blocks: the first one a copy of the request's block at that column (it
    holds the context's last tokens and the root), the path's K/V written after them.
    """

    # [J] int64: rows recomputed (batch-global)
    query_rows: Tensor
    # [J] int64: request index of each row (its block-table row)
    request_indices: Tensor
    # [J] int32: sequence length seen by each row (context + root + path)
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

    ``segments`` as for :func:`path_rounds`. Jobs are packed in order into rounds until the pool
    ``scratch_blocks`` (kernel block ids) runs out; a job never needs more than
    :func:`max_scratch_blocks_per_job` blocks.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    pool = list(scratch_blocks)
    rounds: list[ScratchRound] = []
    current: dict[str, list[int]] = {}

    def flush() -> None:
        if current.get("query_rows"):
            rounds.append(ScratchRound(**{
                name: torch.tensor(values, dtype=torch.int32 if name == "seq_lens" else torch.long)
                for name, values in current.items()
            }))
        current.clear()
        for name in ScratchRound.__dataclass_fields__:
            current[name] = []

    flush()
    used = 0
    for request_index, first_row, context_len, parents in segments:
        for node, exact in enumerate(causal_exact_nodes(parents)):
            if exact:
                continue
            path = node_path(parents, node)
            needed = scratch_blocks_per_job(context_len, len(path), block_size)
            if needed > len(pool):
                raise ValueError(
                    f"a path of {len(path)} nodes needs {needed} scratch blocks of {block_size} tokens, "
                    f"the pool has {len(pool)}")
            if used + needed > len(pool):
                flush()
                used = 0
            job = len(current["query_rows"])
            start = context_len + 1  # position of the path's first node
            first_column = start // block_size
            blocks = pool[used : used + needed]
            used += needed
            current["query_rows"].append(first_row + 1 + node)
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


def compaction_moves(first_row: int, accepted_nodes: Sequence[int]) -> list[tuple[int, int]]:
    """``(source_row, destination_row)`` pairs moving the accepted path to rows after the root.

    ``accepted_nodes`` are node indices, depth 1 first. Rows already in place are skipped.
    """
    moves = []
    for depth, node in enumerate(accepted_nodes, start=1):
        if node + 1 != depth:
            moves.append((first_row + 1 + node, first_row + depth))
    return moves


def restart_order(num_nodes: int, accepted_nodes: Sequence[int]) -> list[int]:
    """Permutation of a segment's ``1 + num_nodes`` rows: root, accepted path, then the rest."""
    accepted_rows = [1 + node for node in accepted_nodes]
    taken = set(accepted_rows)
    rest = [row for row in range(1, num_nodes + 1) if row not in taken]
    return [0] + accepted_rows + rest


# --------------------------------------------------------------------------------------------
# acceptance


@dataclass
class TreeRequest:
    """One request's tree in a verify step."""

    batch_index: int  # row of the request in the batch
    first_logit_row: int  # row of its root prediction in the step's logits
    parents: list[int]  # [n] node parents (cut to the scheduled prefix)
    tokens: list[int]  # [n] node tokens (target vocabulary)


def _single_tree(request: TreeRequest, device: torch.device) -> DraftTree:
    n = len(request.parents)
    return build_tree_from_parents(
        [request.parents], [request.tokens], max_nodes=max(n, 1), max_depth=max(node_depths(request.parents), default=1),
        device=device,
    )


def accept_tree(
    request: TreeRequest,
    # [num_logit_rows, V] target logits of the whole step
    logits: Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    generator: torch.Generator | None,
    with_law: bool = False,
) -> tuple[VerifyResult, Tensor | None]:
    """Greedy or lossless sampled acceptance of one request's tree (batch of one).

    Returns the result and, when ``with_law``, the exact law of the accepted length under the
    shaped target rows (``[max_depth + 1]`` float32; a point mass for greedy requests).
    """
    n = len(request.parents)
    rows = logits[request.first_logit_row : request.first_logit_row + n + 1]  # [n + 1, V]
    tree = _single_tree(request, logits.device)
    if temperature < SAMPLING_EPS:
        result = greedy_verify(tree, rows.argmax(dim=-1).unsqueeze(0))
        law = None
        if with_law:
            law = torch.zeros(tree.max_depth + 1)
            law[int(result.num_accepted[0])] = 1.0
        return result, law
    probs = shape_probs(rows.unsqueeze(0), temperature, top_p, top_k)  # [1, n + 1, V]
    law = acceptance_length_distribution(tree, probs)[0] if with_law else None
    return sample_verify(tree, probs, generator=generator), law


def output_rows(results: Sequence[tuple[int, VerifyResult]], sampled: Tensor) -> None:
    """Overwrite rows of vLLM's ``[batch, max_sampled]`` int32 sampler output in place.

    ``results``: ``(batch_index, VerifyResult of a batch of one)``; the row becomes accepted
    tokens + bonus, OUTPUT_PADDING after.
    """
    for batch_index, result in results:
        count = int(result.num_accepted[0]) + 1
        if count > sampled.shape[1]:
            raise ValueError(f"output width {sampled.shape[1]} cannot hold {count} tokens")
        sampled[batch_index].fill_(OUTPUT_PADDING)
        tokens = result.output_tokens[0, :count]
        if bool((tokens == PADDING_TOKEN).any()):
            raise RuntimeError(f"accepted output contains padding: {tokens.tolist()}")
        sampled[batch_index, :count] = tokens.to(sampled.dtype)


__all__ = [
    "OUTPUT_PADDING",
    "PathRound",
    "TreeRequest",
    "accept_tree",
    "causal_exact_nodes",
    "chain_parents",
    "check_parents",
    "compaction_moves",
    "cut_tree",
    "is_chain",
    "node_depths",
    "node_path",
    "output_rows",
    "path_rounds",
    "restart_order",
    "ScratchRound",
    "max_scratch_blocks_per_job",
    "scratch_blocks_per_job",
    "scratch_rounds",
    "segment_positions",
]
