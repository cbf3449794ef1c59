"""The online benchmark's load options against vLLM's server: the tiny random target served with
RADAR as the benchmark serves it (``radar-vllm serve``, loopback, own process group), then
closed-loop levels of a few seconds with mixed sampling (greedy, T = 0.7, T = 1 with top-p 0.9) and
a third of the requests disconnecting mid-stream: chain mode at concurrency 1 and 4, tree mode at 4
and 64 (a full batch of trees verified through the scratch pool). Every other request must
complete; the server must report its memory and keep serving after the disconnects. About four
minutes on 2 cores.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")

from conftest import bench_rows, bench_settings  # noqa: E402
from radar_vllm.bench.configs import RADAR_CHAIN, RADAR_TREE  # noqa: E402
from radar_vllm.bench.settings import ONLINE_SAMPLING_MIXED  # noqa: E402

PROMPTS = [[1, 17, 33, 49, 65], [2, 18, 34], [3, 19, 35, 51, 67, 83, 99]]
DURATION_S = 4.0
STARTUP_TIMEOUT_S = 420.0


@pytest.mark.parametrize(("mode", "concurrencies"), [(RADAR_CHAIN, [1, 4]), (RADAR_TREE, [4, 64])])
def test_mixed_sampling_disconnects_and_fixed_duration_levels(tiny_bench_models: tuple[Path, Path, Path],
                                                             tmp_path: Path, mode: str,
                                                             concurrencies: list[int]) -> None:
    from radar_vllm.bench.harness import subprocess_env
    from radar_vllm.bench.online import Load, free_port, measure_server, server_command, start_server, stop_server

    target, _, radar = tiny_bench_models
    settings = bench_settings(target=str(target), radar_checkpoint=str(radar), dtype="float32", kv_cache_gb=1,
                              enforce_eager=True)
    row = next(config for config in bench_rows(settings, tiny_bench_models) if config.name == mode)
    engine = {"model": str(target), "dtype": "float32", "max_model_len": 512, "seed": 0, "enforce_eager": True}
    port = free_port()
    server = start_server(server_command(engine, row.speculative_config(), port, max_num_seqs=max(concurrencies)),
                          subprocess_env(settings), tmp_path / "server.log", port, STARTUP_TIMEOUT_S)
    load = Load(max_tokens=16, seed=0, timeout_s=120.0, sampling=ONLINE_SAMPLING_MIXED, disconnect_fraction=0.34,
                duration_s=DURATION_S)
    try:
        levels = measure_server(server, PROMPTS, concurrencies, lambda concurrency: 0, load)
    finally:
        stop_server(server)
    assert [level["concurrency"] for level in levels] == concurrencies
    for level in levels:
        assert level["failed"] == 0, level["errors"]
        assert level["completed"] >= 1 and level["completed"] + level["disconnected"] == level["num_requests"]
        assert level["wall_seconds"] >= DURATION_S and level["output_throughput"] > 0
        assert level["ttft_ms"]["p99"] >= level["ttft_ms"]["median"] > 0
        assert level["rss_start_mib"] > 50 and level["rss_end_mib"] > 50
        assert level["metrics"]["counters"]["vllm:spec_decode_num_drafts"] > 0
    assert sum(level["disconnected"] for level in levels) >= 1
