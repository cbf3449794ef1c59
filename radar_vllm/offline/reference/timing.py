"""Measured step costs of the reference decoder on this machine -> a CostTable.

What is timed (median of ``repeats`` runs after warm-up, with a device sync on CUDA):

- verify(n): the target's tree pass over the root + an n-node tree (prefix of a real full-depth
  tree) and the acceptance on it;
- first draft call: the head's first call over ``first_call_tokens`` newly committed tokens,
  the round set-up (``DraftTreeBuilder.start``) and the final rerank (``finalize``);
- draft step: (round drafted to D levels - round drafted to 1 level) / (D - 1);
- policy step: one StopPolicy decision with the host read-back the reference loop does;
- decode step: one plain target step (depth 0, no speculation).

The caches are restored after every timed call, so every measurement sees the same context.
Nothing is hand-entered: every number in the table comes from these timings.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from radar_vllm.core.costs import (
    ENGINE_REFERENCE_CPU,
    ENGINE_REFERENCE_CUDA,
    CostTable,
    describe_machine,
)
from radar_vllm.core.policy import PolicyConfig, StopPolicy
from radar_vllm.offline.reference.decoder import FixedDepth, PolicyStop, ReferenceDecoder

logger = logging.getLogger(__name__)


def _timer(device: torch.device) -> Callable[[], float]:
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device,
                   after: Callable[[], Any] | None = None) -> float:
    """Median wall time of ``fn``; ``after`` (untimed) restores state between runs."""
    now = _timer(device)
    samples = []
    for index in range(warmup + repeats):
        start = now()
        fn()
        elapsed = now() - start
        if after is not None:
            after()
        if index >= warmup:
            samples.append(elapsed)
    return statistics.median(samples)


def default_tree_sizes(max_nodes: int) -> list[int]:
    sizes = {1, max_nodes}
    size = 2
    while size < max_nodes:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def calibrate_reference(decoder: ReferenceDecoder, prompt_ids: Sequence[int], *, model_id: str,
                        head_id: str, tree_sizes: Sequence[int] | None = None,
                        repeats: int = 10, warmup: int = 2, first_call_tokens: int = 3,
                        metadata: dict[str, Any] | None = None) -> CostTable:
    """Time the reference decoder's steps at the context ``prompt_ids`` (+ 1 generated token)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if first_call_tokens < 1:
        raise ValueError(f"first_call_tokens must be >= 1, got {first_call_tokens}")
    config = decoder.config
    device = decoder.device
    decoder.start(prompt_ids)
    target, head = decoder.target, decoder.head
    context = target.cache_length

    full = decoder.finalize(decoder.draft_round(FixedDepth(config.max_depth)).builder)
    available = int(full.num_nodes[0])
    sizes = sorted(set(tree_sizes or default_tree_sizes(config.max_nodes)))
    if sizes[0] < 1:
        raise ValueError(f"tree sizes must be >= 1, got {sizes}")
    if sizes[-1] > available:
        logger.warning("the drafted tree has only %d nodes; measuring sizes up to it", available)
        sizes = sorted({min(size, available) for size in sizes})

    def restore_target() -> None:
        target.keep(context, [])

    verify_seconds = []
    for size in sizes:
        tree = full.truncate(size)

        def verify_once() -> None:
            logits, _ = decoder.verify_rows(tree)
            decoder.accept(tree, logits, 0.0, None)

        verify_seconds.append(median_seconds(verify_once, repeats, warmup, device,
                                             restore_target))
    logits, aux = decoder.verify_rows(full)
    restore_target()
    new_tokens = min(first_call_tokens, aux.shape[0])
    committed = head.num_committed

    def restore_head() -> None:
        head.num_committed = committed
        head.discard_tree()

    first_call = median_seconds(
        lambda: head.first_call(aux[:new_tokens], torch.zeros(new_tokens, dtype=torch.long)),
        repeats, warmup, device, restore_head)
    round_one = median_seconds(lambda: decoder.draft_round(FixedDepth(1)), repeats, warmup,
                               device, head.discard_tree)
    builder = decoder.draft_round(FixedDepth(config.max_depth)).builder
    finalize = median_seconds(builder.finalize, repeats, warmup, device)
    head.discard_tree()
    if config.max_depth > 1:
        round_full = median_seconds(lambda: decoder.draft_round(FixedDepth(config.max_depth)),
                                    repeats, warmup, device, head.discard_tree)
        draft_step = max(round_full - round_one, 0.0) / (config.max_depth - 1)
    else:
        draft_step = 0.0

    state_size = decoder.chain_state_size or config.top_k
    policy = StopPolicy(PolicyConfig(state_size=state_size)).to(device).eval()
    rule = PolicyStop(policy)
    scores = torch.full((1, state_size), -1.0, device=device)
    rule.begin_round()
    policy_step = median_seconds(lambda: rule.should_continue(scores, 1), repeats, warmup,
                                 device, rule.begin_round)
    decode = median_seconds(lambda: target.decode(int(decoder.tokens[-1])), repeats, warmup,
                            device, restore_target)
    engine = ENGINE_REFERENCE_CUDA if device.type == "cuda" else ENGINE_REFERENCE_CPU
    record = {
        "context_tokens": context + 1,
        "repeats": repeats,
        "warmup": warmup,
        "first_call_tokens": new_tokens,
        "tree_config": config.to_dict(),
        "mode": "tree" if decoder.chain_state_size is None else "chain",
        "first_call_seconds": first_call,
        "round_one_level_seconds": round_one,
        "finalize_seconds": finalize,
        "dtype": str(target.dtype),
        "torch_threads": torch.get_num_threads(),
    }
    record.update(metadata or {})
    return CostTable(
        verify_num_nodes=tuple(sizes),
        verify_seconds=tuple(verify_seconds),
        first_draft_seconds=first_call + round_one + finalize,
        draft_step_seconds=draft_step,
        policy_step_seconds=policy_step,
        decode_step_seconds=decode,
        engine=engine,
        model_id=model_id,
        head_id=head_id,
        machine=describe_machine(),
        metadata=record,
    )
