"""Reference speculative decoder: an HF target + an EAGLE-3 head + the RADAR draft tree.

Batch size 1, plain PyTorch, CPU or GPU, no vLLM. One round::

    root log-probs (head first call) -> builder.start
    [stop rule says continue] -> head tree call over the frontier -> builder.extend    (repeat)
    builder.finalize -> target verify pass (tree mask) -> greedy / lossless sampling acceptance
    -> keep the accepted path in the target cache -> head first call on the new tokens

The greedy output equals target-only greedy decoding; with sampling the output is distributed
as target sampling (verify.py). Stop rules: a fixed depth, or a StopPolicy (threshold or
sampled decisions) fed the frontier scores after every draft call.

``draft_round`` and ``commit`` are separate so that data collection can build every
counterfactual tree of a round from the same draft forwards (see radar_vllm.offline.reference.record).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from radar_vllm.core.config import TreeConfig
from radar_vllm.core.policy_state import chain_frontier_scores
from radar_vllm.core.policy import (
    DECISION_SAMPLED,
    DECISION_THRESHOLD,
    StopPolicy,
    continue_probability,
)
from radar_vllm.offline.reference.runners import HeadRunner, TargetRunner
from radar_vllm.core.tree import NO_PARENT, DraftTree, DraftTreeBuilder
from radar_vllm.core.verify import VerifyResult, greedy_verify, sample_verify, shape_probs

logger = logging.getLogger(__name__)

GREEDY_TEMPERATURE = 0.0


# ---------------------------------------------------------------------- stop rules
class StopRule:
    """Decides after each draft call of a round whether to draft one more level."""

    def begin_round(self) -> None:
        """Called before the first decision of every round."""

    def should_continue(self, frontier_scores: Tensor, num_calls: int) -> bool:
        """``frontier_scores`` ``[1, state_size]`` (the policy state) after ``num_calls`` calls."""
        raise NotImplementedError


class FixedDepth(StopRule):
    """Always draft ``depth`` levels (draft calls) per round."""

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth

    def should_continue(self, frontier_scores: Tensor, num_calls: int) -> bool:
        return num_calls < self.depth


class PolicyStop(StopRule):
    """A StopPolicy, its recurrent state reset every round."""

    def __init__(self, policy: StopPolicy, decision: str | None = None,
                 threshold: float | None = None, generator: torch.Generator | None = None
                 ) -> None:
        self.policy = policy.eval()
        self.decision = decision or policy.config.decision
        if self.decision not in (DECISION_THRESHOLD, DECISION_SAMPLED):
            raise ValueError(f"decision must be {DECISION_THRESHOLD!r} or {DECISION_SAMPLED!r}, "
                             f"got {self.decision!r}")
        self.threshold = policy.config.threshold if threshold is None else threshold
        self.generator = generator
        self.hidden: Any = None
        self.num_steps = 0

    def begin_round(self) -> None:
        self.hidden = None

    @torch.no_grad()
    def should_continue(self, frontier_scores: Tensor, num_calls: int) -> bool:
        device = next(self.policy.parameters()).device
        state = self.policy.features(frontier_scores.to(device))
        logits, self.hidden = self.policy.step(state, self.hidden)
        self.num_steps += 1
        p_continue = float(continue_probability(logits)[0])
        if self.decision == DECISION_THRESHOLD:
            return p_continue >= self.threshold
        uniform = float(torch.rand((), generator=self.generator))
        return uniform < p_continue


# ---------------------------------------------------------------------- results
@dataclass
class RoundDraft:
    """The draft side of one round, before verification."""

    root_token: int
    builder: DraftTreeBuilder
    # frontier scores [1, top_k] after each draft call (call 1 first)
    states: list[Tensor] = field(default_factory=list)
    # with record_trees: the tree finalize() gives after each draft call (call 1 first)
    trees: list[DraftTree] = field(default_factory=list)
    draft_seconds: float = 0.0


@dataclass
class VerifiedRound:
    """A drafted and verified round, before :meth:`ReferenceDecoder.commit`."""

    draft: RoundDraft
    logits: Tensor  # [1 + n, V] the verify pass's target logits (row 0: the root)
    aux: Tensor  # the pass's aux hidden-state rows
    nodes: list[int]  # accepted node indices, depth 1 first
    new_tokens: list[int]  # the accepted tokens, then the bonus token

    @property
    def accepted_rows(self) -> list[int]:
        """Verify-pass rows of the accepted path."""
        return [1 + node for node in self.nodes]

    @property
    def bonus_row(self) -> int:
        """The verify-pass row whose target distribution gave the bonus token."""
        return self.accepted_rows[-1] if self.nodes else 0


@dataclass
class GenerationResult:
    tokens: list[int]
    # per round: draft calls, accepted draft tokens
    draft_calls: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_rounds(self) -> int:
        return len(self.draft_calls)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per round including the bonus token."""
        return (sum(self.accepted) + len(self.accepted)) / max(len(self.accepted), 1)


class ReferenceDecoder:
    """Speculative decoding with a dynamic draft tree (batch size 1).

    Chain mode (``chain_state_size`` set, ``tree_config.top_k`` must be 1): each call drafts the
    argmax token, the round sends the chain of its ``d`` drafted tokens, and the policy state is
    radar_vllm.core.policy_state' chain state of width ``chain_state_size`` (what the vLLM chain path
    feeds the policy).
    """

    def __init__(self, target: Any, head: Any, tree_config: TreeConfig,
                 chain_state_size: int | None = None) -> None:
        if chain_state_size is not None:
            if tree_config.top_k != 1:
                raise ValueError(f"chain mode needs tree_config.top_k=1, got {tree_config.top_k}")
            if chain_state_size < 1:
                raise ValueError(f"chain_state_size must be >= 1, got {chain_state_size}")
        self.config = tree_config
        self.chain_state_size = chain_state_size
        self.target = TargetRunner(target, head.config.aux_layer_ids)
        self.head = HeadRunner(head)
        self.d2t = head.d2t
        self.device = self.head.device
        self._tokens: list[int] = []
        self._root_logprobs: Tensor | None = None
        self._root_hidden: Tensor | None = None

    # ------------------------------------------------------------------ request state
    @property
    def tokens(self) -> list[int]:
        """Committed tokens of the current request (prompt + generated)."""
        return self._tokens

    def sample_token(self, logits: Tensor, temperature: float,
                     generator: torch.Generator | None) -> int:
        if temperature <= GREEDY_TEMPERATURE:
            return int(logits.argmax())
        probs = shape_probs(logits[None], temperature)[0]
        return int(torch.multinomial(probs, 1, generator=generator))

    def start(self, prompt_ids: Sequence[int], temperature: float = GREEDY_TEMPERATURE,
              generator: torch.Generator | None = None) -> int:
        """Prefill the prompt, emit the first token with the target, run the head's first call.

        Returns the first generated token.
        """
        if len(prompt_ids) < 1:
            raise ValueError("prompt_ids must hold at least one token")
        prompt = torch.tensor(list(prompt_ids), dtype=torch.long)
        logits, aux = self.target.prefill(prompt)
        first = self.sample_token(logits[-1], temperature, generator)
        self._tokens = list(prompt_ids) + [first]
        self.head.reset()
        following = torch.tensor(self._tokens[1:], dtype=torch.long)
        self._root_logprobs, self._root_hidden = self.head.first_call(aux, following)
        return first

    # ------------------------------------------------------------------ drafting
    def draft_round(self, rule: StopRule, record_trees: bool = False) -> RoundDraft:
        """Grow the tree of the current round until ``rule`` stops it (or max_depth)."""
        started = time.perf_counter()
        config = self.config
        self.head.discard_tree()
        builder = DraftTreeBuilder(config, 1, self.device, d2t=self.d2t)
        assert self._root_logprobs is not None and self._root_hidden is not None
        builder.start(self._root_logprobs[None])
        draft = RoundDraft(root_token=self._tokens[-1], builder=builder)
        rule.begin_round()
        # candidate id -> pre-norm hidden of the head's step that read that candidate
        hidden_of: dict[int, Tensor] = {}
        entry_ids: list[Tensor] = []  # candidate ids of the head's tree entries, in cache order
        chain_prefix = torch.zeros(1, device=self.device)  # [1] chain mode only
        step_logprobs = self._root_logprobs[None]  # [1, V_draft]: the last call's distribution
        while True:
            if self.chain_state_size is None:
                state = builder.frontier_scores.clone()
            else:
                state, chain_prefix = chain_frontier_scores(chain_prefix, step_logprobs,
                                                            self.chain_state_size)
            draft.states.append(state)
            if record_trees:
                draft.trees.append(self.finalize(builder))
            calls = builder.depth
            if calls >= config.max_depth or not rule.should_continue(state, calls):
                break
            frontier = builder.frontier_node_ids[0]  # [K]
            parents = builder.candidate_parents[0, frontier]  # [K]
            hidden = torch.stack([
                self._root_hidden if int(p) == NO_PARENT else hidden_of[int(p)]
                for p in parents.tolist()])  # [K, H]
            depths = builder.candidate_depths[frontier]  # [K]
            ancestors = builder.ancestor_path(frontier[None])[0]  # [K, max_depth]
            if entry_ids:
                entries = torch.cat(entry_ids)  # [E]
                strict = ancestors != frontier[:, None]
                visible = ((entries[None, :, None] == ancestors[:, None, :]) &
                           strict[:, None, :]).any(-1)  # [K, E]
            else:
                visible = torch.zeros(frontier.shape[0], 0, dtype=torch.bool)
            logprobs, prenorm = self.head.tree_call(builder.frontier_target_tokens[0], hidden,
                                                    depths, visible)
            for slot, candidate in enumerate(frontier.tolist()):
                hidden_of[candidate] = prenorm[slot]
            entry_ids.append(frontier.clone())
            builder.extend(logprobs[None])
            step_logprobs = logprobs[:1]
        draft.draft_seconds = time.perf_counter() - started
        return draft

    def finalize(self, builder: DraftTreeBuilder) -> DraftTree:
        """The tree a stop now sends: the reranked tree, or in chain mode the drafted chain."""
        tree = builder.finalize()
        if self.chain_state_size is not None:
            tree = tree.truncate(builder.num_calls)
        return tree

    # ------------------------------------------------------------------ verification
    def verify_rows(self, tree: DraftTree) -> tuple[Tensor, Tensor]:
        """Target logits/aux ``[1 + n, ...]`` of the root + ``tree`` (rows as in verify.py)."""
        return self.target.verify(self._tokens[-1], tree)

    def accept(self, tree: DraftTree, logits: Tensor, temperature: float,
               generator: torch.Generator | None) -> VerifyResult:
        """Acceptance of ``tree`` given its verify rows ``logits [1 + n, V]``."""
        padded = torch.zeros(1 + tree.max_nodes, logits.shape[-1], dtype=logits.dtype)
        padded[: logits.shape[0]] = logits
        if temperature <= GREEDY_TEMPERATURE:
            return greedy_verify(tree, padded.argmax(-1)[None].to(tree.device))
        probs = shape_probs(padded[None], temperature).to(tree.device)
        return sample_verify(tree, probs, generator=generator)

    def commit(self, accepted_rows: Sequence[int], new_tokens: Sequence[int], aux: Tensor
               ) -> None:
        """Keep the root and the accepted rows of the last verify pass; feed the head.

        ``accepted_rows`` are verify-pass rows (1 + node index) of the accepted path, depth 1
        first; ``new_tokens`` the accepted tokens then the bonus; ``aux`` the pass's aux rows.
        """
        context = self.target.cache_length - aux.shape[0]
        self.target.keep(context, [0] + list(accepted_rows))
        rows = torch.tensor([0] + list(accepted_rows), dtype=torch.long)
        self._tokens.extend(int(t) for t in new_tokens)
        following = torch.tensor(list(new_tokens), dtype=torch.long)
        self._root_logprobs, self._root_hidden = self.head.first_call(aux[rows], following)

    def verify_round(self, rule: StopRule, temperature: float = GREEDY_TEMPERATURE,
                     generator: torch.Generator | None = None) -> VerifiedRound:
        """Draft and verify one round without committing it (:meth:`commit` takes its rows)."""
        draft = self.draft_round(rule)
        tree = self.finalize(draft.builder)
        logits, aux = self.verify_rows(tree)
        result = self.accept(tree, logits, temperature, generator)
        num_accepted = int(result.num_accepted[0])
        return VerifiedRound(draft=draft, logits=logits, aux=aux,
                             nodes=result.accepted_nodes[0, :num_accepted].tolist(),
                             new_tokens=result.output_tokens[0, : num_accepted + 1].tolist())

    def step(self, rule: StopRule, temperature: float = GREEDY_TEMPERATURE,
             generator: torch.Generator | None = None) -> tuple[list[int], int, int]:
        """One round: draft, verify, commit. Returns (new tokens, draft calls, accepted)."""
        verified = self.verify_round(rule, temperature, generator)
        self.commit(verified.accepted_rows, verified.new_tokens, verified.aux)
        return verified.new_tokens, int(verified.draft.builder.depth), len(verified.nodes)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, rule: StopRule,
                 temperature: float = GREEDY_TEMPERATURE,
                 generator: torch.Generator | None = None, eos_token_id: int | None = None,
                 on_round: Callable[[list[int]], None] | None = None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens (stopping after ``eos_token_id``)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        started = time.perf_counter()
        first = self.start(prompt_ids, temperature, generator)
        result = GenerationResult(tokens=[first])
        while len(result.tokens) < max_new_tokens and not (
                eos_token_id is not None and result.tokens[-1] == eos_token_id):
            new_tokens, calls, accepted = self.step(rule, temperature, generator)
            result.draft_calls.append(calls)
            result.accepted.append(accepted)
            result.tokens.extend(new_tokens)
            if on_round is not None:
                on_round(new_tokens)
            if eos_token_id is not None and eos_token_id in new_tokens:
                result.tokens = result.tokens[: result.tokens.index(eos_token_id) + 1]
                break
        result.tokens = result.tokens[:max_new_tokens]
        result.seconds = time.perf_counter() - started
        return result


def target_greedy(model: Any, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Target-only greedy decoding with a plain KV cache (the exactness reference)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([list(prompt_ids)])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out
