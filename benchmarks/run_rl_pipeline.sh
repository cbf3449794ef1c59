#!/usr/bin/env bash
# Offline RL pipeline for the stop policy on the SmolLM2 target and its EAGLE-3 head:
# record rounds (train + held-out, T = 0 and T = 1), measure costs, train both policies,
# evaluate on held-out rounds. Results go to benchmarks/results/policy_eval_T{0,1}.{json,md,png}.
#
# Environment overrides: HEAD (head folder), WORK (scratch folder), DEVICE (cpu|cuda), DTYPE,
# TRAIN_PROMPTS, HELDOUT_PROMPTS, NEW_TOKENS, THREADS, MODE (tree|chain).
# Every step resumes or is cheap to redo; run it on an otherwise idle machine, since the
# cost table is measured here.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="$(python -c 'from radar_vllm.offline.assets import ensure_smollm2; print(ensure_smollm2(progress=False))')"
HEAD="${HEAD:-$ROOT/radar_vllm/checkpoints/smollm2-135m-eagle3}"
WORK="${WORK:-/work/runs/rl-smollm2}"
DEVICE="${DEVICE:-cpu}"
DTYPE="${DTYPE:-float32}"
THREADS="${THREADS:-2}"
MODE="${MODE:-tree}"
TRAIN_PROMPTS="${TRAIN_PROMPTS:-200}"
HELDOUT_PROMPTS="${HELDOUT_PROMPTS:-60}"
NEW_TOKENS="${NEW_TOKENS:-128}"
COMMON=(--target "$TARGET" --head "$HEAD" --device "$DEVICE" --dtype "$DTYPE" --threads "$THREADS"
        --mode "$MODE")

radar-vllm collect "${COMMON[@]}" --out "$WORK/train" --split train \
    --num-prompts "$TRAIN_PROMPTS" --max-new-tokens "$NEW_TOKENS" --temperatures 0 1
radar-vllm collect "${COMMON[@]}" --out "$WORK/heldout" --split heldout \
    --num-prompts "$HELDOUT_PROMPTS" --max-new-tokens "$NEW_TOKENS" --temperatures 0 1
radar-vllm calibrate "${COMMON[@]}" --out "$WORK/costs.json"

for T in 0 1; do
    radar-vllm train-policy --table "$WORK/train/T$T" --costs "$WORK/costs.json" \
        --out "$WORK/policies/T$T" --algorithm both --temperature "$T" --this-machine \
        --threads "$THREADS"
    radar-vllm evaluate-policy --table "$WORK/heldout/T$T" --train-table "$WORK/train/T$T" \
        --costs "$WORK/costs.json" --temperature "$T" \
        --policy "ours=$WORK/policies/T$T/exact" --policy "paper=$WORK/policies/T$T/reinforce" \
        --out "$ROOT/benchmarks/results/policy_eval_T$T" --threads "$THREADS"
done
