"""Batched dynamic draft trees, grown one level per draft-model call (EAGLE-2/3 style).

One drafting round of a batch, as data (radar-algorithm.md sections 1 and 3)::

    builder = DraftTreeBuilder(config, batch_size, device, d2t)
    builder.start(root_logprobs)              # first draft call: depth-1 candidates
    while policy says continue for some requests:
        child_logprobs = draft(builder.frontier_target_tokens, ...)
        builder.extend(child_logprobs, active)  # active requests grow one level
    tree = builder.finalize()                  # rerank, keep the best max_nodes nodes

Growth. The first call's ``top_k`` best tokens are the depth-1 candidates and the first frontier
(score = log-prob). Each further call gives, for every frontier node, the log-probs of its next
token; each frontier node proposes its ``top_k`` best children (score = parent score + log-prob),
all ``top_k * top_k`` children become candidates, and the best ``top_k`` of them the new frontier.
Requests stop independently: an inactive request keeps its state and never grows again.

Rerank. ``finalize`` keeps, per request, the best ``max_nodes`` candidates by score. A request that
stopped after the first call gets a flat tree of the best ``max_nodes`` tokens of the whole root
distribution, so the node budget is the same at every depth.

Node order of a ``DraftTree``: score descending, ties broken by depth, then by candidate id (the
order candidates were created in). Scores never increase from parent to child (log-probs are
clamped to <= 0), so this order is topological: a parent always comes before its children, the
kept set is always a connected tree, and every prefix of a tree (``DraftTree.truncate``) is itself
the best-scoring tree of that size.

Candidate ids (``DraftTreeBuilder.candidate_*``, ``frontier_node_ids``), ``K = top_k``::

    [0, K)                                   depth 1 (the first frontier)
    [K + (d - 2) * K*K, K + (d - 1) * K*K)   depth d >= 2; child j of frontier slot f at f * K + j
    [max_candidates, ...)                    extra root tokens, used only by a request that stops
                                             after the first call (flat tree wider than top_k)

Worked example, top_k = 2, one extend: depth-1 ids 0, 1; depth-2 ids 2, 3 (children of frontier
slot 0) and 4, 5 (children of frontier slot 1). With max_nodes = 3 and scores
[-0.1, -1.0, -0.3, -2.0, -1.5, -4.0] the tree keeps ids 0, 2, 1 in that order: node 0 (depth 1),
node 1 = id 2 (parent node 0), node 2 = id 1 (depth 1); parents [NO_PARENT, 0, NO_PARENT].
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from radar_vllm.core.config import TreeConfig

logger = logging.getLogger(__name__)

# Parent index of a depth-1 node (its parent is the root, which is not a node) and of padding.
NO_PARENT = -1
# Token id of padding slots beyond a request's node count.
PADDING_TOKEN = -1


# --------------------------------------------------------------------------------------------
# one request's tree as a parent list (node i's parent, NO_PARENT at depth 1), topologically ordered


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


def recompute_paths(parents: Sequence[int]) -> list[tuple[list[int], int]]:
    """Root-to-leaf paths that cover every node that is not causal-exact, once each.

    Returns ``(path, first)`` per path, leaves in index order: ``path[first:]`` are the nodes it
    covers, ``path[:first]`` ancestors that are causal-exact or covered by an earlier path (the
    covered set stays closed under ancestors, so it meets each path in a prefix). Verifying the
    path as a causal chain gives each of its nodes its tree attention.

    Example: parents ``[-1, 0, -1, 1, 0]`` (nodes 0 and 1 are causal-exact) ->
    ``[([2], 0), ([0, 1, 3], 2), ([0, 4], 1)]``.
    """
    covered = causal_exact_nodes(parents)
    has_child = [False] * len(parents)
    for parent in parents:
        if parent != NO_PARENT:
            has_child[parent] = True
    paths = []
    for leaf in range(len(parents)):
        if has_child[leaf] or covered[leaf]:
            continue
        path = node_path(parents, leaf)
        first = next(k for k, node in enumerate(path) if not covered[node])
        for node in path[first:]:
            covered[node] = True
        paths.append((path, first))
    return paths


def _gather_or(values: Tensor, index: Tensor, fill: Any) -> Tensor:
    """``values.gather(1, index)`` where ``index`` may hold NO_PARENT (-1): those entries get ``fill``."""
    present = index != NO_PARENT
    gathered = values.gather(1, index.clamp(min=0))
    return torch.where(present, gathered, torch.as_tensor(fill, dtype=values.dtype, device=values.device))


def draft_to_target(draft_tokens: Tensor, d2t: Tensor | None) -> Tensor:
    """Map draft-vocabulary ids to target ids (``target = draft + d2t[draft]``); PADDING_TOKEN stays."""
    if d2t is None:
        return draft_tokens.clone()
    present = draft_tokens != PADDING_TOKEN
    safe = draft_tokens.clamp(min=0)
    return torch.where(present, safe + d2t[safe], torch.full_like(draft_tokens, PADDING_TOKEN))


@dataclass
class DraftTree:
    """A batch of verified-ready draft trees, padded to ``N = max_nodes`` nodes per request.

    Valid nodes of request ``b`` are the prefix ``[0, num_nodes[b])``, in topological order
    (parents before children). Node ``i`` of request ``b`` has token ``target_tokens[b, i]``, parent
    ``parents[b, i]`` (a node index, or NO_PARENT for depth 1) and depth ``depths[b, i]`` (1-based;
    its RoPE position is the root's position + depth).
    """

    # [batch_size, max_nodes] int64: token in the target vocabulary; PADDING_TOKEN beyond num_nodes
    target_tokens: Tensor
    # [batch_size, max_nodes] int64: token in the draft vocabulary; PADDING_TOKEN beyond num_nodes
    draft_tokens: Tensor
    # [batch_size, max_nodes] int64: parent node index, NO_PARENT for depth-1 nodes and padding
    parents: Tensor
    # [batch_size, max_nodes] int64: 1-based depth; 0 for padding
    depths: Tensor
    # [batch_size, max_nodes] float32: cumulative draft log-prob; -inf for padding
    scores: Tensor
    # [batch_size] int64: valid nodes per request
    num_nodes: Tensor
    # [batch_size] int64: draft calls made for this request in the round (= deepest grown level)
    stop_depth: Tensor
    # static bound on depths (width of paths()); the TreeConfig's max_depth for built trees
    max_depth: int

    @property
    def batch_size(self) -> int:
        return self.target_tokens.shape[0]

    @property
    def max_nodes(self) -> int:
        return self.target_tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.target_tokens.device

    @property
    def node_mask(self) -> Tensor:
        """[batch_size, max_nodes] bool: True for valid (non-padding) nodes."""
        positions = torch.arange(self.max_nodes, device=self.device)
        return positions[None, :] < self.num_nodes[:, None]

    @property
    def leaf_mask(self) -> Tensor:
        """[batch_size, max_nodes] bool: valid nodes without children."""
        valid = self.node_mask
        # one spare column collects NO_PARENT / padding writes
        has_child = torch.zeros(self.batch_size, self.max_nodes + 1, dtype=torch.bool, device=self.device)
        parent_col = torch.where(valid & (self.parents != NO_PARENT), self.parents, self.max_nodes)
        has_child.scatter_(1, parent_col, True)
        return valid & ~has_child[:, : self.max_nodes]

    @property
    def num_leaves(self) -> Tensor:
        """[batch_size] int64: number of root-to-leaf paths."""
        return self.leaf_mask.sum(dim=1)

    def node_paths(self) -> Tensor:
        """[batch_size, max_nodes, max_depth] int64: the root-to-node path of every node.

        ``node_paths()[b, i, d - 1]`` is the index of node i's ancestor at depth d (node i itself at
        its own depth); entries deeper than node i, and padding rows, are NO_PARENT.
        Example: parents [NO_PARENT, 0, NO_PARENT, 1], max_depth 3 ->
        [[0, -1, -1], [0, 1, -1], [2, -1, -1], [0, 1, 3]].
        """
        batch, nodes, depth_bound = self.batch_size, self.max_nodes, self.max_depth
        # column depth_bound collects the writes of finished walks
        paths = torch.full((batch, nodes, depth_bound + 1), NO_PARENT, dtype=torch.long, device=self.device)
        node = torch.arange(nodes, device=self.device).expand(batch, nodes)
        node = torch.where(self.node_mask, node, NO_PARENT)  # [batch, nodes]: current ancestor
        for _ in range(depth_bound):
            present = node != NO_PARENT
            depth = _gather_or(self.depths, node, 0)
            column = torch.where(present, depth - 1, depth_bound)
            paths.scatter_(2, column.unsqueeze(-1), node.unsqueeze(-1))
            node = _gather_or(self.parents, node, NO_PARENT)
        return paths[..., :depth_bound]

    def ancestor_mask(self) -> Tensor:
        """[batch_size, max_nodes, max_nodes] bool: [b, i, j] is True iff j is i or an ancestor of i.

        Padding rows and columns are False. Every node also sees the root and the context, which
        are not nodes and so not in the mask.
        """
        paths = self.node_paths()
        column = torch.where(paths == NO_PARENT, self.max_nodes, paths)
        mask = torch.zeros(self.batch_size, self.max_nodes, self.max_nodes + 1, dtype=torch.bool, device=self.device)
        mask.scatter_(2, column, True)
        return mask[..., : self.max_nodes]

    def paths(self) -> Tensor:
        """[batch_size, max_leaves, max_depth] int64: root-to-leaf paths of node indices.

        Row ``l < num_leaves[b]`` is the path to request b's l-th leaf (leaves in node order), as in
        ``node_paths``; entries past the leaf's depth and rows past ``num_leaves[b]`` are NO_PARENT.
        ``max_leaves`` is the largest leaf count in the batch, which costs one device-to-host sync:
        use ``node_paths`` with ``leaf_mask`` in hot paths.
        """
        leaf = self.leaf_mask
        order = torch.sort((~leaf).to(torch.int8), dim=1, stable=True).indices  # leaves first
        node_paths = self.node_paths()
        sorted_paths = node_paths.gather(1, order.unsqueeze(-1).expand(-1, -1, self.max_depth))
        is_leaf_row = leaf.gather(1, order)
        sorted_paths = torch.where(is_leaf_row.unsqueeze(-1), sorted_paths, NO_PARENT)
        max_leaves = int(leaf.sum(dim=1).max().item()) if self.batch_size > 0 else 0
        return sorted_paths[:, :max_leaves]

    def truncate(self, num_nodes_per_request: Tensor | int) -> "DraftTree":
        """A copy keeping at most ``num_nodes_per_request`` nodes per request (a prefix of each).

        ``num_nodes_per_request`` is an int or a ``[batch_size]`` tensor; negative tensor entries
        count as 0. Because node order is topological (and by score), each prefix is a valid tree.
        """
        if isinstance(num_nodes_per_request, Tensor):
            if num_nodes_per_request.shape != (self.batch_size,):
                raise ValueError(
                    f"num_nodes_per_request must have shape ({self.batch_size},), "
                    f"got {tuple(num_nodes_per_request.shape)}"
                )
            limit = num_nodes_per_request.to(device=self.device, dtype=torch.long).clamp(min=0)
        else:
            if isinstance(num_nodes_per_request, bool) or not isinstance(num_nodes_per_request, int):
                raise ValueError(f"num_nodes_per_request must be an int or a tensor, got {num_nodes_per_request!r}")
            if num_nodes_per_request < 0:
                raise ValueError(f"num_nodes_per_request must be >= 0, got {num_nodes_per_request}")
            limit = torch.full((self.batch_size,), num_nodes_per_request, dtype=torch.long, device=self.device)
        num_nodes = torch.minimum(self.num_nodes, limit)
        positions = torch.arange(self.max_nodes, device=self.device)
        keep = positions[None, :] < num_nodes[:, None]
        return replace(
            self,
            target_tokens=torch.where(keep, self.target_tokens, PADDING_TOKEN),
            draft_tokens=torch.where(keep, self.draft_tokens, PADDING_TOKEN),
            parents=torch.where(keep, self.parents, NO_PARENT),
            depths=torch.where(keep, self.depths, 0),
            scores=torch.where(keep, self.scores, float("-inf")),
            num_nodes=num_nodes,
            stop_depth=self.stop_depth.clone(),
        )

    def select(self, rows: Tensor | Sequence[int]) -> "DraftTree":
        """The trees of requests ``rows`` (indices into the batch), in that order."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def narrow(self, max_nodes: int) -> "DraftTree":
        """The same trees padded to ``max_nodes`` columns (at least every request's node count)."""
        if self.batch_size and max_nodes < int(self.num_nodes.max()):
            raise ValueError(f"max_nodes={max_nodes} is below a request's node count")
        return replace(self, **{f.name: getattr(self, f.name)[:, :max_nodes] for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor) and getattr(self, f.name).dim() == 2})

    def best_chains(self, rows: Tensor) -> "DraftTree":
        """A copy where requests with ``rows[b]`` True keep only their best-first chain: node 0,
        its first child, that node's first child, ... (node order is by score, so each step takes
        the best-scored child); ``stop_depth`` is kept."""
        batch, depth_bound = self.batch_size, min(self.max_depth, self.max_nodes)
        chain = torch.full((batch, max(depth_bound, 1)), NO_PARENT, dtype=torch.long, device=self.device)
        current = torch.where(self.num_nodes > 0, 0, NO_PARENT)
        for depth in range(depth_bound):
            chain[:, depth] = current
            children = (self.parents == current.unsqueeze(1)) & self.node_mask & (current >= 0).unsqueeze(1)
            current = torch.where(children.any(dim=1), children.int().argmax(dim=1), NO_PARENT)
        present = chain != NO_PARENT
        count = present.sum(dim=1)
        index = torch.arange(chain.shape[1], device=self.device).expand_as(chain)
        pad = self.max_nodes - chain.shape[1]

        def column(values: Tensor, fill: Any) -> Tensor:  # chain values padded to max_nodes columns
            picked = torch.where(present, _gather_or(values, chain, fill), fill)
            return torch.nn.functional.pad(picked, (0, pad), value=fill) if pad else picked

        chains = replace(
            self,
            target_tokens=column(self.target_tokens, PADDING_TOKEN), draft_tokens=column(self.draft_tokens, PADDING_TOKEN),
            parents=torch.nn.functional.pad(torch.where(present, index - 1, NO_PARENT), (0, pad), value=NO_PARENT),
            depths=torch.nn.functional.pad(torch.where(present, index + 1, 0), (0, pad), value=0),
            scores=column(self.scores, float("-inf")), num_nodes=count,
        )
        keep = rows.to(self.device).bool()
        return replace(self, **{f.name: torch.where(keep.view(-1, *[1] * (getattr(self, f.name).dim() - 1)),
                                                    getattr(chains, f.name), getattr(self, f.name))
                                for f in fields(self) if isinstance(getattr(self, f.name), Tensor)})

    def to(self, device: torch.device | str) -> "DraftTree":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device)
        return DraftTree(**moved)

    def to_lists(self) -> list[dict[str, Any]]:
        """Per request, the valid nodes as plain Python lists (for debugging and tests)."""
        host = self.to("cpu")
        result = []
        for b in range(host.batch_size):
            n = int(host.num_nodes[b])
            result.append(
                {
                    "target_tokens": host.target_tokens[b, :n].tolist(),
                    "draft_tokens": host.draft_tokens[b, :n].tolist(),
                    "parents": host.parents[b, :n].tolist(),
                    "depths": host.depths[b, :n].tolist(),
                    "scores": host.scores[b, :n].tolist(),
                    "stop_depth": int(host.stop_depth[b]),
                }
            )
        return result


def build_tree_from_parents(
    parents: Sequence[Sequence[int]],
    tokens: Sequence[Sequence[int]],
    *,
    scores: Sequence[Sequence[float]] | None = None,
    max_nodes: int | None = None,
    max_depth: int | None = None,
    device: torch.device | str | None = None,
) -> DraftTree:
    """A ``DraftTree`` given explicitly, one list per request (draft and target tokens are equal).

    ``parents[b][i]`` must be NO_PARENT or an index < i (topological order). ``max_nodes`` and
    ``max_depth`` default to the largest node count and depth in the batch (at least 1);
    ``scores`` default to 0; ``stop_depth`` is each request's deepest level.
    Example: ``build_tree_from_parents([[-1, 0, 0, 1]], [[5, 6, 7, 8]])`` is root -> 5 -> {6 -> 8, 7}.
    """
    if len(parents) != len(tokens):
        raise ValueError(f"parents has {len(parents)} requests but tokens has {len(tokens)}")
    if scores is not None and len(scores) != len(parents):
        raise ValueError(f"scores has {len(scores)} requests but parents has {len(parents)}")
    all_depths: list[list[int]] = []
    for b, (request_parents, request_tokens) in enumerate(zip(parents, tokens)):
        if len(request_parents) != len(request_tokens):
            raise ValueError(
                f"request {b}: parents has {len(request_parents)} nodes but tokens has {len(request_tokens)}"
            )
        if scores is not None and len(scores[b]) != len(request_parents):
            raise ValueError(f"request {b}: scores has {len(scores[b])} nodes but parents has {len(request_parents)}")
        depths: list[int] = []
        for i, parent in enumerate(request_parents):
            if not (parent == NO_PARENT or 0 <= parent < i):
                raise ValueError(f"request {b}: parents[{i}]={parent} must be {NO_PARENT} or in [0, {i})")
            depths.append(1 if parent == NO_PARENT else depths[parent] + 1)
        for i, token in enumerate(request_tokens):
            if token < 0:
                raise ValueError(f"request {b}: tokens[{i}]={token} must be >= 0")
        all_depths.append(depths)

    largest = max((len(p) for p in parents), default=0)
    deepest = max((max(d, default=0) for d in all_depths), default=0)
    width = max(largest, 1) if max_nodes is None else max_nodes
    depth_bound = max(deepest, 1) if max_depth is None else max_depth
    if width < largest:
        raise ValueError(f"max_nodes={width} is smaller than the largest tree ({largest} nodes)")
    if depth_bound < deepest:
        raise ValueError(f"max_depth={depth_bound} is smaller than the deepest node ({deepest})")

    batch = len(parents)

    def padded(rows: Sequence[Sequence[Any]], fill: Any) -> list[list[Any]]:
        return [list(row) + [fill] * (width - len(row)) for row in rows]

    token_tensor = torch.tensor(padded(tokens, PADDING_TOKEN), dtype=torch.long, device=device).reshape(batch, width)
    score_rows = scores if scores is not None else [[0.0] * len(p) for p in parents]
    return DraftTree(
        target_tokens=token_tensor,
        draft_tokens=token_tensor.clone(),
        parents=torch.tensor(padded(parents, NO_PARENT), dtype=torch.long, device=device).reshape(batch, width),
        depths=torch.tensor(padded(all_depths, 0), dtype=torch.long, device=device).reshape(batch, width),
        scores=torch.tensor(padded(score_rows, float("-inf")), dtype=torch.float32, device=device).reshape(
            batch, width
        ),
        num_nodes=torch.tensor([len(p) for p in parents], dtype=torch.long, device=device),
        stop_depth=torch.tensor([max(d, default=0) for d in all_depths], dtype=torch.long, device=device),
        max_depth=depth_bound,
    )


class DraftTreeBuilder:
    """Growth state of one drafting round for a batch of requests.

    All state lives on ``device`` with static shapes; no method syncs with the host. ``finalize``
    does not change the state, so a caller may finalize after every call (e.g. to build the
    counterfactual trees of every stop depth from the same draft forwards).
    """

    def __init__(
        self,
        config: TreeConfig,
        batch_size: int,
        device: torch.device | str | None = None,
        d2t: Tensor | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if d2t is not None:
            if d2t.dim() != 1:
                raise ValueError(f"d2t must be 1-D [draft_vocab], got shape {tuple(d2t.shape)}")
            if d2t.dtype.is_floating_point or d2t.dtype == torch.bool:
                raise ValueError(f"d2t must hold integers, got dtype {d2t.dtype}")
        if device is None:
            device = d2t.device if d2t is not None else torch.device("cpu")
        self.config = config
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.d2t = None if d2t is None else d2t.to(device=self.device, dtype=torch.long)
        self._depth = 0  # levels grown so far by the most active request; 0 before start()

    # ------------------------------------------------------------------ growth

    def start(self, root_logprobs: Tensor) -> None:
        """Begin a round from the first draft call's log-probs at the root, ``[batch_size, V_draft]``.

        Values above 0 are treated as 0 (log-probs); -inf is allowed. Resets any previous round.
        """
        config = self.config
        top_k = config.top_k
        if root_logprobs.dim() != 2 or root_logprobs.shape[0] != self.batch_size:
            raise ValueError(
                f"root_logprobs must have shape [batch_size={self.batch_size}, V_draft], "
                f"got {tuple(root_logprobs.shape)}"
            )
        vocab = root_logprobs.shape[1]
        if vocab < top_k:
            raise ValueError(f"root_logprobs has V_draft={vocab} < top_k={top_k}")
        if self.d2t is not None and self.d2t.shape[0] != vocab:
            raise ValueError(f"d2t has {self.d2t.shape[0]} entries but root_logprobs has V_draft={vocab}")
        self._vocab = vocab
        batch, device = self.batch_size, self.device
        root_logprobs = root_logprobs.to(device)

        # The flat tree (stop after this call) takes the best max_nodes root tokens; the first
        # top_k of the same ranking are the depth-1 candidates, so both views agree on ties.
        num_root = min(max(top_k, config.max_nodes), vocab)
        root_values, root_tokens = torch.topk(root_logprobs, num_root, dim=-1)  # [batch, num_root]
        root_scores = root_values.float().clamp(max=0.0)
        num_extra = num_root - top_k
        self._num_slots = config.max_candidates + num_extra

        # candidate storage, see the module docstring for the id layout
        self._cand_tokens = torch.full((batch, self._num_slots), PADDING_TOKEN, dtype=torch.long, device=device)
        self._cand_scores = torch.full((batch, self._num_slots), float("-inf"), dtype=torch.float32, device=device)
        self._cand_parents = torch.full((batch, self._num_slots), NO_PARENT, dtype=torch.long, device=device)
        depths = [1] * top_k
        for depth in range(2, config.max_depth + 1):
            depths += [depth] * (top_k * top_k)
        depths += [1] * num_extra
        self._cand_depths = torch.tensor(depths, dtype=torch.long, device=device)  # [num_slots]
        self._is_extra = torch.arange(self._num_slots, device=device) >= config.max_candidates  # [num_slots]

        self._cand_tokens[:, :top_k] = root_tokens[:, :top_k]
        self._cand_scores[:, :top_k] = root_scores[:, :top_k]
        if num_extra > 0:
            self._cand_tokens[:, config.max_candidates :] = root_tokens[:, top_k:]
            self._cand_scores[:, config.max_candidates :] = root_scores[:, top_k:]

        # [batch, top_k] each
        self._frontier_tokens = root_tokens[:, :top_k].clone()
        self._frontier_scores = root_scores[:, :top_k].clone()
        self._frontier_node_ids = torch.arange(top_k, device=device).expand(batch, top_k).clone()
        self._frontier_parent_slots = torch.full((batch, top_k), NO_PARENT, dtype=torch.long, device=device)
        self._alive = torch.ones(batch, dtype=torch.bool, device=device)  # [batch]
        self._num_calls = torch.ones(batch, dtype=torch.long, device=device)  # [batch]
        self._depth = 1

    def extend(self, child_logprobs: Tensor, active: Tensor | None = None) -> None:
        """Grow active requests by one level.

        ``child_logprobs`` ``[batch_size, top_k, V_draft]``: row ``[b, f]`` is the log-prob of the
        next token after frontier slot f. ``active`` ``[batch_size]`` bool (None: all): only active
        requests grow; a request that was inactive once stays stopped (its rows are ignored).
        """
        config = self.config
        top_k = config.top_k
        if self._depth == 0:
            raise RuntimeError("DraftTreeBuilder.extend() called before start()")
        if self._depth >= config.max_depth:
            raise RuntimeError(f"cannot extend beyond max_depth={config.max_depth}: the tree already has that depth")
        expected = (self.batch_size, top_k, self._vocab)
        if tuple(child_logprobs.shape) != expected:
            raise ValueError(
                f"child_logprobs must have shape [batch_size, top_k, V_draft]={list(expected)}, "
                f"got {tuple(child_logprobs.shape)}"
            )
        if active is None:
            grow = self._alive
        else:
            if tuple(active.shape) != (self.batch_size,) or active.dtype != torch.bool:
                raise ValueError(
                    f"active must be a bool tensor of shape ({self.batch_size},), "
                    f"got {active.dtype} {tuple(active.shape)}"
                )
            grow = active.to(self.device) & self._alive  # [batch]
        child_logprobs = child_logprobs.to(self.device)

        new_depth = self._depth + 1
        offset = top_k + (new_depth - 2) * top_k * top_k
        num_children = top_k * top_k
        child_values, child_tokens = torch.topk(child_logprobs, top_k, dim=-1)  # [batch, top_k, top_k]
        child_scores = self._frontier_scores.unsqueeze(-1) + child_values.float().clamp(max=0.0)
        child_scores = child_scores.reshape(self.batch_size, num_children)  # [batch, top_k * top_k]
        child_tokens = child_tokens.reshape(self.batch_size, num_children)
        child_parents = self._frontier_node_ids.unsqueeze(-1).expand(-1, -1, top_k).reshape(self.batch_size, -1)

        block = slice(offset, offset + num_children)
        grow_col = grow.unsqueeze(-1)  # [batch, 1]
        self._cand_tokens[:, block] = torch.where(grow_col, child_tokens, self._cand_tokens[:, block])
        self._cand_scores[:, block] = torch.where(grow_col, child_scores, self._cand_scores[:, block])
        self._cand_parents[:, block] = torch.where(grow_col, child_parents, self._cand_parents[:, block])

        best_scores, best_children = torch.topk(child_scores, top_k, dim=-1)  # [batch, top_k], descending
        self._frontier_tokens = torch.where(grow_col, child_tokens.gather(1, best_children), self._frontier_tokens)
        self._frontier_scores = torch.where(grow_col, best_scores, self._frontier_scores)
        self._frontier_node_ids = torch.where(grow_col, offset + best_children, self._frontier_node_ids)
        self._frontier_parent_slots = torch.where(grow_col, best_children // top_k, NO_PARENT)
        self._alive = grow
        self._num_calls = self._num_calls + grow.long()
        self._depth = new_depth

    def finalize(self) -> DraftTree:
        """Rerank each request's candidates and keep the best ``max_nodes`` as a ``DraftTree``."""
        if self._depth == 0:
            raise RuntimeError("DraftTreeBuilder.finalize() called before start()")
        max_nodes = self.config.max_nodes
        batch, device = self.batch_size, self.device
        stop = self._num_calls.unsqueeze(-1)  # [batch, 1]
        valid = (self._cand_depths.unsqueeze(0) <= stop) & (~self._is_extra.unsqueeze(0) | (stop == 1))

        # Order: valid first, then score descending, then candidate id (two stable sorts).
        key = torch.where(valid, self._cand_scores, float("-inf"))
        by_score = torch.sort(key, dim=1, descending=True, stable=True).indices
        by_valid = torch.sort((~valid.gather(1, by_score)).to(torch.int8), dim=1, stable=True).indices
        order = by_score.gather(1, by_valid)
        selected = order[:, :max_nodes]  # [batch, max_nodes] candidate ids

        num_nodes = torch.clamp(valid.sum(dim=1), max=max_nodes)
        keep = torch.arange(max_nodes, device=device).unsqueeze(0) < num_nodes.unsqueeze(-1)
        draft_tokens = torch.where(keep, self._cand_tokens.gather(1, selected), PADDING_TOKEN)
        scores = torch.where(keep, self._cand_scores.gather(1, selected), float("-inf"))
        depths = torch.where(keep, self._cand_depths[selected], 0)

        # candidate id -> node index (one spare column for padding writes)
        node_of = torch.full((batch, self._num_slots + 1), NO_PARENT, dtype=torch.long, device=device)
        node_index = torch.arange(max_nodes, device=device).expand(batch, max_nodes)
        node_of.scatter_(1, torch.where(keep, selected, self._num_slots), node_index)
        parent_ids = self._cand_parents.gather(1, selected)
        parents = torch.where(keep, _gather_or(node_of, parent_ids, NO_PARENT), NO_PARENT)

        return DraftTree(
            target_tokens=draft_to_target(draft_tokens, self.d2t),
            draft_tokens=draft_tokens,
            parents=parents,
            depths=depths,
            scores=scores,
            num_nodes=num_nodes,
            stop_depth=self._num_calls.clone(),
            max_depth=self.config.max_depth,
        )

    # ------------------------------------------------------------------ state views

    def _require_started(self) -> None:
        if self._depth == 0:
            raise RuntimeError("DraftTreeBuilder: call start() first")

    @property
    def depth(self) -> int:
        """Levels grown by the deepest request (0 before start)."""
        return self._depth

    @property
    def frontier_tokens(self) -> Tensor:
        """[batch_size, top_k] draft-vocabulary ids of the frontier nodes."""
        self._require_started()
        return self._frontier_tokens

    @property
    def frontier_target_tokens(self) -> Tensor:
        """[batch_size, top_k] target-vocabulary ids of the frontier (what an EAGLE-3 draft pass embeds)."""
        self._require_started()
        return draft_to_target(self._frontier_tokens, self.d2t)

    @property
    def frontier_scores(self) -> Tensor:
        """[batch_size, top_k] float32 cumulative log-probs, sorted descending: the policy state."""
        self._require_started()
        return self._frontier_scores

    @property
    def frontier_node_ids(self) -> Tensor:
        """[batch_size, top_k] candidate ids of the frontier nodes."""
        self._require_started()
        return self._frontier_node_ids

    @property
    def frontier_parent_slots(self) -> Tensor:
        """[batch_size, top_k] slot in the previous frontier of each frontier node's parent.

        NO_PARENT after start() and for requests that did not grow in the last extend().
        """
        self._require_started()
        return self._frontier_parent_slots

    @property
    def num_calls(self) -> Tensor:
        """[batch_size] int64 draft calls made per request (its depth)."""
        self._require_started()
        return self._num_calls

    @property
    def active(self) -> Tensor:
        """[batch_size] bool: requests that grew in the last call (may still grow)."""
        self._require_started()
        return self._alive

    @property
    def candidate_tokens(self) -> Tensor:
        """[batch_size, max_candidates] draft-vocabulary ids of grown candidates; PADDING_TOKEN where not grown."""
        self._require_started()
        return self._cand_tokens[:, : self.config.max_candidates]

    @property
    def candidate_scores(self) -> Tensor:
        """[batch_size, max_candidates] float32 cumulative log-probs; -inf where not grown."""
        self._require_started()
        return self._cand_scores[:, : self.config.max_candidates]

    @property
    def candidate_parents(self) -> Tensor:
        """[batch_size, max_candidates] candidate id of each candidate's parent; NO_PARENT at depth 1."""
        self._require_started()
        return self._cand_parents[:, : self.config.max_candidates]

    @property
    def candidate_depths(self) -> Tensor:
        """[max_candidates] int64 depth of each candidate slot (the same for every request)."""
        self._require_started()
        return self._cand_depths[: self.config.max_candidates]

    def ancestor_path(self, node_ids: Tensor) -> Tensor:
        """[batch_size, M, max_depth] candidate ids of the ancestors of ``node_ids`` ``[batch_size, M]``.

        Entry ``[b, m, d - 1]`` is the ancestor at depth d (the node itself at its own depth);
        deeper entries are NO_PARENT. ``ancestor_path(frontier_node_ids)`` tells a drafter which
        earlier draft positions each frontier node attends to.
        """
        self._require_started()
        if node_ids.dim() != 2 or node_ids.shape[0] != self.batch_size:
            raise ValueError(f"node_ids must have shape [batch_size={self.batch_size}, M], got {tuple(node_ids.shape)}")
        depth_bound = self.config.max_depth
        batch, width = node_ids.shape
        paths = torch.full((batch, width, depth_bound + 1), NO_PARENT, dtype=torch.long, device=self.device)
        node = node_ids.to(self.device)
        for _ in range(depth_bound):
            present = node != NO_PARENT
            depth = torch.where(present, self._cand_depths[node.clamp(min=0)], 0)
            column = torch.where(present, depth - 1, depth_bound)
            paths.scatter_(2, column.unsqueeze(-1), node.unsqueeze(-1))
            node = _gather_or(self._cand_parents, node, NO_PARENT)
        return paths[..., :depth_bound]
