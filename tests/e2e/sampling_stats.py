"""Statistics shared by the sampling tests: two-sample chi-square on token distributions, and the
exact acceptance law of chain verification recorded inside a running engine.

Chain drafts are greedy (one-hot), so vLLM's rejection sampler accepts draft token x at a
position with probability p(x), the target's probability after temperature; the number of drafts
accepted in a round reaches position k with probability prod_{j <= k} p_j. The recorder computes
the p_j from the target logits the sampler receives (before it touches them) and the realized
number of accepted drafts from what it returns.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

PLACEHOLDER_TOKEN = -1  # vLLM's rejected-slot marker in the sampler output


def chi2_sf(statistic: float, dof: int) -> float:
    """Survival function of the chi-square law (regularized upper incomplete gamma)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(statistic / 2.0, dtype=torch.float64)))


def two_sample_chi2(a: list[int], b: list[int], min_count: int = 10) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom of two samples of tokens (tokens seen fewer
    than ``min_count`` times in both together are pooled into one cell)."""
    counts_a, counts_b = Counter(a), Counter(b)
    pooled_a = pooled_b = 0
    cells = []
    for token, count in (counts_a + counts_b).items():
        if count < min_count:
            pooled_a += counts_a[token]
            pooled_b += counts_b[token]
        else:
            cells.append((counts_a[token], counts_b[token]))
    if pooled_a + pooled_b > 0:
        cells.append((pooled_a, pooled_b))
    n_a, n_b = len(a), len(b)
    statistic = 0.0
    for x, y in cells:
        expected_a = (x + y) * n_a / (n_a + n_b)
        expected_b = (x + y) * n_b / (n_a + n_b)
        statistic += (x - expected_a) ** 2 / expected_a + (y - expected_b) ** 2 / expected_b
    return statistic, max(len(cells) - 1, 1)


def first_tokens_p_values(baseline: list[list[int]], candidate: list[list[int]], positions: int) -> list[float]:
    """Per position, the chi-square p-value of "same token distribution" between two runs."""
    p_values = []
    for position in range(positions):
        a = [out[position] for out in baseline if len(out) > position]
        b = [out[position] for out in candidate if len(out) > position]
        statistic, dof = two_sample_chi2(a, b)
        p_values.append(chi2_sf(statistic, dof))
    return p_values


def install_chain_acceptance_recorder(runner: Any) -> list[tuple[list[float], int]]:
    """Wrap ``runner.rejection_sampler`` so that every sampled (T > 0) request of every verify
    step appends ``(acceptance probability per draft position, drafts accepted)``; returns the list."""
    sampler = runner.rejection_sampler
    original = sampler.forward
    records: list[tuple[list[float], int]] = []

    def forward(metadata: Any, draft_probs: Any, logits: torch.Tensor, sampling_metadata: Any) -> Any:
        temperature = sampling_metadata.temperature
        pending = []
        if draft_probs is None and temperature is not None:
            rows = logits[metadata.target_logits_indices].float()
            drafts = metadata.draft_token_ids.long()
            start = 0
            for request, count in enumerate(metadata.num_draft_tokens):
                t = float(temperature[request])
                if count and t > 0:
                    probs = torch.softmax(rows[start:start + count] / t, dim=-1)
                    picked = probs.gather(1, drafts[start:start + count].unsqueeze(1)).squeeze(1)
                    pending.append((request, picked.tolist()))
                start += count
        output = original(metadata, draft_probs, logits, sampling_metadata)
        sampled = output.sampled_token_ids
        for request, probabilities in pending:
            emitted = int((sampled[request] != PLACEHOLDER_TOKEN).sum())
            records.append((probabilities, emitted - 1))
        return output

    sampler.forward = forward
    return records


def chain_law_by_position(records: list[tuple[list[float], int]]) -> list[dict[str, float]]:
    """Per draft position k (1-based): rounds that drafted it, expected and realized number of
    rounds accepting through k under the exact law, the law's variance and the z score."""
    depth = max((len(p) for p, _ in records), default=0)
    rows = []
    for k in range(1, depth + 1):
        expected = variance = 0.0
        realized = rounds = 0
        for probabilities, accepted in records:
            if len(probabilities) < k:
                continue
            reach = math.prod(probabilities[:k])
            expected += reach
            variance += reach * (1.0 - reach)
            realized += accepted >= k
            rounds += 1
        z = (realized - expected) / math.sqrt(variance) if variance > 0 else 0.0
        rows.append(dict(position=k, rounds=rounds, expected=expected, realized=realized, variance=variance, z=z))
    return rows


def tree_law_z(records: list[tuple[list[float], int]]) -> tuple[float, float, int]:
    """Tree rounds recorded by the tree runner (law of the accepted length, realized length):
    (expected total, realized total, z score)."""
    mean = variance = 0.0
    realized = 0
    for law, accepted in records:
        m = sum(length * p for length, p in enumerate(law))
        mean += m
        variance += sum((length - m) ** 2 * p for length, p in enumerate(law))
        realized += accepted
    z = (realized - mean) / math.sqrt(variance) if variance > 0 else 0.0
    return mean, realized, z
