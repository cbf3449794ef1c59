"""Test drafter: random tree shapes with the true continuation planted along one random path.

Used only by the tree-verification tests (enabled by the environment variable
``RADAR_TREE_ORACLE`` = path of a JSON list of ``{"prompt": [ids], "output": [ids]}``, the
no-speculation greedy outputs). Every round it replaces the real drafter's proposal by a random
topologically ordered tree of the full node budget, plants the true next tokens along the path
to a random node (sometimes with a wrong token part-way), and fills the other nodes with random
tokens. Acceptance then reaches every depth and every branch position, so path recomputation,
compaction and drafter restart run far more often than with a tiny random head. Outputs must
still equal the no-speculation outputs token for token.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from radar_vllm.core.tree import NO_PARENT, PADDING_TOKEN
from radar_vllm.vllm.tree_drafter import DraftedTree, tree_proposer_class
from radar_vllm.vllm.tree_verify import node_path

ORACLE_ENV = "RADAR_TREE_ORACLE"


def random_tree(rng: random.Random, num_nodes: int, max_depth: int) -> list[int]:
    """Random parents of a topologically ordered tree with depths <= ``max_depth``."""
    parents: list[int] = []
    depths: list[int] = []
    for i in range(num_nodes):
        choices = [NO_PARENT] + [j for j in range(i) if depths[j] < max_depth]
        parent = rng.choice(choices)
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


def make_oracle_class() -> type:
    base = tree_proposer_class()

    class OracleTreeProposer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            entries = json.loads(Path(__import__("os").environ[ORACLE_ENV]).read_text())
            self.oracle = {tuple(e["prompt"]): list(e["output"]) for e in entries}
            self.rng = random.Random(0)

        def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                    next_token_ids, token_indices_to_sample, common_attn_metadata, *args: Any, **kwargs: Any):
            batch_size = common_attn_metadata.batch_size()
            if token_indices_to_sample is None:
                token_indices_to_sample = common_attn_metadata.query_start_loc[1:] - 1
            last_positions = target_positions[token_indices_to_sample].tolist()  # row before the bonus
            drafts = super().propose(num_speculative_tokens, target_token_ids, target_positions,
                                     target_hidden_states, next_token_ids, token_indices_to_sample,
                                     common_attn_metadata, *args, **kwargs)
            runner = self.model_runner
            vocab = runner.model_config.get_vocab_size()
            output = torch.full_like(drafts, PADDING_TOKEN)
            trees = []
            for b in range(batch_size):
                request = runner.requests[runner.input_batch.req_ids[b]]
                expected = self.oracle.get(tuple(request.prompt_token_ids))
                if expected is None or not self.last_eligible[b]:
                    trees.append(self.last_trees[b])
                    output[b] = drafts[b]
                    continue
                first = last_positions[b] + 2 - len(request.prompt_token_ids)  # output index of depth 1
                truth = expected[first : first + self.max_depth] if first >= 0 else []
                num_nodes = self.rng.randint(1, num_speculative_tokens)
                parents = random_tree(self.rng, num_nodes, self.max_depth)
                tokens = plant(self.rng, parents, truth, vocab)
                trees.append(DraftedTree(parents=tuple(parents), tokens=tuple(tokens)))
                output[b, :num_nodes] = torch.tensor(tokens, dtype=output.dtype)
            self.last_trees = trees
            return output

    return OracleTreeProposer


__all__ = ["ORACLE_ENV", "make_oracle_class", "plant", "random_tree"]
