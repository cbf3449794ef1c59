"""RADAR's scheduler: vLLM's (synchronous) scheduler minus the padding after each request's stop.

The proposer returns ``[batch, K]`` drafts where the slots after a request's stop hold
``PADDING_TOKEN`` (-1). vLLM would verify (and always reject) them; dropping them here means the
target verifies only real drafts, and vLLM's own spec-decode counters (draft tokens, per-position
draft counts, acceptance rate) then describe what RADAR drafted, from which the front-end derives
the stop-depth histogram (:mod:`radar_vllm.vllm.stats`). Per-request draft lengths of different
sizes are a regular case for this scheduler (structured outputs truncate drafts the same way).
"""
from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import DraftTokenIds

from radar_vllm.vllm.stats import strip_padding


class RadarScheduler(Scheduler):
    def update_draft_token_ids(self, draft_token_ids: DraftTokenIds) -> None:
        trimmed = DraftTokenIds(
            req_ids=draft_token_ids.req_ids,
            draft_token_ids=[strip_padding(ids) for ids in draft_token_ids.draft_token_ids],
        )
        super().update_draft_token_ids(trimmed)
