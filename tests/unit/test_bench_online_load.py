"""The online benchmark under load, without vLLM: mixed sampling, client disconnects, closed-loop
levels of a fixed duration, concurrency 64, the server's resident memory and the report columns.

The levels run against a small aiohttp server (in a thread) that streams SSE chunks as vLLM's
``/v1/completions`` does: one chunk per token, then a usage chunk and ``[DONE]``. A few seconds in all.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from conftest import BENCH_CLI, bench_settings
from radar_vllm.bench.online import (
    DISCONNECT_AFTER_CHUNKS,
    MIXED_SAMPLING,
    Load,
    Server,
    completion_payload,
    disconnect_choices,
    measure_server,
    plan_requests,
    process_group_rss_mib,
    run_level,
)
from radar_vllm.bench.report import ONLINE_HEADERS, ONLINE_LOAD_HEADERS, build_document, render_markdown
from radar_vllm.bench.settings import ONLINE_SAMPLING_MIXED

ERROR_PROMPT = [13]  # the fake server answers HTTP 500 to this prompt
MIB = 1 << 20


class FakeCompletionServer:
    """``/v1/completions`` streaming ``max_tokens`` one-token chunks (``first_delay_s`` before the
    first, ``chunk_delay_s`` between), ``/metrics`` (empty) and ``/health``; records every request
    body, the requests in flight and the streams the client cut."""

    def __init__(self, first_delay_s: float = 0.02, chunk_delay_s: float = 0.01) -> None:
        self.first_delay_s, self.chunk_delay_s = first_delay_s, chunk_delay_s
        self.bodies: list[dict[str, Any]] = []
        self.arrivals: list[float] = []
        self.in_flight = self.max_in_flight = self.cut = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    async def completions(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        self.bodies.append(body)
        self.arrivals.append(time.perf_counter())
        if body["prompt"] == ERROR_PROMPT:
            return web.Response(status=500, text="boom")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        response = web.StreamResponse()
        try:
            await response.prepare(request)
            await asyncio.sleep(self.first_delay_s)
            for _ in range(body["max_tokens"]):
                chunk = {"choices": [{"index": 0, "text": "x"}], "usage": None}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(self.chunk_delay_s)
            usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
            await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        except ConnectionError:  # the client left
            self.cut += 1
        finally:
            self.in_flight -= 1
        return response

    async def _start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        async def empty(request: Any) -> Any:
            return web.Response(text="")

        app.router.add_get("/metrics", empty)
        app.router.add_get("/health", empty)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, backlog=256)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeCompletionServer":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)

    def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Until the server has noticed every client that left."""
        deadline = time.perf_counter() + timeout_s
        while self.in_flight and time.perf_counter() < deadline:
            time.sleep(0.01)


@pytest.fixture()
def fake_server() -> Iterator[FakeCompletionServer]:
    with FakeCompletionServer() as server:
        yield server


def _plans(prompts: list[list[int]], load: Load, count: int) -> list[Any]:
    return list(itertools.islice(plan_requests(prompts, load), count))


# ------------------------------------------------------------------------------ request plans
def test_mixed_sampling_cycles_greedy_t07_and_t1_top_p_09_with_seeds() -> None:
    load = Load(max_tokens=4, seed=100, sampling=ONLINE_SAMPLING_MIXED)
    plans = _plans([[1], [2]], load, 7)
    assert [(p.sampling.temperature, p.sampling.top_p) for p in plans] == \
        [(0.0, 1.0), (0.7, 1.0), (1.0, 0.9)] * 2 + [(0.0, 1.0)]
    assert [p.seed for p in plans] == list(range(100, 107))
    assert [p.prompt_ids for p in plans] == [[1], [2]] * 3 + [[1]]
    payloads = [completion_payload(p, 4) for p in plans[:3]]
    assert payloads[0]["temperature"] == 0.0 and "top_p" not in payloads[0] and payloads[0]["seed"] == 100
    assert (payloads[1]["temperature"], payloads[1]["top_p"], payloads[1]["seed"]) == (0.7, 1.0, 101)
    assert (payloads[2]["temperature"], payloads[2]["top_p"], payloads[2]["seed"]) == (1.0, 0.9, 102)
    assert all(p["stream"] and p["stream_options"] == {"include_usage": True} for p in payloads)
    # the default: one temperature for every request, as before (a seed only at T > 0)
    greedy = completion_payload(_plans([[1]], Load(max_tokens=4, seed=5), 2)[1], 4)
    assert greedy["temperature"] == 0.0 and "seed" not in greedy and "top_p" not in greedy
    sampled = completion_payload(_plans([[1]], Load(max_tokens=4, temperature=1.0, seed=5), 2)[1], 4)
    assert (sampled["temperature"], sampled["top_p"], sampled["seed"]) == (1.0, 1.0, 6)


@pytest.mark.parametrize("fraction", [0.2, 1 / 3, 0.5, 0.95])
def test_disconnect_choices_are_seeded_and_hold_the_fraction(fraction: float) -> None:
    choices = list(itertools.islice(disconnect_choices(fraction, seed=7), 300))
    assert choices == list(itertools.islice(disconnect_choices(fraction, seed=7), 300))
    assert choices != list(itertools.islice(disconnect_choices(fraction, seed=8), 300))
    chosen = [c is not None for c in choices]
    for n in range(1, 301):  # every prefix (a closed-loop level stops anywhere): within one of fraction * n
        assert abs(sum(chosen[:n]) - fraction * n) < 1.0, n
    low, high = DISCONNECT_AFTER_CHUNKS
    assert {c for c in choices if c is not None} == set(range(low, high + 1))
    # not a fixed period: the disconnecting requests fall on every kind of the mixed cycle
    assert {i % len(MIXED_SAMPLING) for i, c in enumerate(chosen) if c} == {0, 1, 2}


def test_no_disconnects_by_default() -> None:
    assert all(c is None for c in itertools.islice(disconnect_choices(0.0, seed=3), 100))
    assert sum(c is not None for c in itertools.islice(disconnect_choices(0.2, seed=3), 100)) == 20
    assert all(p.disconnect_after is None for p in _plans([[1]], Load(max_tokens=4), 50))


# ------------------------------------------------------------------------------ levels
def test_fixed_count_level_with_mixed_sampling_disconnects_and_errors(fake_server: FakeCompletionServer) -> None:
    prompts = [[1, 2], [3], ERROR_PROMPT, [4]]
    load = Load(max_tokens=8, seed=11, timeout_s=30.0, sampling=ONLINE_SAMPLING_MIXED, disconnect_fraction=0.25)
    level = asyncio.run(run_level(fake_server.base_url, prompts, 4, load, num_requests=24))
    fake_server.wait_idle()
    plans = _plans(prompts, load, 24)
    errors = sum(p.prompt_ids == ERROR_PROMPT for p in plans)
    disconnecting = sum(p.disconnect_after is not None and p.prompt_ids != ERROR_PROMPT for p in plans)
    assert sum(p.disconnect_after is not None for p in plans) == 6 and disconnecting > 0
    assert (level.num_requests, level.failed, level.disconnected) == (24, errors, disconnecting)
    assert level.completed == 24 - errors - disconnecting
    assert level.errors and level.errors[0].startswith("HTTP 500")
    assert level.output_tokens == 8 * level.completed
    assert level.output_throughput == pytest.approx(level.output_tokens / level.wall_seconds)
    assert fake_server.cut == disconnecting  # the server saw those clients leave mid-stream
    # every request carried its plan's sampling and seed
    for body in fake_server.bodies:
        kind = MIXED_SAMPLING[(body["seed"] - 11) % 3]
        assert body["temperature"] == kind.temperature and body.get("top_p", 1.0) == kind.top_p
    assert sorted(body["seed"] for body in fake_server.bodies) == list(range(11, 35))
    assert set(level.ttft_ms) == {"median", "p90", "p99", "min", "max"}
    assert level.ttft_ms["p99"] >= level.ttft_ms["median"] >= 20.0 and level.tpot_ms["p99"] > 0


def test_fixed_duration_level_is_a_closed_loop(fake_server: FakeCompletionServer) -> None:
    duration = 0.6
    load = Load(max_tokens=6, seed=0, timeout_s=30.0, disconnect_fraction=0.2, duration_s=duration)
    started = time.perf_counter()
    level = asyncio.run(run_level(fake_server.base_url, [[1], [2], [3]], 3, load))
    fake_server.wait_idle()
    # each request takes about 0.02 + 6 x 0.01 s: a closed loop of 3 clients sends a few dozen in 0.6 s
    assert level.num_requests == len(fake_server.bodies) >= 9
    # 3 clients; a client that left may send its next request before the server notices
    assert 3 <= fake_server.max_in_flight <= 3 + level.disconnected
    assert max(fake_server.arrivals) < started + duration + 0.5  # nothing new after the deadline
    assert level.wall_seconds >= duration  # the requests in flight at the deadline finished ...
    assert level.failed == 0 and level.completed + level.disconnected == level.num_requests  # ... and count
    assert abs(level.disconnected - 0.2 * level.num_requests) < 1.0
    assert level.duration_s == duration and level.output_tokens == 6 * level.completed
    assert level.output_throughput == pytest.approx(level.output_tokens / level.wall_seconds)
    with pytest.raises(ValueError, match="num_requests or load.duration_s"):
        asyncio.run(run_level(fake_server.base_url, [[1]], 1, load, num_requests=2))


def test_concurrency_64_keeps_64_requests_in_flight() -> None:
    with FakeCompletionServer(first_delay_s=0.3, chunk_delay_s=0.0) as server:
        level = asyncio.run(run_level(server.base_url, [[1]], 64, Load(max_tokens=2, timeout_s=30.0),
                                      num_requests=64))
    assert (level.completed, level.failed) == (64, 0)
    assert server.max_in_flight == 64


def test_measure_server_reports_the_server_memory_per_level(fake_server: FakeCompletionServer,
                                                            tmp_path: Path) -> None:
    # the "server process": a child in its own session (process group) holding about 64 MiB
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; b = b'x' * (64 << 20); print(1, flush=True); "
                              "time.sleep(60)"], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"1"
        server = Server(process=child, port=fake_server.port, log_path=tmp_path / "server.log")
        load = Load(max_tokens=4, seed=0, timeout_s=30.0, disconnect_fraction=0.5)
        levels = measure_server(server, [[1], [2]], [1, 4], lambda c: 2 * c, load)
    finally:
        child.kill()
        child.wait()
    assert [(lv["concurrency"], lv["num_requests"]) for lv in levels] == [(1, 2), (4, 8)]
    for level in levels:
        assert level["rss_start_mib"] >= 64 and level["rss_end_mib"] >= 64
        assert level["completed"] + level["disconnected"] == level["num_requests"] and level["failed"] == 0
        assert level["disconnected"] >= 1 and level["metrics"] is not None
    json.dumps(levels)


# ------------------------------------------------------------------------------ memory
def test_rss_of_the_test_process_group_and_of_a_proc_tree(tmp_path: Path) -> None:
    own_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    group = process_group_rss_mib(os.getpgrp())
    assert group is not None and group >= 0.5 * own_kib / 1024  # this process is in its group
    # a made-up /proc: a process name with spaces and parentheses, another group, a kernel thread
    for pid, stat, rss in (("10", "10 (a) b (c) S 1 77 77 0", "VmRSS:\t  2048 kB"),
                           ("11", "11 (worker) S 10 77 77 0", "VmRSS:\t  1024 kB"),
                           ("12", "12 (other) S 1 78 78 0", "VmRSS:\t  9999 kB"),
                           ("13", "13 (kthread) S 2 77 0 0", "")):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "stat").write_text(stat)
        (tmp_path / pid / "status").write_text(f"Name:\tx\n{rss}\n")
    (tmp_path / "self").mkdir()
    assert process_group_rss_mib(77, proc=tmp_path) == pytest.approx(3.0)
    assert process_group_rss_mib(79, proc=tmp_path) is None
    assert process_group_rss_mib(77, proc=tmp_path / "missing") is None


# ------------------------------------------------------------------------------ settings and CLI
@pytest.mark.parametrize("overrides, option", [
    ({"online_disconnect_fraction": 1.0}, "online_disconnect_fraction"),
    ({"online_disconnect_fraction": -0.1}, "online_disconnect_fraction"),
    ({"online_duration_s": 0}, "online_duration_s"),
    ({"online_duration_s": -5.0}, "online_duration_s"),
    ({"online_sampling": "random"}, "online_sampling"),
])
def test_settings_reject_bad_load_options(overrides: dict[str, Any], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        bench_settings(**overrides)


def test_cli_load_options() -> None:
    from radar_vllm.cli import build_parser
    from radar_vllm.commands.bench import settings_from_args

    parser = build_parser()
    default = settings_from_args(parser.parse_args(BENCH_CLI))
    assert (default.online_sampling, default.online_disconnect_fraction, default.online_duration_s) == \
        ("single", 0.0, None)
    assert default.online_load_options() == {}
    for duration_flag in ("--online-duration", "--online-duration-s"):
        settings = settings_from_args(parser.parse_args(BENCH_CLI + [
            "--online-sampling", "mixed", "--online-disconnect-fraction", "0.2", duration_flag, "60",
            "--online-concurrency", "1,4,16,64"]))
        assert settings.online_concurrency == (1, 4, 16, 64)
        assert settings.online_load_options() == {"online_sampling": "mixed", "online_disconnect_fraction": 0.2,
                                                  "online_duration_s": 60.0}
        load = settings.online_load()  # what each level of the served benchmark runs with
        assert (load.sampling, load.disconnect_fraction, load.duration_s) == ("mixed", 0.2, 60.0)
        assert (load.max_tokens, load.seed) == (settings.max_new_tokens, settings.seed)
    with pytest.raises(ValueError, match="online_disconnect_fraction"):
        settings_from_args(parser.parse_args(BENCH_CLI + ["--online-disconnect-fraction", "1"]))


def test_estimate_counts_the_level_duration() -> None:
    from radar_vllm.bench.configs import NO_SPEC
    from radar_vllm.bench.estimate import SMOLLM2_CPU_COSTS, online_row_seconds

    one_wave = bench_settings(online_concurrency=(1, 4), online_requests=1)
    timed = bench_settings(online_concurrency=(1, 4), online_duration_s=60.0)
    # a level of a duration: the duration, then one wave of requests in flight
    assert online_row_seconds(timed, NO_SPEC, SMOLLM2_CPU_COSTS) == \
        pytest.approx(online_row_seconds(one_wave, NO_SPEC, SMOLLM2_CPU_COSTS) + 2 * 60.0)


# ------------------------------------------------------------------------------ report
def _markdown(online: list[dict[str, Any]]) -> str:
    document = build_document(settings={"tag": "t"}, backend="vllm", configs=[], results={}, workloads=[],
                              online=online, models={"target": "T"}, notes=[], machine={}, packages={})
    return render_markdown(document)


OLD_LEVEL = {"config": "no-spec", "concurrency": 4, "num_requests": 8, "completed": 8, "failed": 0,
             "wall_seconds": 2.0, "output_tokens": 80, "request_throughput": 4.0, "output_throughput": 40.0,
             "ttft_ms": {"median": 12.0, "p90": 20.0, "min": 10.0, "max": 21.0},
             "tpot_ms": {"median": 5.0, "p90": 6.0, "min": 4.0, "max": 7.0}, "errors": [], "metrics": {}}


def _header(headers: tuple[str, ...]) -> str:
    return "| " + " | ".join(headers) + " |"


def test_report_without_the_load_fields_renders_as_before() -> None:
    markdown = _markdown([OLD_LEVEL, {"config": "radar-chain", "error": "RuntimeError: no server"}])
    assert _header(ONLINE_HEADERS) + "\n|---|---|---|---|---|---|---|---|---|" in markdown
    assert "| no-spec | 4 | 8/8 | 4.00 | 40.0 | 12 | 20 | 5.0 | – |" in markdown
    assert "| radar-chain | – | failed: RuntimeError: no server |" in markdown
    assert "disconnected" not in markdown and "RSS" not in markdown


def test_report_shows_the_load_columns() -> None:
    level = dict(OLD_LEVEL, num_requests=30, completed=20, failed=2, disconnected=8, sampling="mixed",
                 disconnect_fraction=0.25, duration_s=60.0, rss_start_mib=1500.4, rss_end_mib=1512.6,
                 ttft_ms=dict(OLD_LEVEL["ttft_ms"], p99=30.0), tpot_ms=dict(OLD_LEVEL["tpot_ms"], p99=6.9))
    markdown = _markdown([level, OLD_LEVEL])
    assert _header(ONLINE_HEADERS + ONLINE_LOAD_HEADERS) in markdown
    assert "| no-spec | 4 | 20/30 | 4.00 | 40.0 | 12 | 20 | 5.0 | – | 8 | 2 | 30 | 6.9 | 1500 | 1513 |" in markdown
    assert "| no-spec | 4 | 8/8 | 4.00 | 40.0 | 12 | 20 | 5.0 | – | – | 0 | – | – | – | – |" in markdown
    assert "greedy, T = 0.7 and T = 1 with top-p 0.9" in markdown
    assert "25% of the requests" in markdown and "Closed-loop levels of 60 s" in markdown


def test_report_sums_up_levels_measured_several_times() -> None:
    def level(config: str, rate: float, tpot: float) -> dict[str, Any]:
        return dict(OLD_LEVEL, config=config, concurrency=16, output_throughput=rate,
                    tpot_ms={"median": tpot, "p99": 2 * tpot})

    levels = [level("no-spec", 100.0, 10.0), level("radar-chain", 95.0, 11.0), level("no-spec", 110.0, 9.0),
              level("radar-chain", 105.0, 12.0), level("radar-chain", 100.0, 13.0)]
    markdown = _markdown(levels)
    assert "| no-spec | 16 | 2 | 105.0 [100.0-110.0] | 1.00x (0.91–1.10) | 12.0 | 9.5 | 19.0 | 0 |" in markdown
    # ratio of medians 100 / 105; range: the slowest run over no-spec's fastest .. the fastest over its slowest
    assert "| radar-chain | 16 | 3 | 100.0 [95.0-105.0] | 0.95x (0.86–1.05) | 12.0 | 12.0 | 24.0 | 0 |" in markdown
    assert "Per config and concurrency" not in _markdown([OLD_LEVEL])  # measured once: no summary


def test_online_rows_start_their_servers_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radar_vllm.bench import harness, online
    from radar_vllm.bench.configs import BenchConfig

    settings = bench_settings(online_concurrency=(1, 4), online_requests=2, online_max_new_tokens=8,
                              online_server_starts=2, work_dir=str(tmp_path), output_dir=str(tmp_path))
    models = harness.BenchModels(target="t", head="h", radar_checkpoint="r", confidence_checkpoint=None)
    configs = [BenchConfig(name="no-spec", kind="none"),
               BenchConfig(name="radar-chain", kind="radar", num_speculative_tokens=4, max_depth=4, draft_model="r")]
    started: list[str] = []

    def fake_start(command: Any, env: Any, log_path: Path, port: int, timeout_s: float) -> Any:
        started.append(log_path.stem)
        return SimpleNamespace(start_seconds=1.0)

    def fake_measure(server: Any, prompts: Any, levels: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return [{"concurrency": c, "failed": 0, "index": len(started)} for c in levels]

    monkeypatch.setattr(online, "start_server", fake_start)
    monkeypatch.setattr(online, "measure_server", fake_measure)
    monkeypatch.setattr(online, "stop_server", lambda server: None)
    entries = harness.run_online(settings, configs, models, [[1, 2]], tmp_path, {})
    # the rows in turn, the second pass in reverse order
    assert started == ["no-spec", "radar-chain", "radar-chain@2", "no-spec@2"]
    assert [(e["config"], e["server_start"], e["concurrency"]) for e in entries] == [
        ("no-spec", 0, 1), ("no-spec", 0, 4), ("radar-chain", 0, 1), ("radar-chain", 0, 4),
        ("radar-chain", 1, 1), ("radar-chain", 1, 4), ("no-spec", 1, 1), ("no-spec", 1, 4)]
    assert (tmp_path / "online" / "radar-chain@2.json").is_file()  # each start resumable on its own
    with pytest.raises(ValueError, match="online_server_starts"):
        bench_settings(online_server_starts=0)
