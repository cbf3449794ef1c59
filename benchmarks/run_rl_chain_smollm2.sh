#!/usr/bin/env bash
# Chain-mode RL pipeline for the shipped SmolLM2 EAGLE-3 head, with costs measured inside vLLM:
#   1. record chain rounds with the reference decoder (train + held-out splits, T = 0 and T = 1);
#   2. measure chain round times for d = 0..D in vLLM (CPU build, batch 1, greedy);
#   3. train the paper's REINFORCE and our exact expected-throughput policy per temperature;
#   4. evaluate both on held-out rounds against fixed depths 0..D, the cost rule and the oracle;
#   5. pack the head + our T = 0 policy into radar_vllm/checkpoints/smollm2-135m-radar/.
# Results: benchmarks/results/policy_smollm2_chain_T{0,1}.{json,md,png} and costs_smollm2_chain.json.
#
# Environment overrides: HEAD, WORK, D, TRAIN_PROMPTS, HELDOUT_PROMPTS, NEW_TOKENS, CAL_PROMPTS,
# CAL_PASSES, CLOCK (wall|cpu), CAL_NOTE (machine state recorded with the costs), TREE_POLICY and
# TREE_TOTAL_TOKENS (kept in the packed checkpoint), STEPS (space-separated subset of: collect calibrate train evaluate pack).
# Collection resumes (finished shards are kept); the other steps are cheap to redo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LD_PRELOAD="${LD_PRELOAD:-$ROOT/.venv/lib/libiomp5.so}"
TARGET="$(python -c 'from radar_vllm.assets import ensure_smollm2; print(ensure_smollm2(progress=False))')"
HEAD="${HEAD:-$ROOT/radar_vllm/checkpoints/smollm2-135m-eagle3}"
WORK="${WORK:-/work/runs/rl-smollm2-chain}"
D="${D:-7}"
TRAIN_PROMPTS="${TRAIN_PROMPTS:-16}"
HELDOUT_PROMPTS="${HELDOUT_PROMPTS:-12}"
NEW_TOKENS="${NEW_TOKENS:-64}"
CAL_PROMPTS="${CAL_PROMPTS:-3}"
CAL_PASSES="${CAL_PASSES:-1}"
CLOCK="${CLOCK:-cpu}"
STEPS="${STEPS:-collect calibrate train evaluate pack}"
RESULTS="$ROOT/benchmarks/results"
COSTS="$RESULTS/costs_smollm2_chain.json"
COMMON=(--target "$TARGET" --head "$HEAD" --mode chain --max-depth "$D" --threads 1)
mkdir -p "$WORK" "$RESULTS"

has_step() { [[ " $STEPS " == *" $1 "* ]]; }

if has_step collect; then
    nice -n 10 radar-vllm collect "${COMMON[@]}" --out "$WORK/train" --split train \
        --num-prompts "$TRAIN_PROMPTS" --prompts-per-shard 2 --max-new-tokens "$NEW_TOKENS" \
        --temperatures 0 1 > "$WORK/collect_train.log" 2>&1 &
    TRAIN_PID=$!
    nice -n 10 radar-vllm collect "${COMMON[@]}" --out "$WORK/heldout" --split heldout \
        --num-prompts "$HELDOUT_PROMPTS" --prompts-per-shard 2 --max-new-tokens "$NEW_TOKENS" \
        --temperatures 0 1 > "$WORK/collect_heldout.log" 2>&1 &
    HELDOUT_PID=$!
fi
if has_step calibrate; then
    radar-vllm calibrate --engine vllm "${COMMON[@]}" --out "$COSTS" \
        --vllm-prompts "$CAL_PROMPTS" --passes "$CAL_PASSES" --vllm-max-tokens 64 --clock "$CLOCK" \
        --note "${CAL_NOTE:-measured while the round collection (2 niced processes) and other jobs shared the 2 cores}; load average $(cut -d' ' -f1-3 /proc/loadavg) at start" \
        > "$WORK/calibrate.log" 2>&1
fi
if has_step collect; then
    wait "$TRAIN_PID"
    wait "$HELDOUT_PID"
fi

for T in 0 1; do
    if has_step train; then
        radar-vllm train-policy --table "$WORK/train/T$T" --costs "$COSTS" \
            --out "$WORK/policies/T$T" --algorithm both --temperature "$T" --max-depth "$D" \
            --this-machine --threads 1 > "$WORK/train_T$T.log" 2>&1
    fi
    if has_step evaluate; then
        radar-vllm evaluate-policy --table "$WORK/heldout/T$T" --train-table "$WORK/train/T$T" \
            --costs "$COSTS" --temperature "$T" --max-depth "$D" \
            --policy "ours=$WORK/policies/T$T/exact" --policy "paper=$WORK/policies/T$T/reinforce" \
            --title "SmolLM2-135M + EAGLE-3 head, chain mode, vLLM CPU costs, T = $T" \
            --out "$RESULTS/policy_smollm2_chain_T$T" --threads 1 > "$WORK/evaluate_T$T.log" 2>&1
    fi
done

if has_step pack; then
    OUT="$ROOT/radar_vllm/checkpoints/smollm2-135m-radar"
    rm -rf "$OUT.tmp"
    radar-vllm pack "$HEAD" "$WORK/policies/T0/exact" "$OUT.tmp" --mode chain --max-depth "$D" \
        --tree-policy "${TREE_POLICY:-$OUT/policy-tree}" --total-tokens "${TREE_TOTAL_TOKENS:-12}"
    rm -rf "$OUT"
    mv "$OUT.tmp" "$OUT"
fi
