"""Scratch KV blocks for tree verification on the CPU platform: reserved by the scheduler, used by the runner.

Tree verification recomputes the attention rows of tree nodes whose ancestors are not the rows
right before them (see :mod:`radar_vllm.vllm.tree_verify`). Each such row must see the context,
the root and its own root-to-node path at consecutive positions. With scratch blocks, every row
gets a private copy of the block where its path starts (plus the next one when the path crosses a
block boundary), its path K/V are written there, and the row's block table points at the copies:
all rows of a step run in as few kernel calls per layer as the scratch pool allows (usually one),
and the request's own KV slots are never touched.

The pool is the last ``count`` blocks of the KV cache the workers allocated. The RADAR scheduler
hides them from vLLM's block pool (it builds its block manager with ``num_blocks - count``), so
they never hold a request's data; the tree runner uses them. Both sides compute ``count`` with
:func:`scratch_block_count` from the same config and the same ``num_blocks``, so they agree
without talking to each other. With a count of 0 (the default, ``RADAR_TREE_SCRATCH_BLOCKS`` unset
or 0) or without the RADAR scheduler (a custom ``scheduler_cls``) the runner recomputes one node
per request per kernel call in the request's own slots instead. Both are exact; on the CPU build
they measured the same speed, so the pool (which takes KV blocks from requests) is opt-in, e.g.
``RADAR_TREE_SCRATCH_BLOCKS=64``.
"""
from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

SCRATCH_ENV = "RADAR_TREE_SCRATCH_BLOCKS"
# Off unless asked for: on the CPU build the whole-block copies cost what the saved kernel calls
# did (benchmarks/results/tree_size_sweep_smollm2.md), and the pool takes KV blocks from requests.
DEFAULT_SCRATCH_BLOCKS = 0
# Never reserve more than this fraction of the KV cache.
MAX_SCRATCH_FRACTION = 8
TREE_WORKER = "radar_vllm.vllm.tree_runner.RadarTreeCPUWorker"
RADAR_CPU_WORKER = "radar_vllm.vllm.worker.RadarCPUWorker"
RADAR_SCHEDULER = "radar_vllm.vllm.scheduler.RadarScheduler"


def _class_name(value: Any) -> str:
    if isinstance(value, str):
        return value
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"


def uses_tree_runner(vllm_config: Any) -> bool:
    """True when the workers of ``vllm_config`` build the tree-verifying CPU runner."""
    worker_cls = _class_name(getattr(vllm_config.parallel_config, "worker_cls", ""))
    if worker_cls == TREE_WORKER:
        return True
    if worker_cls == RADAR_CPU_WORKER:
        from radar_vllm.vllm.worker import tree_mode

        return tree_mode(vllm_config)
    return False


def uses_radar_scheduler(vllm_config: Any) -> bool:
    scheduler_cls = getattr(vllm_config.scheduler_config, "scheduler_cls", None)
    if scheduler_cls is None:
        return False
    if isinstance(scheduler_cls, str):
        return scheduler_cls == RADAR_SCHEDULER
    from radar_vllm.vllm.scheduler import RadarScheduler

    return isinstance(scheduler_cls, type) and issubclass(scheduler_cls, RadarScheduler)


def requested_scratch_blocks() -> int:
    """The pool size asked for by ``RADAR_TREE_SCRATCH_BLOCKS`` (0 switches scratch blocks off)."""
    text = os.environ.get(SCRATCH_ENV)
    if text is None or text.strip() == "":
        return DEFAULT_SCRATCH_BLOCKS
    try:
        value = int(text)
    except ValueError as error:
        raise ValueError(f"{SCRATCH_ENV} must be an integer >= 0, got {text!r}") from error
    if value < 0:
        raise ValueError(f"{SCRATCH_ENV} must be an integer >= 0, got {value}")
    return value


def min_scratch_blocks(vllm_config: Any) -> int:
    """Fewest manager blocks a pool needs so that one recomputed path always fits.

    A path has at most ``num_speculative_tokens`` nodes (the tree's node budget) and needs
    :func:`radar_vllm.vllm.tree_verify.max_scratch_blocks_per_job` kernel blocks. Whatever kernel
    block size k divides the manager block size M, ``ceil((L - 2) / M) + 2`` manager blocks hold
    at least ``(L - 2) / k + 2`` kernel blocks, which is that bound; the scheduler, which does
    not know k, and the runner, which does, therefore decide alike.
    """
    max_path_len = int(getattr(vllm_config.speculative_config, "num_speculative_tokens", 1) or 1)
    block_size = int(vllm_config.cache_config.block_size)
    return -(-max(max_path_len - 2, 0) // block_size) + 2


def scratch_block_count(vllm_config: Any, num_blocks: int, num_kv_cache_groups: int = 1) -> int:
    """Blocks (in the KV manager's block size) reserved at the end of a ``num_blocks`` cache.

    0 unless the tree runner and the RADAR scheduler are both in use and a pool was asked for; 0
    too (with a warning) when the pool cannot serve the cache: more than one KV-cache group, or
    fewer blocks than one path needs (:func:`min_scratch_blocks`). The scheduler and the runner
    both call this with the same arguments, so blocks are hidden exactly when the runner uses them.
    """
    if not uses_tree_runner(vllm_config) or not uses_radar_scheduler(vllm_config):
        return 0
    requested = requested_scratch_blocks()
    count = min(requested, max(num_blocks // MAX_SCRATCH_FRACTION, 0))
    if count == 0:
        return 0
    needed = min_scratch_blocks(vllm_config)
    if num_kv_cache_groups != 1 or count < needed:
        logger.warning("RADAR tree verification: no scratch blocks (%d asked for, %d allowed by a %d-block "
                       "cache, a path needs %d; %d KV-cache groups, 1 supported); recomputing one node per "
                       "request per kernel call", requested, count, num_blocks, needed, num_kv_cache_groups)
        return 0
    return count


def scratch_block_ids(num_blocks: int, count: int, blocks_per_manager_block: int = 1) -> list[int]:
    """Kernel block ids of the pool: the last ``count`` manager blocks of a ``num_blocks`` cache,
    each split into ``blocks_per_manager_block`` kernel blocks."""
    if count < 0 or count > num_blocks:
        raise ValueError(f"scratch block count must be in [0, {num_blocks}], got {count}")
    if blocks_per_manager_block < 1:
        raise ValueError(f"blocks_per_manager_block must be >= 1, got {blocks_per_manager_block}")
    first = (num_blocks - count) * blocks_per_manager_block
    return list(range(first, num_blocks * blocks_per_manager_block))


__all__ = [
    "DEFAULT_SCRATCH_BLOCKS",
    "SCRATCH_ENV",
    "min_scratch_blocks",
    "requested_scratch_blocks",
    "scratch_block_count",
    "scratch_block_ids",
    "uses_radar_scheduler",
    "uses_tree_runner",
]
