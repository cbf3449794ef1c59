"""Write a RADAR checkpoint with a random-weight EAGLE-3 head for a target (timing smoke runs).

    python benchmarks/harness/random_checkpoint.py OUT_DIR [--target DIR] [--max-depth 7]

Prints the checkpoint directory (``OUT_DIR/radar``). Its drafts are almost never accepted, so
it measures the harness and the drafting overhead, not a speedup. Default target: SmolLM2.
"""
from __future__ import annotations

import argparse
import sys

from radar_vllm.bench.model_dirs import random_radar_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--target", default=None, help="target HF folder (default: the SmolLM2 asset)")
    parser.add_argument("--max-depth", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    target = args.target
    if target is None:
        from radar_vllm.offline.assets import ensure_smollm2

        target = str(ensure_smollm2())
    print(random_radar_checkpoint(target, args.out_dir, seed=args.seed, max_depth=args.max_depth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
