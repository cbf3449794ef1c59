"""The kernel benchmark runs end to end at tiny sizes on CPU and its kernels agree."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_benchmark_runs_and_writes_json(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--tiny", "--output", str(output)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(output.read_text())
    assert report["mode"] == "tiny-cpu"
    assert report["machine"]["torch"]
    kernels = {row["kernel"] for row in report["results"]}
    assert kernels == {"policy_step", "tree_mask", "tree_attention"}
    assert all(row["agrees"] for row in report["results"])
    assert all(row["triton_us"] > 0 and row["reference_us"] > 0 for row in report["results"])
    assert all(row["sdpa_us"] > 0 for row in report["results"] if row["kernel"] == "tree_attention")
    assert "tree_attention" in result.stdout  # the printed table
