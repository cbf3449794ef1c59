"""Recording drafting rounds for offline RL (the round tables of radar_vllm.offline.rl.table).

Every round is drafted to the maximum depth D. After each draft call d = 1..D the policy state
(frontier scores) is recorded and the tree that stopping there would have sent is built
(``DraftTreeBuilder.finalize`` does not change the builder). The D counterfactual trees share
most nodes: a node is identified by its token path from the root, and the target's distribution
at a node depends only on that path, so one verify pass over the *union* of the D trees gives the
target rows of every node of every counterfactual tree. For each tree the exact law of the
accepted length follows from the probabilities of its nodes' tokens (verify.py); at temperature 0
the rows are one-hot and the law is a point mass. The decoding itself continues with the full-
depth tree, whose rows are taken from the same pass, so the recorded rounds are exactly the
rounds of full-depth decoding.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from radar_vllm.offline.reference.decoder import FixedDepth, ReferenceDecoder
from radar_vllm.offline.rl.table import RoundTable, TableMetadata
from radar_vllm.core.tree import NO_PARENT, DraftTree, build_tree_from_parents
from radar_vllm.core.verify import (
    acceptance_length_distribution_from_token_probs,
    gather_node_token_probs,
    shape_probs,
)

logger = logging.getLogger(__name__)

# Per-prompt generator seed = seed * PROMPT_SEED_STRIDE + prompt index (a prime stride keeps
# the seeds of different runs apart).
PROMPT_SEED_STRIDE = 1_000_003


@dataclass
class UnionTree:
    """The union of several trees of one round, and where each tree's nodes sit in it."""

    tree: DraftTree
    # per member tree: [num_nodes] union node index of each of its nodes
    members: list[Tensor]


def node_paths_as_tuples(tree: DraftTree) -> list[tuple[int, ...]]:
    """Token path (target ids) from the root to each node of request 0."""
    listed = tree.to_lists()[0]
    paths: list[tuple[int, ...]] = []
    for token, parent in zip(listed["target_tokens"], listed["parents"]):
        prefix = () if parent == NO_PARENT else paths[parent]
        paths.append(prefix + (int(token),))
    return paths


def union_of_trees(trees: Sequence[DraftTree], max_depth: int) -> UnionTree:
    """Merge batch-1 trees by token path; union nodes ordered by depth (parents first)."""
    all_paths: dict[tuple[int, ...], None] = {}
    member_paths = []
    for tree in trees:
        paths = node_paths_as_tuples(tree)
        member_paths.append(paths)
        for path in paths:
            all_paths.setdefault(path, None)
    ordered = sorted(all_paths, key=len)  # stable: insertion order within a depth
    index = {path: i for i, path in enumerate(ordered)}
    parents = [NO_PARENT if len(path) == 1 else index[path[:-1]] for path in ordered]
    tokens = [path[-1] for path in ordered]
    union = build_tree_from_parents([parents], [tokens], max_depth=max_depth,
                                    device=trees[0].device)
    members = [torch.tensor([index[p] for p in paths], dtype=torch.long)
               for paths in member_paths]
    return UnionTree(tree=union, members=members)


def member_rows(union_rows: Tensor, member: Tensor, max_nodes: int) -> Tensor:
    """Rows ``[1 + max_nodes, ...]`` of a member tree taken from the union's verify rows.

    Row 0 (root) is shared; row 1 + i is the union row of the member's node i; padding rows
    repeat row 0 (they are never read for padding nodes).
    """
    index = torch.zeros(1 + max_nodes, dtype=torch.long)
    index[1: 1 + member.numel()] = 1 + member
    return union_rows[index]


@dataclass
class RecordedRound:
    """One round as recorded (tensors for the table, plus the trees for inspection)."""

    # [D, top_k] float32 frontier scores after each call
    states: Tensor
    # [D, D + 1] float32
    accept_probs: Tensor
    # [D] int32
    tree_sizes: Tensor
    trees: list[DraftTree] = field(default_factory=list)
    # committed tokens before the round (prompt + generated); the root is the last one
    context: list[int] = field(default_factory=list)


def record_round(decoder: ReferenceDecoder, temperature: float,
                 generator: torch.Generator | None = None, keep_trees: bool = False
                 ) -> tuple[RecordedRound, list[int]]:
    """Draft one round to full depth, record it, then commit the full-depth tree's outcome.

    Returns the record and the new tokens (accepted drafts + bonus).
    """
    depth = decoder.config.max_depth
    context = list(decoder.tokens)
    draft = decoder.draft_round(FixedDepth(depth), record_trees=True)
    trees = draft.trees
    if len(trees) != depth:
        raise RuntimeError(f"expected {depth} counterfactual trees, got {len(trees)}")
    union = union_of_trees(trees, depth)
    logits, aux = decoder.verify_rows(union.tree)
    if temperature <= 0.0:
        probs = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    else:
        probs = shape_probs(logits, temperature)
    max_nodes = decoder.config.max_nodes
    laws = []
    for tree, member in zip(trees, union.members):
        rows = member_rows(probs, member, max_nodes)[None].to(tree.device)
        token_probs = gather_node_token_probs(tree, rows)
        laws.append(acceptance_length_distribution_from_token_probs(tree, token_probs)[0])
    full_tree, full_member = trees[-1], union.members[-1]
    result = decoder.accept(full_tree, member_rows(logits, full_member, max_nodes), temperature,
                            generator)
    num_accepted = int(result.num_accepted[0])
    nodes = result.accepted_nodes[0, :num_accepted]
    new_tokens = result.output_tokens[0, : num_accepted + 1].tolist()
    decoder.commit((1 + full_member[nodes.cpu()]).tolist(), new_tokens, aux)
    record = RecordedRound(
        states=torch.cat(draft.states).float().cpu(),
        accept_probs=torch.stack(laws).float().cpu(),
        tree_sizes=torch.stack([t.num_nodes[0] for t in trees]).to(torch.int32).cpu(),
        trees=trees if keep_trees else [],
        context=context,
    )
    return record, new_tokens


def collect_prompt(decoder: ReferenceDecoder, prompt_ids: Sequence[int], max_new_tokens: int,
                   temperature: float, generator: torch.Generator | None = None,
                   eos_token_id: int | None = None, keep_trees: bool = False
                   ) -> list[RecordedRound]:
    """Decode one prompt at full depth, recording every round."""
    decoder.start(prompt_ids, temperature, generator)
    generated = 1
    rounds: list[RecordedRound] = []
    last = decoder.tokens[-1]
    while generated < max_new_tokens and not (eos_token_id is not None and last == eos_token_id):
        record, new_tokens = record_round(decoder, temperature, generator, keep_trees)
        rounds.append(record)
        generated += len(new_tokens)
        last = new_tokens[-1]
        if eos_token_id is not None and eos_token_id in new_tokens:
            break
    return rounds


def rounds_to_table(rounds: Sequence[RecordedRound], prompt_indices: Sequence[int],
                    metadata: TableMetadata) -> RoundTable:
    """Stack recorded rounds (``prompt_indices[i]`` = prompt of round i) into a table."""
    depth, width = metadata.max_depth, metadata.state_size
    if rounds:
        states = torch.stack([r.states for r in rounds])
        accept = torch.stack([r.accept_probs for r in rounds])
        sizes = torch.stack([r.tree_sizes for r in rounds])
    else:
        states = torch.zeros(0, depth, width)
        accept = torch.zeros(0, depth, depth + 1)
        sizes = torch.zeros(0, depth, dtype=torch.int32)
    # Rows are laws up to float32 rounding; renormalise so tables validate exactly.
    accept = accept.clamp(min=0.0)
    accept = accept / accept.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return RoundTable(states=states, accept_probs=accept, tree_sizes=sizes,
                      prompt_index=torch.tensor(list(prompt_indices), dtype=torch.int64),
                      metadata=metadata)


def collect_prompts(decoder: ReferenceDecoder, prompts: Sequence[Sequence[int]],
                    prompt_indices: Sequence[int], max_new_tokens: int, temperature: float,
                    metadata: TableMetadata, seed: int = 0, eos_token_id: int | None = None,
                    on_prompt: Callable[[int, int], None] | None = None) -> RoundTable:
    """Record every round of the given prompts into one table (one shard's worth).

    Each prompt gets its own generator seeded from ``seed`` and its index, so a resumed
    collection reproduces the same rounds.
    """
    rounds: list[RecordedRound] = []
    indices: list[int] = []
    started = time.perf_counter()
    for prompt, index in zip(prompts, prompt_indices):
        generator = torch.Generator().manual_seed(seed * PROMPT_SEED_STRIDE + int(index))
        recorded = collect_prompt(decoder, prompt, max_new_tokens, temperature, generator,
                                  eos_token_id)
        rounds.extend(recorded)
        indices.extend([int(index)] * len(recorded))
        if on_prompt is not None:
            on_prompt(int(index), len(recorded))
    logger.info("recorded %d rounds of %d prompts in %.1f s", len(rounds), len(prompts),
                time.perf_counter() - started)
    metadata.num_prompts = len(prompts)
    return rounds_to_table(rounds, indices, metadata)


def describe_versions() -> dict[str, Any]:
    """Versions of the packages that shape the recorded numbers."""
    import importlib.metadata

    versions: dict[str, Any] = {}
    for name in ("radar-vllm", "torch", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
