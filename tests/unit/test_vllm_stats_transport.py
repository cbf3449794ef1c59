"""RADAR's tree-mode stop depths survive vLLM's engine-core -> front-end serialization."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")


def _round_trip(stats):
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    outputs = EngineCoreOutputs(scheduler_stats=SchedulerStats(spec_decoding_stats=stats))
    decoder = MsgpackDecoder(EngineCoreOutputs)  # built after the transport is installed, as in vLLM
    return decoder.decode(MsgpackEncoder().encode(outputs)).scheduler_stats.spec_decoding_stats


def test_stop_depths_survive_serialization():
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    from radar_vllm.vllm.spec_stats import RadarSpecDecodingStats, install_stats_transport
    from radar_vllm.vllm.stats import summarize_step

    install_stats_transport()
    install_stats_transport()  # idempotent
    stats = RadarSpecDecodingStats.new(6)
    for nodes, accepted in ((6, 2), (3, 0)):
        stats.observe_draft(nodes, accepted)
    stats.stop_depth_counts = [0, 1, 0, 1]
    back = _round_trip(stats)
    assert back.stop_depth_counts == [0, 1, 0, 1]
    assert back.num_draft_tokens_per_pos == [2, 2, 2, 1, 1, 1]
    summary = summarize_step(back.num_drafts, back.num_draft_tokens_per_pos, back.num_accepted_tokens_per_pos,
                             back.stop_depth_counts or None)
    assert summary.stop_depths == {1: 1, 3: 1} and summary.tree_sizes == {3: 1, 6: 1}
    # vLLM's plain stats (chain mode, other engines) still decode, with no stop depths
    plain = SpecDecodingStats.new(4)
    plain.observe_draft(3, 1)
    back = _round_trip(plain)
    assert back.num_draft_tokens_per_pos == [1, 1, 1, 0] and not back.stop_depth_counts


def test_rounds_without_drafts_travel_in_stats_without_drafts_that_vllms_log_passes_over():
    from vllm.v1.spec_decode.metrics import SpecDecodingLogging

    from radar_vllm.vllm.spec_stats import RadarSpecDecodingStats, install_stats_transport

    install_stats_transport()
    carrier = RadarSpecDecodingStats.new(4)  # a step that verified no drafts, 12 request rounds without
    carrier.skipped_rounds = 12
    back = _round_trip(carrier)
    assert back.skipped_rounds == 12 and back.num_drafts == 0
    lines = []
    logging = SpecDecodingLogging()
    logging.observe(back)
    logging.log(log_fn=lambda *args: lines.append(args))
    assert lines == []  # an interval without drafts logs nothing (not a mean acceptance length of 0/0)
    drafted = RadarSpecDecodingStats.new(4)
    drafted.observe_draft(3, 2)
    logging.observe(back)
    logging.observe(drafted)
    logging.log(log_fn=lambda *args: lines.append(args))
    assert len(lines) == 1 and lines[0][1] == 3.0  # mean acceptance length of the drafts alone: 1 + 2 / 1
