"""The main job: RADAR vs stock EAGLE-3 vs no speculation (see radar_vllm/bench/main_job.py).

    python benchmarks/main_job.py [--checkpoint DIR] [--tiny] [--num-prompts N] [--json OUT]
"""
import sys

from radar_vllm.bench.main_job import main

if __name__ == "__main__":
    sys.exit(main())
