"""Tree acceptance: greedy, lossless sampling, and the exact acceptance-length law.

Row convention for target outputs: row 0 is the target's prediction at the root (after the last
context token) and row ``1 + i`` the prediction after draft node ``i``. Target tensors are
therefore ``[batch, max_nodes + 1, ...]`` and node i's own token is checked against the row of
its parent (``parents[i] + 1``, or 0 for a depth-1 node).

Sampling rule for deterministic (top-k) drafts, radar-algorithm.md section 2. At the current node
with target distribution p, the children are tried in node order; child x is accepted with
probability p(x) under the current residual p; on rejection p(x) is set to 0 and p renormalised.
If every child is rejected, the bonus token is sampled from the residual; when a leaf is accepted
the bonus is sampled from the leaf's row. Child j is thus accepted with probability
``a_j = p(x_j) / (1 - sum_{l<j} p(x_l))``, so (telescoping) the chance to move to child j is the
original ``p(x_j)`` and the next emitted token is distributed exactly as p. Siblings carrying the
same token (impossible for builder trees) count once: a repeated token has residual mass 0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from radar_vllm.core.tree import NO_PARENT, PADDING_TOKEN, DraftTree

logger = logging.getLogger(__name__)

# Temperatures below this are greedy (the same threshold as vLLM's sampler).
SAMPLING_EPS = 1e-5


@dataclass
class VerifyResult:
    """Outcome of verifying one tree per request."""

    # [batch, max_depth] int64: node indices of the accepted path, depth 1 first; NO_PARENT padded
    accepted_nodes: Tensor
    # [batch] int64: accepted draft tokens (the accepted path's length)
    num_accepted: Tensor
    # [batch] int64: the token the target emits after the accepted path (target vocabulary)
    bonus_token: Tensor
    # [batch, max_depth + 1] int64: accepted tokens then the bonus; PADDING_TOKEN padded
    output_tokens: Tensor
    # [batch] int64: index of the last accepted node; NO_PARENT when nothing was accepted
    last_node: Tensor

    @property
    def num_output_tokens(self) -> Tensor:
        """[batch] int64: tokens emitted this step (accepted + bonus)."""
        return self.num_accepted + 1


# --------------------------------------------------------------------------- shared helpers


def _check_rows(tree: DraftTree, tensor: Tensor, name: str, trailing: int) -> None:
    """``tensor`` must be ``[batch, max_nodes + 1]`` followed by ``trailing`` more dimensions."""
    expected = (tree.batch_size, tree.max_nodes + 1)
    if tensor.dim() != 2 + trailing or tuple(tensor.shape[:2]) != expected:
        dims = ", ".join(["batch", "max_nodes + 1"] + ["V"] * trailing)
        raise ValueError(
            f"{name} must have shape [{dims}] with batch={expected[0]}, max_nodes + 1={expected[1]}; "
            f"got {tuple(tensor.shape)}"
        )


def _parent_rows(tree: DraftTree) -> Tensor:
    """[batch, max_nodes] target row holding each node's prediction context (0 = root)."""
    return torch.where(tree.parents == NO_PARENT, 0, tree.parents + 1)


def _earlier_siblings(tree: DraftTree) -> Tensor:
    """[batch, max_nodes, max_nodes] bool: [b, i, j] iff j < i are valid nodes with the same parent."""
    valid = tree.node_mask
    nodes = tree.max_nodes
    same_parent = tree.parents.unsqueeze(2) == tree.parents.unsqueeze(1)
    earlier = torch.ones(nodes, nodes, dtype=torch.bool, device=tree.device).tril(diagonal=-1)
    return same_parent & earlier & valid.unsqueeze(2) & valid.unsqueeze(1)


def _first_of_siblings(tree: DraftTree, flag: Tensor, siblings: Tensor) -> Tensor:
    """[batch, max_nodes] bool: flagged nodes with no flagged earlier sibling."""
    earlier_flagged = (siblings & flag.unsqueeze(1)).any(dim=2)
    return flag & ~earlier_flagged


def distinct_child_mask(tree: DraftTree) -> Tensor:
    """[batch, max_nodes] bool: valid nodes whose token no earlier sibling carries."""
    siblings = _earlier_siblings(tree)
    same_token = tree.target_tokens.unsqueeze(2) == tree.target_tokens.unsqueeze(1)
    return tree.node_mask & ~(siblings & same_token).any(dim=2)


def _walk(tree: DraftTree, accepted_flag: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Deepest node whose whole path is flagged, and that path.

    ``accepted_flag`` [batch, max_nodes] bool marks nodes accepted given their parent. Returns the
    last node of the longest fully flagged path (the first in node order among equally deep ones;
    NO_PARENT if none) [batch], its depth = accepted count [batch], and its path by depth
    [batch, max_depth] (NO_PARENT padded).
    """
    on_path = accepted_flag
    for _ in range(tree.max_depth - 1):
        parent_on_path = torch.where(
            tree.parents == NO_PARENT, True, on_path.gather(1, tree.parents.clamp(min=0))
        )
        on_path = accepted_flag & parent_on_path
    reached_depth = torch.where(on_path, tree.depths, 0)
    num_accepted = reached_depth.amax(dim=1)
    deepest = reached_depth.argmax(dim=1)  # argmax returns the first maximal index
    last_node = torch.where(num_accepted > 0, deepest, NO_PARENT)

    depth_bound = tree.max_depth
    accepted = torch.full((tree.batch_size, depth_bound + 1), NO_PARENT, dtype=torch.long, device=tree.device)
    node = last_node.unsqueeze(1)  # [batch, 1], walks up to the root
    for _ in range(depth_bound):
        present = node != NO_PARENT
        column = torch.where(present, tree.depths.gather(1, node.clamp(min=0)) - 1, depth_bound)
        accepted.scatter_(1, column, node)
        node = torch.where(present, tree.parents.gather(1, node.clamp(min=0)), NO_PARENT)
    return last_node, num_accepted, accepted[:, :depth_bound]


def _assemble(
    tree: DraftTree, last_node: Tensor, num_accepted: Tensor, accepted: Tensor, bonus: Tensor
) -> VerifyResult:
    path_tokens = torch.where(
        accepted == NO_PARENT, PADDING_TOKEN, tree.target_tokens.gather(1, accepted.clamp(min=0))
    )
    padding = torch.full((tree.batch_size, 1), PADDING_TOKEN, dtype=torch.long, device=tree.device)
    output = torch.cat([path_tokens, padding], dim=1)  # [batch, max_depth + 1]
    output.scatter_(1, num_accepted.unsqueeze(1), bonus.unsqueeze(1))
    return VerifyResult(
        accepted_nodes=accepted,
        num_accepted=num_accepted,
        bonus_token=bonus,
        output_tokens=output,
        last_node=last_node,
    )


# --------------------------------------------------------------------------- greedy


def greedy_verify(tree: DraftTree, target_argmax: Tensor) -> VerifyResult:
    """Longest accepted path and bonus token under greedy target decoding.

    ``target_argmax`` ``[batch, max_nodes + 1]``: the target's argmax at the root and after each
    node. A node is accepted when its token equals the argmax at its parent and its parent is
    accepted; the deepest accepted node ends the accepted path (the first in node order among
    equally deep ones: their tokens are the same). The emitted tokens equal target-only greedy
    decoding.
    """
    _check_rows(tree, target_argmax, "target_argmax", trailing=0)
    argmax = target_argmax.to(device=tree.device, dtype=torch.long)
    predicted = argmax.gather(1, _parent_rows(tree))  # [batch, max_nodes]
    match = tree.node_mask & (tree.target_tokens == predicted)
    last_node, num_accepted, accepted = _walk(tree, match)
    bonus = argmax.gather(1, (last_node + 1).unsqueeze(1)).squeeze(1)
    return _assemble(tree, last_node, num_accepted, accepted, bonus)


# --------------------------------------------------------------------------- sampling


def _per_request(
    value: Tensor | float | int | None, name: str, batch: int | None, device: torch.device, dtype: torch.dtype
) -> Tensor | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.dim() == 0:
            return value.to(device=device, dtype=dtype)
        if value.dim() != 1 or batch is None or value.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or have shape [batch={batch}], got {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype)
    return torch.tensor(value, device=device, dtype=dtype)


def shape_probs(
    logits: Tensor,
    temperature: Tensor | float,
    top_p: Tensor | float | None = None,
    top_k: Tensor | int | None = None,
) -> Tensor:
    """Target probabilities after the request's sampling parameters, float32 ``[..., V]``.

    ``logits`` is ``[batch, ..., V]`` (or ``[V]`` with scalar parameters); each parameter is a
    number or a ``[batch]`` tensor. Semantics follow vLLM's sampler: temperature below
    SAMPLING_EPS is greedy (one-hot at the argmax); otherwise logits are divided by the
    temperature, top-k keeps the logits >= the k-th largest (k <= 0 or k >= V: no limit), top-p
    then keeps the smallest prefix of the descending order whose probability reaches p (at least
    one token), and the result is renormalised by softmax.
    """
    if logits.dim() < 1:
        raise ValueError(f"logits must have a vocabulary dimension, got shape {tuple(logits.shape)}")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and not isinstance(top_k, Tensor) and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise ValueError(f"top_k must be an int or a tensor, got {top_k!r}")

    device = logits.device
    vocab = logits.shape[-1]
    batch = logits.shape[0] if logits.dim() >= 2 else None
    # [batch, 1, ..., 1] so that a per-request value broadcasts over the remaining dims
    view = (-1,) + (1,) * (logits.dim() - 1) if logits.dim() >= 2 else ()

    def per_request(value: Tensor | float | int | None, name: str, dtype: torch.dtype) -> Tensor | None:
        tensor = _per_request(value, name, batch, device, dtype)
        if tensor is None or tensor.dim() == 0:
            return tensor
        return tensor.reshape(view)

    temperature_t = per_request(temperature, "temperature", torch.float32)
    top_p_t = per_request(top_p, "top_p", torch.float32)
    top_k_t = per_request(top_k, "top_k", torch.long)

    scaled = logits.float()
    greedy = temperature_t < SAMPLING_EPS
    scaled = scaled / torch.where(greedy, 1.0, temperature_t)

    if top_p_t is not None or top_k_t is not None:
        sorted_logits, sorted_index = scaled.sort(dim=-1, descending=True)
        if top_k_t is not None:
            k = torch.where((top_k_t <= 0) | (top_k_t >= vocab), vocab, top_k_t)
            kth = sorted_logits.gather(-1, (k - 1).expand(*sorted_logits.shape[:-1], 1))
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        if top_p_t is not None:
            sorted_probs = sorted_logits.softmax(dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # exclusive prefix sum
            drop = mass_before >= top_p_t
            drop[..., 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, sorted_index, sorted_logits)

    probs = scaled.softmax(dim=-1)
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, probs)


def gather_node_token_probs(tree: DraftTree, target_probs: Tensor) -> Tensor:
    """[batch, max_nodes] float32: each node's token probability under its parent's row; 0 for padding.

    ``target_probs`` is ``[batch, max_nodes + 1, V]`` (rows need not be normalised; nothing is
    renormalised here).
    """
    _check_rows(tree, target_probs, "target_probs", trailing=1)
    rows = _parent_rows(tree)
    tokens = tree.target_tokens.clamp(min=0)
    batch_index = torch.arange(tree.batch_size, device=tree.device).unsqueeze(1)
    probs = target_probs.to(tree.device)[batch_index, rows, tokens].float()
    return torch.where(tree.node_mask, probs, 0.0)


def sample_verify(tree: DraftTree, target_probs: Tensor, generator: torch.Generator | None = None) -> VerifyResult:
    """Lossless multi-draft rejection for deterministic drafts (see the module docstring).

    ``target_probs`` ``[batch, max_nodes + 1, V]`` (already shaped, e.g. by ``shape_probs``;
    one-hot rows give greedy verification). The emitted tokens are distributed exactly as
    sampling from the target. ``generator`` must live on the tree's device.
    """
    _check_rows(tree, target_probs, "target_probs", trailing=1)
    target_probs = target_probs.to(tree.device)
    batch, nodes, vocab = tree.batch_size, tree.max_nodes, target_probs.shape[-1]
    siblings = _earlier_siblings(tree)
    row_mass = target_probs.float().sum(dim=-1)  # [batch, nodes + 1]

    # Acceptance probability of each child, given that its parent is reached and every earlier
    # sibling was rejected: p(x) / (residual mass left after the earlier siblings).
    token_probs = gather_node_token_probs(tree, target_probs) * distinct_child_mask(tree)  # [batch, nodes]
    mass_before = (siblings.float() * token_probs.unsqueeze(1)).sum(dim=2)
    remaining = row_mass.gather(1, _parent_rows(tree)) - mass_before
    takes_all = (remaining - token_probs <= 0) & (token_probs > 0)
    accept_prob = torch.where(takes_all, 1.0, token_probs / remaining.clamp(min=torch.finfo(torch.float32).tiny))

    uniform = torch.rand((batch, nodes), generator=generator, device=tree.device)
    accept = tree.node_mask & (uniform < accept_prob)
    chosen = _first_of_siblings(tree, accept, siblings)
    last_node, num_accepted, accepted = _walk(tree, chosen)

    # Bonus: the stop node's row with all its (rejected) children's tokens removed.
    stop_row = (last_node + 1).unsqueeze(1)  # [batch, 1]
    row = target_probs.gather(1, stop_row.unsqueeze(-1).expand(-1, -1, vocab)).squeeze(1).float()  # [batch, V]
    is_child = tree.node_mask & (tree.parents == last_node.unsqueeze(1))
    residual = torch.cat([row, torch.zeros(batch, 1, device=tree.device)], dim=1)
    residual.scatter_(1, torch.where(is_child, tree.target_tokens, vocab), 0.0)
    residual = residual[:, :vocab]
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, row)
    bonus = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return _assemble(tree, last_node, num_accepted, accepted, bonus)


# --------------------------------------------------------------------------- acceptance-length law


def acceptance_length_distribution_from_token_probs(tree: DraftTree, node_token_probs: Tensor) -> Tensor:
    """[batch, max_depth + 1] float32: P(exactly L draft tokens accepted), L = 0..max_depth.

    ``node_token_probs`` ``[batch, max_nodes]``: probability of node i's token under the
    normalised target row of its parent (see ``gather_node_token_probs``); padding ignored.
    A node reached with probability P (the product along its path) stops there with probability
    ``P * (1 - sum of its distinct children's probabilities)``; the root likewise with P = 1.
    Only ``[batch, max_nodes]`` gathered probabilities are needed, never the full vocabulary.
    """
    expected = (tree.batch_size, tree.max_nodes)
    if tuple(node_token_probs.shape) != expected:
        raise ValueError(
            f"node_token_probs must have shape [batch, max_nodes]={list(expected)}, "
            f"got {tuple(node_token_probs.shape)}"
        )
    token_probs = torch.where(distinct_child_mask(tree), node_token_probs.to(tree.device).float(), 0.0)

    reach = token_probs  # [batch, nodes]: probability that the node is accepted
    for _ in range(tree.max_depth - 1):
        parent_reach = torch.where(tree.parents == NO_PARENT, 1.0, reach.gather(1, tree.parents.clamp(min=0)))
        reach = token_probs * parent_reach

    child_mass = torch.zeros(tree.batch_size, tree.max_nodes + 1, device=tree.device)  # row 0: root
    child_mass.scatter_add_(1, _parent_rows(tree), token_probs)
    stop_here = (1.0 - child_mass).clamp(min=0.0)
    distribution = torch.zeros(tree.batch_size, tree.max_depth + 1, device=tree.device)
    distribution[:, 0] = stop_here[:, 0]
    distribution.scatter_add_(1, tree.depths, torch.where(tree.node_mask, reach * stop_here[:, 1:], 0.0))
    return distribution


def acceptance_length_distribution(tree: DraftTree, target_probs: Tensor) -> Tensor:
    """[batch, max_depth + 1] float32 exact law of the accepted length under ``target_probs``.

    ``target_probs`` ``[batch, max_nodes + 1, V]``; rows are normalised before use. For one-hot
    (greedy) rows this is a point mass at the greedy acceptance length.
    """
    _check_rows(tree, target_probs, "target_probs", trailing=1)
    row_mass = target_probs.to(tree.device).float().sum(dim=-1)  # [batch, nodes + 1]
    parent_mass = row_mass.gather(1, _parent_rows(tree))
    token_probs = gather_node_token_probs(tree, target_probs) / parent_mass.clamp(min=torch.finfo(torch.float32).tiny)
    return acceptance_length_distribution_from_token_probs(tree, token_probs)


def mean_acceptance_length(distribution: Tensor) -> Tensor:
    """[...] expected accepted draft tokens of a ``[..., max_depth + 1]`` acceptance-length law."""
    lengths = torch.arange(distribution.shape[-1], device=distribution.device, dtype=distribution.dtype)
    return (distribution * lengths).sum(dim=-1)


# --------------------------------------------------------------------------------------------
# one request's tree inside a verify step of vLLM (rows: root, then node i at row 1 + i)

# Output padding in vLLM's sampler contract (the rejection sampler's PLACEHOLDER_TOKEN_ID), which
# is also the draft tree's padding token.
OUTPUT_PADDING = PADDING_TOKEN


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


def _greedy_law(max_depth: int, num_accepted: int) -> Tensor:
    """The law of a greedy request's accepted length: a point mass (``[max_depth + 1]`` float32)."""
    law = torch.zeros(max_depth + 1)
    law[num_accepted] = 1.0
    return law


def accept_tree(
    tree: DraftTree,  # one request's tree (batch of one), cut to the verified nodes
    rows: Tensor,  # [num_nodes + 1, V] the target's logits at the root and after every node
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    generator: torch.Generator | None,
    with_law: bool = False,
) -> tuple[VerifyResult, Tensor | None]:
    """Greedy or lossless sampled acceptance of one request's tree.

    Returns the result and, when ``with_law``, the exact law of the accepted length under the
    shaped target rows (``[max_depth + 1]`` float32; a point mass for greedy requests).
    """
    if temperature < SAMPLING_EPS:
        result = greedy_verify(tree, rows.argmax(dim=-1).unsqueeze(0))
        return result, _greedy_law(tree.max_depth, int(result.num_accepted[0])) if with_law else None
    probs = shape_probs(rows.unsqueeze(0), temperature, top_p, top_k)  # [1, n + 1, V]
    law = acceptance_length_distribution(tree, probs)[0] if with_law else None
    return sample_verify(tree, probs, generator=generator), law


def accept_trees(
    tree: DraftTree,  # the step's trees, one per request
    logits: Tensor,  # [rows, V] the target's logits of the whole step
    first_rows: Sequence[int],  # per request: its root's row in ``logits`` (its nodes' rows follow)
    temperatures: Sequence[float],
    top_ps: Sequence[float | None],
    top_ks: Sequence[int | None],
    generators: Sequence[torch.Generator | None],
    with_law: bool = False,
) -> tuple[VerifyResult, list[Tensor] | None]:
    """:func:`accept_tree` for every request of a step: the greedy requests in one batched
    :func:`greedy_verify` (one argmax over their rows), each sampling request on its own (its
    shaping and its generator are its own). Returns one result for the batch, in request order,
    and, when ``with_law``, each request's acceptance-length law."""
    batch = tree.batch_size
    for name, values in (("first_rows", first_rows), ("temperatures", temperatures), ("top_ps", top_ps),
                         ("top_ks", top_ks), ("generators", generators)):
        if len(values) != batch:
            raise ValueError(f"{name} has {len(values)} entries for {batch} trees")
    depth_bound, device = tree.max_depth, tree.device
    accepted = torch.full((batch, depth_bound), NO_PARENT, dtype=torch.long, device=device)
    output = torch.full((batch, depth_bound + 1), PADDING_TOKEN, dtype=torch.long, device=device)
    num_accepted = torch.zeros(batch, dtype=torch.long, device=device)
    bonus = torch.zeros(batch, dtype=torch.long, device=device)
    last_node = torch.full((batch,), NO_PARENT, dtype=torch.long, device=device)
    laws: list[Tensor] | None = [torch.zeros(0)] * batch if with_law else None
    num_nodes = tree.num_nodes.tolist()

    def put(rows: Sequence[int], result: VerifyResult) -> None:
        index = torch.as_tensor(rows, dtype=torch.long, device=device)
        accepted[index], output[index] = result.accepted_nodes, result.output_tokens
        num_accepted[index], bonus[index], last_node[index] = result.num_accepted, result.bonus_token, result.last_node

    greedy = [b for b in range(batch) if temperatures[b] < SAMPLING_EPS]
    if greedy:
        trees = tree.select(greedy)
        width = max(num_nodes[b] for b in greedy) + 1
        trees = trees.narrow(width - 1)
        # row j of request b: its root row + j, the last node's row for the padding columns
        offsets = torch.arange(width).unsqueeze(0).expand(len(greedy), width)
        starts = torch.tensor([first_rows[b] for b in greedy]).unsqueeze(1)
        rows = starts + torch.minimum(offsets, torch.tensor([num_nodes[b] for b in greedy]).unsqueeze(1))
        first, last = int(rows.min()), int(rows.max())  # one argmax over the rows' span (a view, no copy)
        span = logits[first: last + 1].argmax(dim=-1)
        argmax = span[(rows - first).reshape(-1).to(span.device)].view(len(greedy), width)
        result = greedy_verify(trees, argmax)
        put(greedy, result)
        if laws is not None:
            for row, b in enumerate(greedy):
                laws[b] = _greedy_law(depth_bound, int(result.num_accepted[row]))
    for b in range(batch):
        if temperatures[b] < SAMPLING_EPS:
            continue
        one = tree.select([b]).narrow(num_nodes[b])
        rows = logits[first_rows[b]: first_rows[b] + num_nodes[b] + 1]
        result, law = accept_tree(one, rows, temperatures[b], top_ps[b], top_ks[b], generators[b], with_law=with_law)
        put([b], result)
        if laws is not None and law is not None:
            laws[b] = law
    return VerifyResult(accepted_nodes=accepted, num_accepted=num_accepted, bonus_token=bonus,
                        output_tokens=output, last_node=last_node), laws


def output_rows(batch_indices: Sequence[int], result: VerifyResult, sampled: Tensor) -> None:
    """Overwrite rows ``batch_indices`` of vLLM's ``[batch, max_sampled]`` int32 sampler output in
    place with ``result``'s rows (request i's row: its accepted tokens + bonus, OUTPUT_PADDING after)."""
    if not len(batch_indices):
        return
    counts = result.num_output_tokens.to(sampled.device)
    if int(counts.max()) > sampled.shape[1]:
        raise ValueError(f"output width {sampled.shape[1]} cannot hold {int(counts.max())} tokens")
    width = min(sampled.shape[1], result.output_tokens.shape[1])
    tokens = result.output_tokens[:, :width].to(sampled.device)
    keep = torch.arange(width, device=sampled.device).unsqueeze(0) < counts.unsqueeze(1)
    if bool((keep & (tokens == PADDING_TOKEN)).any()):
        raise RuntimeError(f"accepted output contains padding: {tokens.tolist()}")
    rows = torch.full((len(batch_indices), sampled.shape[1]), OUTPUT_PADDING, dtype=sampled.dtype,
                      device=sampled.device)
    rows[:, :width] = torch.where(keep, tokens, OUTPUT_PADDING).to(sampled.dtype)
    sampled[torch.as_tensor(batch_indices, dtype=torch.long, device=sampled.device)] = rows
