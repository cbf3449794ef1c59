"""Synthetic round tables and cost tables with known structure, for tests and demonstrations.

Each synthetic round has a per-level acceptance rate ``a``: the accepted length of the tree sent
after d calls is a geometric law truncated at d, P(L >= j) = a^j for j <= d. The state after call
t + 1 is the frontier's cumulative log-probs, ``(t + 1) * log(a)`` for the best node and lower for
the others, plus a little noise, so the state carries what a policy needs to know.
"""
from __future__ import annotations

from typing import Sequence

import torch

from radar_vllm.core.costs import CostTable
from radar_vllm.offline.rl.table import RoundTable, TableMetadata

SYNTHETIC_MODEL_ID = "synthetic-target"
SYNTHETIC_HEAD_ID = "synthetic-head"


def truncated_geometric(rate: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Acceptance laws ``[R, D, D + 1]`` for per-round rates ``[R]``: stop after d calls gives
    P(L = j) = a^j (1 - a) for j < d and P(L = d) = a^d."""
    rate = rate.double()
    lengths = torch.arange(max_depth + 1, dtype=torch.float64)
    probs = torch.zeros(rate.shape[0], max_depth, max_depth + 1, dtype=torch.float64)
    for d in range(1, max_depth + 1):
        reach = rate[:, None] ** lengths[None, : d + 1]  # P(L >= j), j = 0..d
        law = reach.clone()
        law[:, :d] = reach[:, :d] - reach[:, 1 : d + 1]
        probs[:, d - 1, : d + 1] = law
    return probs.float()


def make_synthetic_table(num_rounds: int, max_depth: int = 5, state_size: int = 4,
                         rates: Sequence[float] | torch.Tensor | None = None,
                         rate_range: tuple[float, float] = (0.3, 0.95), seed: int = 0,
                         tree_size: int = 20, temperature: float = 1.0,
                         head_id: str = SYNTHETIC_HEAD_ID, noise: float = 0.02) -> RoundTable:
    """A table of ``num_rounds`` rounds; rates drawn uniformly from ``rate_range`` unless given."""
    generator = torch.Generator().manual_seed(seed)
    if rates is None:
        low, high = rate_range
        rate = low + (high - low) * torch.rand(num_rounds, generator=generator, dtype=torch.float64)
    else:
        rate = torch.as_tensor(rates, dtype=torch.float64).expand(num_rounds).clone()
    calls = torch.arange(1, max_depth + 1, dtype=torch.float64)
    best = calls[None, :] * torch.log(rate)[:, None]  # [R, D]
    spread = torch.arange(state_size, dtype=torch.float64) * 0.7  # [S]
    states = best[:, :, None] - spread[None, None, :]
    states = states + noise * torch.randn(states.shape, generator=generator, dtype=torch.float64)
    states = torch.sort(states.clamp(max=0.0), dim=-1, descending=True).values
    metadata = TableMetadata(
        model_id=SYNTHETIC_MODEL_ID, head_id=head_id, temperature=temperature, mode="tree",
        top_k=state_size, max_depth=max_depth, total_tokens=tree_size + 1,
        state_size=state_size, prompt_set="synthetic", split="train", seed=seed,
        num_prompts=num_rounds,
    )
    return RoundTable(
        states=states.float(),
        accept_probs=truncated_geometric(rate, max_depth),
        tree_sizes=torch.full((num_rounds, max_depth), tree_size, dtype=torch.int32),
        prompt_index=torch.arange(num_rounds, dtype=torch.int64),
        metadata=metadata,
    )


def make_synthetic_costs(verify_seconds: float = 0.9, first_draft_seconds: float = 0.1,
                         draft_step_seconds: float = 0.15, policy_step_seconds: float = 0.01,
                         decode_step_seconds: float = 0.8, max_tree_size: int = 64,
                         verify_slope: float = 0.0, head_id: str = SYNTHETIC_HEAD_ID
                         ) -> CostTable:
    """A cost table with a verify cost ``verify_seconds + verify_slope * (n - 1)``."""
    sizes = (1, max_tree_size)
    return CostTable(
        verify_num_nodes=sizes,
        verify_seconds=tuple(verify_seconds + verify_slope * (n - 1) for n in sizes),
        first_draft_seconds=first_draft_seconds,
        draft_step_seconds=draft_step_seconds,
        policy_step_seconds=policy_step_seconds,
        decode_step_seconds=decode_step_seconds,
        engine="synthetic",
        model_id=SYNTHETIC_MODEL_ID,
        head_id=head_id,
        machine={"cpu_model": "synthetic", "num_cpus": 1, "accelerator": None},
        metadata={"note": "synthetic costs for tests"},
    )


def expected_tokens_fixed(rate: float, depth: int) -> float:
    """E[L_d] + 1 of the truncated geometric law: 1 + sum_{j=1..d} a^j."""
    return 1.0 + sum(rate ** j for j in range(1, depth + 1)) if depth > 0 else 1.0

