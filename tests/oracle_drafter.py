"""Test-only drafting helpers, installed on a running in-process engine's RadarProposer.

- :func:`install_oracle`: replaces every tree round's proposal by a random topologically ordered
  tree of the full node budget with the true next tokens (the no-speculation greedy outputs)
  planted along the path to a random node, sometimes with a wrong token part-way, and random
  tokens elsewhere. Acceptance then reaches every depth and branch position, so path
  recomputation, compaction and drafter restart run far more often than with a tiny random head.
  Outputs must still equal the no-speculation outputs token for token.
- :func:`install_recorder`: keeps every round's drafts (``DraftTree``) for the test to inspect.
- :func:`install_gate`: replaces the depth-0 gate by a fixed draft/skip pattern.
- :func:`install_draft_log`: every drafting round's drafts keyed by request prompt and context
  length, so that two runs can be compared where they drafted from the same context.
- :func:`count_calls`: counts calls of a module's ``forward`` (the drafter, the rejection sampler).

Use through ``llm.collective_rpc(lambda worker: install_...(worker.model_runner.drafter, ...))``
on engines run with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``.
"""
from __future__ import annotations

import random
from typing import Any

import torch

from radar_vllm.core.tree import NO_PARENT, PADDING_TOKEN, DraftTree, build_tree_from_parents, node_path


def random_tree(rng: random.Random, num_nodes: int, max_depth: int) -> list[int]:
    """Random parents of a topologically ordered tree with depths <= ``max_depth``."""
    parents: list[int] = []
    depths: list[int] = []
    for i in range(num_nodes):
        parent = rng.choice([NO_PARENT] + [j for j in range(i) if depths[j] < max_depth])
        parents.append(parent)
        depths.append(1 if parent == NO_PARENT else depths[parent] + 1)
    return parents


def plant(rng: random.Random, parents: list[int], truth: list[int], vocab: int) -> list[int]:
    """Random tokens with ``truth`` (the next true tokens) along the path to a random node."""
    tokens = [rng.randrange(vocab) for _ in parents]
    if not parents or not truth:
        return tokens
    path = node_path(parents, rng.randrange(len(parents)))
    wrong_at = rng.randrange(len(path) + 1) if rng.random() < 0.3 else len(path)
    for depth, node in enumerate(path):
        if depth >= len(truth):
            break
        tokens[node] = truth[depth] if depth != wrong_at else (truth[depth] + 1) % vocab
    return tokens


def install_oracle(drafter: Any, requests: list[tuple[list[int], int]], outputs: list[list[int]]) -> None:
    """Plant ``outputs`` (greedy continuations of ``requests``' prompts) in every tree round."""
    oracle = {tuple(ids): list(out) for (ids, _), out in zip(requests, outputs)}
    rng = random.Random(0)
    propose = drafter.propose

    def oracle_propose(num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                       next_token_ids, token_indices_to_sample, common_attn_metadata, *args: Any, **kwargs: Any):
        if token_indices_to_sample is None:
            token_indices_to_sample = common_attn_metadata.query_start_loc[1:] - 1
        last_positions = target_positions[token_indices_to_sample].tolist()  # the row before the bonus token
        drafts = propose(num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                         next_token_ids, token_indices_to_sample, common_attn_metadata, *args, **kwargs)
        tree, runner = drafter.last_tree, drafter.model_runner
        vocab = runner.model_config.get_vocab_size()
        eligible = drafter._eligible(tree.batch_size).tolist()
        parents_rows, token_rows = [], []
        for b, request in enumerate(tree.to_lists()):
            state = runner.requests[runner.input_batch.req_ids[b]]
            expected = oracle.get(tuple(state.prompt_token_ids))
            if expected is None or not eligible[b]:  # keep the drafter's own proposal
                parents_rows.append(request["parents"])
                token_rows.append(request["target_tokens"])
                continue
            first = last_positions[b] + 2 - len(state.prompt_token_ids)  # output index of depth 1
            truth = expected[first : first + drafter.max_depth] if first >= 0 else []
            parents = random_tree(rng, rng.randint(1, num_speculative_tokens), drafter.max_depth)
            parents_rows.append(parents)
            token_rows.append(plant(rng, parents, truth, vocab))
        planted = build_tree_from_parents(parents_rows, token_rows, max_nodes=num_speculative_tokens,
                                          max_depth=drafter.max_depth)
        drafter.last_tree = planted
        output = torch.full_like(drafts, PADDING_TOKEN)
        output[:, : planted.max_nodes] = planted.target_tokens.to(output.device)
        return output

    drafter.propose = oracle_propose


def install_recorder(drafter: Any) -> list[DraftTree]:
    """Every round's drafts from now on, as ``DraftTree`` (chain rounds: chains), filled in place."""
    rounds: list[DraftTree] = []
    propose = drafter.propose

    def recording_propose(*args: Any, **kwargs: Any):
        drafts = propose(*args, **kwargs)
        if drafter.last_tree is not None:
            rounds.append(drafter.last_tree)
        else:
            rows = [[t for t in row if t != PADDING_TOKEN] for row in drafts.tolist()]
            rounds.append(build_tree_from_parents([[NO_PARENT] + list(range(len(r) - 1)) if r else [] for r in rows],
                                                  rows, max_nodes=max(drafts.shape[1], 1)))
        return drafts

    drafter.propose = recording_propose
    return rounds


class ScriptedGate:
    """A depth-0 gate that follows ``pattern`` (True: draft) round after round, cyclically."""

    def __init__(self, pattern: list[bool], max_depth: int) -> None:
        self.pattern = pattern
        self.max_depth = max_depth
        self.own_arms = frozenset({max_depth})  # its drafting cap is the policy's arm, as in an engine
        self.rounds = 0

    def decide(self, batch_size: int, sampling: bool = False) -> int:  # 0 skips, the checkpoint's depth drafts
        choice = self.pattern[self.rounds % len(self.pattern)]
        self.rounds += 1
        return self.max_depth if choice else 0

    def observe(self, *args: Any, **kwargs: Any) -> None:
        pass


def install_gate(drafter: Any, pattern: list[bool]) -> None:
    drafter.gate = ScriptedGate(pattern, drafter.max_depth)


def install_draft_log(drafter: Any) -> dict[tuple[tuple[int, ...], int], tuple[list[int], torch.Tensor]]:
    """{(prompt token ids, context length): (drafted tokens, call 1's logits)} of every round that
    drafted (the logits show differences that the drafted argmax may hide)."""
    log: dict[tuple[tuple[int, ...], int], tuple[list[int], torch.Tensor]] = {}
    propose = drafter.propose
    compute_logits = drafter.model.compute_logits
    first_logits: list[torch.Tensor] = []

    def logging_compute_logits(*args: Any, **kwargs: Any):
        logits = compute_logits(*args, **kwargs)
        if not first_logits:
            first_logits.append(logits.detach().float().clone())
        return logits

    def logging_propose(*args: Any, **kwargs: Any):
        cad = kwargs["common_attn_metadata"]
        rejected = kwargs.get("num_rejected_tokens_gpu")
        lengths = cad.seq_lens.clone() - (rejected if rejected is not None else 0)
        req_ids = list(drafter.model_runner.input_batch.req_ids[: cad.batch_size()])
        first_logits.clear()
        drafts = propose(*args, **kwargs)
        for row, (req_id, length, drafted) in enumerate(zip(req_ids, lengths.tolist(), drafts.tolist())):
            tokens = [t for t in drafted if t != PADDING_TOKEN]
            if tokens:
                log[(tuple(drafter.model_runner.requests[req_id].prompt_token_ids), int(length))] = (
                    tokens, first_logits[0][row])
        return drafts

    drafter.model.compute_logits = logging_compute_logits
    drafter.propose = logging_propose
    return log


def count_calls(owner: Any, name: str = "forward") -> list[int]:
    """A one-element list counting calls of ``owner.<name>`` (a module's ``forward`` by default) from now on."""
    counter = [0]
    method = getattr(owner, name)

    def counting(*args: Any, **kwargs: Any):
        counter[0] += 1
        return method(*args, **kwargs)

    setattr(owner, name, counting)
    return counter
