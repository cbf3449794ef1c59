#!/usr/bin/env bash
# Chain-mode RL pipeline for the shipped SmolLM2 EAGLE-3 head, with costs measured inside vLLM:
#   1. record chain rounds with the reference decoder (train + held-out splits, T = 0 and T = 1);
#   2. measure chain round times for d = 0..D in vLLM (CPU build, batch 1, greedy);
#   3. train the paper's REINFORCE, our exact expected-throughput policy, and ours under an
#      acceptance budget (BUDGET, default 1% of full depth's acceptance length) per temperature;
#   4. evaluate them on held-out rounds against fixed depths 0..D, the cost rule and the oracle,
#      and measure the headroom any stop policy has with this state (radar-vllm policy-headroom);
#   5. pack the head + our T = 0 policy (PACK_POLICY) into radar_vllm/checkpoints/smollm2-135m-radar/,
#      with our T = 1 policy as the policy of sampled requests.
# Results: benchmarks/results/policy_smollm2_chain_T{0,1}.{json,md,png},
# policy_headroom_smollm2_chain.{json,md} and costs_smollm2_chain.json.
#
# Training rounds skip the prompts the head was trained on (HEAD_PROMPTS, default: the prompts
# file named in the head's training_record.json, when it exists on this machine): the head has
# memorised them, and their rounds overstate its acceptance.
#
# Environment overrides: HEAD, WORK, D, TRAIN_PROMPTS, HELDOUT_PROMPTS, NEW_TOKENS, CAL_PROMPTS,
# CAL_PASSES, CAL_DTYPE (float32, the benchmarks' dtype), CAL_EAGER (0: compiled engines as
# served, the default; 1: enforce_eager), CLOCK (wall|cpu), CAL_NOTE (machine state recorded with the costs), HEAD_PROMPTS,
# BUDGET, PACK_POLICY (exact | budget), HEADROOM_NOTES (a file, one note a line, for the headroom report), TREE_POLICY and TREE_TOTAL_TOKENS (kept in the packed
# checkpoint), STEPS (space-separated subset of: collect calibrate train evaluate pack).
# Collection resumes (finished shards are kept); the other steps are cheap to redo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LD_PRELOAD="${LD_PRELOAD:-$ROOT/.venv/lib/libiomp5.so}"
TARGET="$(python -c 'from radar_vllm.offline.assets import ensure_smollm2; print(ensure_smollm2(progress=False))')"
HEAD="${HEAD:-$ROOT/radar_vllm/checkpoints/smollm2-135m-eagle3}"
WORK="${WORK:-/work/runs/rl-smollm2-chain}"
D="${D:-7}"
TRAIN_PROMPTS="${TRAIN_PROMPTS:-256}"
HELDOUT_PROMPTS="${HELDOUT_PROMPTS:-64}"
BUDGET="${BUDGET:-0.01}"
# The shipped checkpoint's chain policy was packed from an earlier run of this pipeline (16
# training prompts); the policy retrained on 216 prompts measured slower batched inside vLLM
# (README, Results), so `pack` was not run again. Running it replaces the shipped policy.
PACK_POLICY="${PACK_POLICY:-exact}"
if [[ "$PACK_POLICY" != exact && "$PACK_POLICY" != budget ]]; then
    echo "PACK_POLICY must be exact or budget, got $PACK_POLICY" >&2; exit 2
fi
HEAD_PROMPTS="${HEAD_PROMPTS:-$(python -c 'import json, sys
try:
    print(json.load(open(sys.argv[1]))["data"]["prompts_file"])
except (OSError, KeyError, ValueError):
    print("")' "$HEAD/training_record.json")}"
EXCLUDE=()
if [[ -n "$HEAD_PROMPTS" && -f "$HEAD_PROMPTS" ]]; then
    EXCLUDE=(--exclude-prompts "$HEAD_PROMPTS")
else
    echo "warning: the head's training prompts (${HEAD_PROMPTS:-unknown}) are not on this machine;" \
         "training rounds may include prompts the head was trained on" >&2
fi
NEW_TOKENS="${NEW_TOKENS:-64}"
CAL_PROMPTS="${CAL_PROMPTS:-3}"
CAL_PASSES="${CAL_PASSES:-1}"
CLOCK="${CLOCK:-cpu}"
CAL_DTYPE="${CAL_DTYPE:-float32}"
CAL_COMPILE=(--vllm-compile)
[[ "${CAL_EAGER:-0}" == 1 ]] && CAL_COMPILE=()
STEPS="${STEPS:-collect calibrate train evaluate pack}"
RESULTS="$ROOT/benchmarks/results"
COSTS="$RESULTS/costs_smollm2_chain.json"
COMMON=(--target "$TARGET" --head "$HEAD" --mode chain --max-depth "$D" --threads 1)
mkdir -p "$WORK" "$RESULTS"

has_step() { [[ " $STEPS " == *" $1 "* ]]; }

if has_step collect; then
    nice -n 10 radar-vllm collect "${COMMON[@]}" --out "$WORK/train" --split train \
        --num-prompts "$TRAIN_PROMPTS" --prompts-per-shard 4 --max-new-tokens "$NEW_TOKENS" \
        --temperatures 0 1 "${EXCLUDE[@]}" > "$WORK/collect_train.log" 2>&1 &
    TRAIN_PID=$!
    nice -n 10 radar-vllm collect "${COMMON[@]}" --out "$WORK/heldout" --split heldout \
        --num-prompts "$HELDOUT_PROMPTS" --prompts-per-shard 4 --max-new-tokens "$NEW_TOKENS" \
        --temperatures 0 1 > "$WORK/collect_heldout.log" 2>&1 &
    HELDOUT_PID=$!
fi
if has_step calibrate; then
    radar-vllm calibrate --engine vllm "${COMMON[@]}" --out "$COSTS" \
        --vllm-prompts "$CAL_PROMPTS" --passes "$CAL_PASSES" --vllm-max-tokens 64 --clock "$CLOCK" \
        --vllm-dtype "$CAL_DTYPE" "${CAL_COMPILE[@]}" \
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
        radar-vllm train-policy --table "$WORK/train/T$T" --costs "$COSTS" \
            --out "$WORK/policies/T$T/budget" --algorithm exact --acceptance-budget "$BUDGET" \
            --temperature "$T" --max-depth "$D" --this-machine --threads 1 \
            > "$WORK/train_budget_T$T.log" 2>&1
    fi
    if has_step evaluate; then
        # The policy in the shipped checkpoint (trained at T = 0) is scored beside the new ones.
        SHIPPED=()
        SHIPPED_DIR="$ROOT/radar_vllm/checkpoints/smollm2-135m-radar/policy"
        # (only when it was trained for the same head as these rounds)
        if [[ "$T" == 0 && -f "$SHIPPED_DIR/policy.json" ]] && grep -q "$(python -c 'import json, sys
print(json.load(open(sys.argv[1]))["metadata"]["head_id"])' "$(ls "$WORK/heldout/T$T"/shard-*.json | head -1)")" \
                "$SHIPPED_DIR/policy.json"; then
            SHIPPED=(--policy "shipped=$SHIPPED_DIR")
        fi
        radar-vllm evaluate-policy --table "$WORK/heldout/T$T" --train-table "$WORK/train/T$T" \
            --costs "$COSTS" --temperature "$T" --max-depth "$D" \
            --policy "ours=$WORK/policies/T$T/exact" --policy "paper=$WORK/policies/T$T/reinforce" \
            --policy "ours-budget=$WORK/policies/T$T/budget/exact" "${SHIPPED[@]}" \
            --title "SmolLM2-135M + EAGLE-3 head, chain mode, vLLM CPU costs, T = $T" \
            --out "$RESULTS/policy_smollm2_chain_T$T" --threads 1 > "$WORK/evaluate_T$T.log" 2>&1
    fi
done
if has_step evaluate; then
    NOTES=()
    if [[ -n "${HEADROOM_NOTES:-}" ]]; then
        while IFS= read -r line; do [[ -n "$line" ]] && NOTES+=(--note "$line"); done < "$HEADROOM_NOTES"
    fi
    radar-vllm policy-headroom --costs "$COSTS" \
        --heldout "T0=$WORK/heldout/T0" --heldout "T1=$WORK/heldout/T1" \
        --policy "T0=$WORK/policies/T0/exact" --policy "T1=$WORK/policies/T1/exact" \
        --out "$RESULTS/policy_headroom_smollm2_chain" "${NOTES[@]}" \
        > "$WORK/headroom.log" 2>&1
fi

if has_step pack; then
    OUT="$ROOT/radar_vllm/checkpoints/smollm2-135m-radar"
    rm -rf "$OUT.tmp"
    # the gate-cost table measured for this head on this machine travels with the checkpoint
    # (re-measure it with radar-vllm calibrate-gate after a new head)
    GATE=()
    if [[ -f "$OUT/gate_costs.json" ]]; then
        cp "$OUT/gate_costs.json" "$WORK/gate_costs.json"
        GATE=(--gate-costs "$WORK/gate_costs.json")
    fi
    PACKED="$WORK/policies/T0/exact"
    SAMPLED="$WORK/policies/T1/exact"
    if [[ "$PACK_POLICY" == budget ]]; then
        PACKED="$WORK/policies/T0/budget/exact"
        SAMPLED="$WORK/policies/T1/budget/exact"
    fi
    radar-vllm pack "$HEAD" "$PACKED" "$OUT.tmp" --mode chain --max-depth "$D" --sampled-policy "$SAMPLED" \
        --tree-policy "${TREE_POLICY:-$OUT/policy-tree}" --total-tokens "${TREE_TOTAL_TOKENS:-12}" "${GATE[@]}"
    rm -rf "$OUT"
    mv "$OUT.tmp" "$OUT"
fi
