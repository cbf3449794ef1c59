"""Growth strategies: what a drafting round drafts at each level, and what the policy sees.

The proposer (:mod:`radar_vllm.vllm.proposer`) runs the draft model; a strategy turns each draft
call's logits into the next level's input tokens, the policy state and, at the end, the round's
drafts. Both strategies keep ``width`` rows per request per draft call:

- :class:`ChainGrowth` (width 1): one token per level, the argmax; the state is the ``top_k``
  cumulative log-probs of the chain's would-be children (:func:`chain_frontier_scores`);
- :class:`FrontierGrowth` (width ``top_k``): an EAGLE-2 tree grown by
  :class:`~radar_vllm.core.tree.DraftTreeBuilder`; the state is the frontier's scores.

Per round: ``start(logits)`` after the first draft call, then for every further call
``inputs()`` -> run the draft model over ``[batch, width]`` rows -> ``extend(logits, active)``;
``parent_slots()`` says which row of the previous call feeds each row's hidden state.
``finish()`` returns the round as a :class:`~radar_vllm.core.tree.DraftTree` (a chain is a tree
whose node ``i`` has parent ``i - 1``). Pure torch, no host synchronization before ``finish``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from radar_vllm.core.config import TreeConfig
from radar_vllm.core.policy_state import chain_frontier_scores
from radar_vllm.core.tree import NO_PARENT, PADDING_TOKEN, DraftTree, DraftTreeBuilder


class ChainGrowth:
    """One argmax token per level; padding after each request's stop."""

    width = 1

    def __init__(self, batch_size: int, max_depth: int, state_size: int, device: torch.device) -> None:
        self.state_size = state_size
        self.max_depth = max_depth
        # [batch, max_depth] drafted tokens, PADDING_TOKEN after each request's stop
        self.tokens = torch.full((batch_size, max_depth), PADDING_TOKEN, dtype=torch.long, device=device)
        self.depth = 0
        self._prefix = torch.zeros(batch_size, dtype=torch.float32, device=device)
        self._state: Tensor | None = None
        self._last: Tensor | None = None  # [batch] the last call's argmax, stopped requests included

    def _add(self, logits: Tensor, active: Tensor | None) -> None:
        tokens = logits.argmax(dim=-1)  # argmax of the logits: the stock drafter's token, ties included
        self._state, self._prefix = chain_frontier_scores(self._prefix, torch.log_softmax(logits.float(), dim=-1),
                                                          self.state_size)
        self._last = tokens
        self.tokens[:, self.depth] = tokens if active is None else torch.where(active, tokens, PADDING_TOKEN)
        self.depth += 1

    def start(self, logits: Tensor) -> None:
        """``logits`` [batch, vocab] of the first draft call."""
        self._add(logits, None)

    def inputs(self) -> Tensor:
        """[batch, 1] the next call's input tokens (stopped requests' rows run too, masked)."""
        return self._last.unsqueeze(1)

    def parent_slots(self) -> Tensor:
        """[batch, 1]: every row continues row 0 of the previous call."""
        return torch.zeros(self.tokens.shape[0], 1, dtype=torch.long, device=self.tokens.device)

    def extend(self, logits: Tensor, active: Tensor) -> None:
        """``logits`` [batch, 1, vocab] of the last call; ``active`` [batch] bool: requests still drafting."""
        self._add(logits[:, 0], active)

    def policy_state(self) -> Tensor:
        """[batch, state_size] float32."""
        return self._state

    def finish(self) -> DraftTree:
        batch, depth = self.tokens.shape[0], self.depth
        tokens = self.tokens[:, :depth]
        num_nodes = (tokens != PADDING_TOKEN).sum(dim=1)
        index = torch.arange(depth, device=tokens.device).expand(batch, depth)
        valid = index < num_nodes.unsqueeze(1)
        return DraftTree(
            target_tokens=tokens.clone(), draft_tokens=tokens.clone(),
            parents=torch.where(valid, index - 1, NO_PARENT), depths=torch.where(valid, index + 1, 0),
            scores=torch.where(valid, 0.0, float("-inf")), num_nodes=num_nodes, stop_depth=num_nodes.clone(),
            max_depth=self.max_depth,
        )


class FrontierGrowth:
    """EAGLE-2 frontier trees: every call runs the ``top_k`` frontier nodes of every request."""

    def __init__(self, config: TreeConfig, batch_size: int, state_size: int, device: torch.device) -> None:
        self.width = config.top_k
        self.state_size = state_size
        self.builder = DraftTreeBuilder(config, batch_size, device=device)

    def start(self, logits: Tensor) -> None:
        self.builder.start(torch.log_softmax(logits.float(), dim=-1))

    def inputs(self) -> Tensor:
        return self.builder.frontier_target_tokens

    def parent_slots(self) -> Tensor:
        """[batch, top_k]: the row of the previous call each frontier node grew from (0 after the
        first call, which has one row per request; 0 as well for stopped requests)."""
        return self.builder.frontier_parent_slots.clamp(min=0)

    def extend(self, logits: Tensor, active: Tensor) -> None:
        self.builder.extend(torch.log_softmax(logits.float(), dim=-1), active)

    def policy_state(self) -> Tensor:
        return self.builder.frontier_scores[:, : self.state_size]

    def finish(self) -> DraftTree:
        return self.builder.finalize()
