"""RADAR's per-step spec-decoding stats and their way from the engine core to the front-end.

:class:`RadarSpecDecodingStats` is vLLM's ``SpecDecodingStats`` plus ``stop_depth_counts`` (tree
mode: requests verified in the step per stop depth, filled by
:class:`radar_vllm.vllm.scheduler.RadarScheduler`). vLLM sends ``SchedulerStats`` from the
engine-core process to the front-end with msgspec, which decodes by the declared field types
and would turn the subclass back into a plain ``SpecDecodingStats``, dropping the counts.
:func:`install_stats_transport` declares the field as the subclass. msgspec fixes a type's
decoding plan the first time a decoder for it is built, so this runs when the plugin registers
(before any engine of the process builds its decoder). Plain stats then decode with an empty
``stop_depth_counts``, which every consumer treats as absent: other engines are unaffected.

A step that verified no drafts but ran rounds without drafts sends stats with ``num_drafts`` 0
(they carry ``skipped_rounds``). vLLM's periodic spec-decode log divides by the drafts of its
interval, so :func:`install_stats_transport` also makes it pass over stats without drafts (vLLM
itself never sends such stats: other engines are unaffected); its Prometheus counters add zeros.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field

from vllm.v1.spec_decode.metrics import SpecDecodingStats


@dataclass
class RadarSpecDecodingStats(SpecDecodingStats):
    """One step's spec-decoding stats plus RADAR's stop depths (tree mode)."""

    # [max_depth + 1] requests verified this step whose round stopped after d draft calls
    stop_depth_counts: list[int] = field(default_factory=list)
    # decode rounds (request x step) that ran without drafts since the previous stats that left
    # the engine core: depth 0, chosen by the depth gate
    skipped_rounds: int = 0


def install_stats_transport() -> None:
    """Declare ``SchedulerStats.spec_decoding_stats`` as :class:`RadarSpecDecodingStats`, and make
    vLLM's spec-decode log pass over stats without drafts (idempotent)."""
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.spec_decode.metrics import SpecDecodingLogging

    observe = SpecDecodingLogging.observe
    if not getattr(observe, "__radar_skips_empty__", False):
        def observe_drafts(self: SpecDecodingLogging, spec_decoding_stats: SpecDecodingStats) -> None:
            if spec_decoding_stats.num_drafts:
                observe(self, spec_decoding_stats)
        observe_drafts.__radar_skips_empty__ = True  # type: ignore[attr-defined]
        SpecDecodingLogging.observe = observe_drafts  # type: ignore[method-assign]
    declared = typing.Optional[RadarSpecDecodingStats]
    stats_field = SchedulerStats.__dataclass_fields__["spec_decoding_stats"]
    if stats_field.type == declared:
        return
    stats_field.type = declared
    SchedulerStats.__annotations__["spec_decoding_stats"] = declared
