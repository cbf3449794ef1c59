"""Entry script for the benchmark harness: the same as ``radar-vllm bench`` (see ``--help``).

    python benchmarks/harness/run_bench.py --quick            # few minutes, shipped assets
    python benchmarks/harness/run_bench.py --preset report --estimate   # the report's run time
    python benchmarks/harness/run_bench.py                    # full run -> benchmarks/results/bench.*

The committed SmolLM2 report is made by ``benchmarks/run_bench_report.sh``.

The library lives in ``radar_vllm.bench`` (installed with the package); results go to
``benchmarks/results/`` by default.
"""
from __future__ import annotations

import sys

from radar_vllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
