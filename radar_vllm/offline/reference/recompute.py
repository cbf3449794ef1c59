"""Slow, cache-free recomputations used to check the reference decoder and the recorded data.

No KV cache and no tree mask: the target runs once over the whole context; the head runs
causally over the whole chain (committed positions, then the drafted path) once per step. A tree
node's draft distribution must equal the one computed here along its root-to-node path.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor


@torch.no_grad()
def path_draft_logprobs(target: Any, head: Any, context: Sequence[int], path: Sequence[int]
                        ) -> list[Tensor]:
    """Draft log-probs ``[V_draft]`` at the root and after each token of ``path`` (target ids).

    ``context`` is the committed sequence whose last token is the round's root.
    """
    out = target(input_ids=torch.tensor([list(context)]), output_hidden_states=True)
    aux = torch.cat([out.hidden_states[layer][0] for layer in head.config.aux_layer_ids], -1)
    hidden = head.combine_hidden_states(aux[:-1].to(head.fc.weight.dtype))  # positions 0..m-2
    tokens = list(context[1:])  # the token after each position
    result = []
    for step in range(len(path) + 1):
        length = hidden.shape[0]
        normed, prenorm, _ = head(hidden[None], torch.arange(length)[None],
                                  input_ids=torch.tensor([tokens]))
        result.append(torch.log_softmax(head.compute_logits(normed[0, -1]).float(), -1))
        if step < len(path):
            hidden = torch.cat([hidden, prenorm[0, -1:]])
            tokens.append(int(path[step]))
    return result


@torch.no_grad()
def target_distribution(target: Any, tokens: Sequence[int], temperature: float) -> Tensor:
    """float64 ``[V]`` next-token law of the target after ``tokens`` (one-hot at temperature 0)."""
    logits = target(input_ids=torch.tensor([list(tokens)])).logits[0, -1].double()
    if temperature <= 0.0:
        return torch.zeros_like(logits).scatter_(0, logits.argmax().view(1), 1.0)
    return torch.softmax(logits / temperature, -1)


def brute_force_acceptance_law(target: Any, context: Sequence[int], tokens: Sequence[int],
                               parents: Sequence[int], max_depth: int, temperature: float
                               ) -> list[float]:
    """Exact law of the accepted length of a tree by enumerating the sequential rejection.

    At each reached node the children are tried in node order; a child is accepted with its
    probability under the residual target law, which then loses that token and is renormalised.
    ``tokens``/``parents`` list the tree's nodes (parents before children, -1 = the root).
    """
    children: dict[int, list[int]] = {}
    paths: list[list[int]] = []
    for index, (token, parent) in enumerate(zip(tokens, parents)):
        children.setdefault(parent, []).append(index)
        paths.append(([] if parent == -1 else paths[parent]) + [int(token)])
    law = [0.0] * (max_depth + 1)

    def walk(node: int, probability: float) -> None:
        path = [] if node == -1 else paths[node]
        residual = target_distribution(target, list(context) + path, temperature).clone()
        remaining = probability
        for child in children.get(node, []):
            total = float(residual.sum())
            accept = float(residual[tokens[child]]) / total if total > 0 else 0.0
            walk(child, remaining * accept)
            remaining *= 1.0 - accept
            residual[tokens[child]] = 0.0
        law[len(path)] += remaining

    walk(-1, 1.0)
    return law
