"""RADAR's scheduler: vLLM's (synchronous) scheduler minus the padding after each request's stop.

The proposer returns ``[batch, K]`` drafts where the slots after a request's stop hold
``PADDING_TOKEN`` (-1). vLLM would verify (and always reject) them; dropping them here means the
target verifies only real drafts, and vLLM's own spec-decode counters (draft tokens, per-position
draft counts, acceptance rate) then describe what RADAR drafted, from which the front-end derives
the stop-depth histogram (:mod:`radar_vllm.vllm.stats`). Per-request draft lengths of different
sizes are a regular case for this scheduler (structured outputs truncate drafts the same way).

Tree mode: the scheduler hides the tree runner's scratch KV blocks from vLLM's block pool
(``radar.scratch_blocks``, :func:`radar_vllm.vllm.engine_plan.scratch_block_count`). The tree runner's drafts also carry each request's stop depth
(:class:`radar_vllm.vllm.stats.RadarDraftTokenIds`); the scheduler keeps it until the drafts are
verified and counts it, per step, in :class:`radar_vllm.vllm.spec_stats.RadarSpecDecodingStats`
(vLLM's spec-decoding stats plus ``stop_depth_counts``), which reach the front-end's stat loggers with vLLM's own counters.

Depth 0: a request in decode that is scheduled without drafts ran a round the depth gate skipped.
The scheduler counts those rounds and hands the count over with the same step's stats
(``skipped_rounds``); a step that verified no drafts carries it in a stats object without drafts,
which vLLM's own spec-decode log is told to pass over (:mod:`radar_vllm.vllm.spec_stats`). Under
load the gate may hold depth 0 for thousands of steps: the counter must not wait for drafts.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import DraftTokenIds
from vllm.v1.spec_decode.metrics import SpecDecodingStats

from radar_vllm.vllm.engine_plan import engine_plan, scratch_block_count
from radar_vllm.vllm.spec_stats import RadarSpecDecodingStats
from radar_vllm.vllm.stats import count_stop_depth, strip_padding

logger = logging.getLogger(__name__)


def _reserve_scratch_blocks(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Hide the tree runner's scratch blocks (the last ones of the cache) from vLLM's block pool."""
    vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
    in_kwargs = "kv_cache_config" in kwargs
    kv_cache_config = kwargs["kv_cache_config"] if in_kwargs else args[1]
    count = scratch_block_count(vllm_config, kv_cache_config.num_blocks, len(kv_cache_config.kv_cache_groups))
    if count == 0:
        return args, kwargs
    reduced = copy.copy(kv_cache_config)
    reduced.num_blocks = kv_cache_config.num_blocks - count
    logger.info("RADAR tree verification: %d of %d KV blocks reserved as scratch blocks", count,
                kv_cache_config.num_blocks)
    if in_kwargs:
        return args, {**kwargs, "kv_cache_config": reduced}
    return (args[0], reduced, *args[2:]), kwargs


class RadarScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        args, kwargs = _reserve_scratch_blocks(args, kwargs)
        super().__init__(*args, **kwargs)
        self._stop_depths: dict[str, int] = {}  # request id -> stop depth of its pending drafts
        self._max_stop_depth = engine_plan(self.vllm_config).radar.config.max_depth  # the deepest stop
        self._skipped_rounds = 0  # decode rounds without drafts not yet handed to the stats

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        if self.log_stats:
            self._skipped_rounds += self._decode_rounds_without_drafts(scheduler_output)
        return super().update_from_output(scheduler_output, model_runner_output)

    def _decode_rounds_without_drafts(self, scheduler_output: Any) -> int:
        """Requests of the step that decoded one token with no drafts (the prompt was done before)."""
        count = 0
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            # num_computed_tokens already includes this step's token
            if num_tokens == 1 and request is not None and request.num_computed_tokens > request.num_prompt_tokens:
                count += 1
        return count

    def update_draft_token_ids(self, draft_token_ids: Any) -> None:
        stop_depths = getattr(draft_token_ids, "stop_depths", None)
        if stop_depths is not None:
            for req_id, depth in zip(draft_token_ids.req_ids, stop_depths):
                if int(depth) >= 1:  # NO_STOP_DEPTH (0): no tree drafted for this request
                    self._stop_depths[req_id] = int(depth)
        trimmed = DraftTokenIds(
            req_ids=draft_token_ids.req_ids,
            draft_token_ids=[strip_padding(ids) for ids in draft_token_ids.draft_token_ids],
        )
        super().update_draft_token_ids(trimmed)

    def make_spec_decoding_stats(
        self,
        spec_decoding_stats: SpecDecodingStats | None,
        num_draft_tokens: int,
        num_accepted_tokens: int,
        num_invalid_spec_tokens: dict[str, int] | None,
        request_id: str,
    ) -> SpecDecodingStats | None:
        depth = self._stop_depths.pop(request_id, None)
        if self.log_stats and num_draft_tokens:
            if spec_decoding_stats is None:
                spec_decoding_stats = RadarSpecDecodingStats.new(self.num_spec_tokens)
            if isinstance(spec_decoding_stats, RadarSpecDecodingStats) and depth is not None:
                if not spec_decoding_stats.stop_depth_counts:
                    spec_decoding_stats.stop_depth_counts = [0] * (self._max_stop_depth + 1)
                count_stop_depth(spec_decoding_stats.stop_depth_counts, min(depth, self._max_stop_depth))
        return super().make_spec_decoding_stats(
            spec_decoding_stats, num_draft_tokens, num_accepted_tokens, num_invalid_spec_tokens, request_id
        )

    def make_stats(self, spec_decoding_stats: SpecDecodingStats | None = None, *args: Any, **kwargs: Any) -> Any:
        if self.log_stats and self._skipped_rounds:
            if spec_decoding_stats is None:  # a step without verified drafts: a carrier without drafts
                spec_decoding_stats = RadarSpecDecodingStats.new(self.num_spec_tokens)
            if isinstance(spec_decoding_stats, RadarSpecDecodingStats):
                spec_decoding_stats.skipped_rounds += self._skipped_rounds
                self._skipped_rounds = 0
        return super().make_stats(spec_decoding_stats, *args, **kwargs)

    def _free_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        self._stop_depths.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)
