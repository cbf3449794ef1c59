"""The Triton kernels pass Triton's compiler for sm_90 (H100/H200) without a GPU and do not spill.

The interpreter tests check what the kernels compute; this checks the compiled path (types of
loop-carried values, early returns, layouts, registers) with the ptxas that ships with Triton.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from radar_vllm.kernels.compile_check import QUICK_VARIANTS, ptxas_available

pytestmark = pytest.mark.skipif(not ptxas_available(), reason="Triton's NVIDIA backend or ptxas is missing")


def test_kernels_compile_for_sm90_without_spills(tmp_path: Path) -> None:
    output = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-m", "radar_vllm.kernels.compile_check", "--arch", "90", "--quick", "--json", str(output)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reports = json.loads(output.read_text())
    assert {r["variant"] for r in reports} == set(QUICK_VARIANTS)
    assert {r["kernel"] for r in reports} == {
        "_policy_step_kernel", "_tree_mask_kernel", "_tree_attention_kernel", "_merge_splits_kernel",
    }
    for report in reports:
        assert report["spill_bytes"] in (0, None), report
        assert report["shared_bytes"] <= 227 * 1024, report  # the sm_90 per-block limit
