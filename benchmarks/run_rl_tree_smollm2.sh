#!/usr/bin/env bash
# Tree-mode RL pipeline for the shipped SmolLM2 EAGLE-3 head (T = 0, top_k 10, D 7, 60 tokens):
#   1. record full-depth tree rounds with the reference decoder (ShareGPT train + held-out splits);
#   2. measure the tree-mode cost table with the reference decoder (`calibrate --engine vllm`
#      times chain rounds only, so tree verify costs inside vLLM are not measured here);
#   3. train our exact expected-throughput policy and the paper's REINFORCE;
#   4. evaluate both on held-out rounds against fixed depths 0..D, the cost rule and the oracle.
# Results: benchmarks/results/policy_smollm2_tree.{json,md,png}; the trained policies stay in
# $WORK/policies (pack the exact one with `radar-vllm pack HEAD CHAIN_POLICY OUT --tree-policy ...`).
#
# Environment overrides: HEAD, WORK, TRAIN_PROMPTS, HELDOUT_PROMPTS, NEW_TOKENS, REPEATS,
# STEPS (space-separated subset of: collect calibrate train evaluate). Collection resumes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="$(python -c 'from radar_vllm.offline.assets import ensure_smollm2; print(ensure_smollm2(progress=False))')"
HEAD="${HEAD:-$ROOT/radar_vllm/checkpoints/smollm2-135m-eagle3}"
WORK="${WORK:-/work/runs/policy-tree}"
TRAIN_PROMPTS="${TRAIN_PROMPTS:-16}"
HELDOUT_PROMPTS="${HELDOUT_PROMPTS:-8}"
NEW_TOKENS="${NEW_TOKENS:-96}"
REPEATS="${REPEATS:-10}"
STEPS="${STEPS:-collect calibrate train evaluate}"
RESULTS="$ROOT/benchmarks/results"
COSTS="$WORK/costs_tree_reference.json"
TREE=(--mode tree --top-k 10 --max-depth 7 --total-tokens 60)
COMMON=(--target "$TARGET" --head "$HEAD" "${TREE[@]}" --threads 1)
mkdir -p "$WORK" "$RESULTS"

has_step() { [[ " $STEPS " == *" $1 "* ]]; }

if has_step collect; then
    for split in train heldout; do
        count=$TRAIN_PROMPTS; [[ $split == heldout ]] && count=$HELDOUT_PROMPTS
        nice -n 10 radar-vllm collect "${COMMON[@]}" --out "$WORK/$split" --split "$split" \
            --num-prompts "$count" --prompts-per-shard 8 --max-new-tokens "$NEW_TOKENS" \
            --temperatures 0 > "$WORK/collect_$split.log" 2>&1
    done
fi
if has_step calibrate; then
    nice -n 5 radar-vllm calibrate --engine reference "${COMMON[@]}" --out "$COSTS" \
        --repeats "$REPEATS" --warmup 2 \
        --note "reference decoder; load average $(cut -d' ' -f1-3 /proc/loadavg) at start" \
        > "$WORK/calibrate.log" 2>&1
fi
if has_step train; then
    radar-vllm train-policy --table "$WORK/train/T0" --costs "$COSTS" --out "$WORK/policies" \
        --algorithm both --temperature 0 --max-depth 7 --this-machine --threads 1 > "$WORK/train.log" 2>&1
fi
if has_step evaluate; then
    radar-vllm evaluate-policy --table "$WORK/heldout/T0" --train-table "$WORK/train/T0" \
        --costs "$COSTS" --temperature 0 --max-depth 7 \
        --policy "ours=$WORK/policies/exact" --policy "paper=$WORK/policies/reinforce" \
        --title "SmolLM2-135M + EAGLE-3 head, tree mode (top_k 10, 60 tokens), reference-decoder costs, T = 0" \
        --out "$RESULTS/policy_smollm2_tree" --threads 1 > "$WORK/evaluate.log" 2>&1
fi
