"""Per-feature account of the signals known before a round's first draft call (issue: "say how
much each feature buys"): load, temperature, the previous round's acceptance, the target's
confidence in the token it just emitted, and, for reference, the draft's confidence after its
first call.

Records K-token chain rounds of the shipped head with the reference decoder (torch, batch 1; the
same drafts and acceptance as the engine's) on prompts of the given sets at each temperature, then
scores each per-request feature with radar_vllm.offline.rl.features (AUC for "first draft
accepted", the best skip-below-threshold rule against always drafting and the oracle) at step costs
measured in the engine (a depth-0 step and a K-draft step, ms, from a profile_steps run). Load and
temperature are the gate's: their effect is in the per-batch-size profile and the acceptance by
temperature printed here.

    python benchmarks/feature_account.py --out benchmarks/results/feature_account_smollm2 \\
        --costs-ms 42.8,46.8 --num-prompts 24 --max-new-tokens 96
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from radar_vllm.core.config import TreeConfig
from radar_vllm.offline.assets import ensure_smollm2
from radar_vllm.offline.prompts import load_prompt_set, tokenize_prompts
from radar_vllm.offline.reference.decoder import FixedDepth, ReferenceDecoder
from radar_vllm.offline.reference.runners import load_head, load_target
from radar_vllm.offline.rl.features import auc, held_out_rule, skip_rule

ROOT = Path(__file__).resolve().parent.parent
HEAD = ROOT / "radar_vllm" / "checkpoints" / "smollm2-135m-eagle3"
FEATURES = {
    "prev_accepted": "drafts the request's previous round accepted",
    "target_prob": "the target's probability of the token it just emitted (the round's root)",
    "target_top": "the target's largest probability where it emitted that token",
    "draft_top": "the draft's largest probability after its first call (known only after that call)",
}


def record(decoder: ReferenceDecoder, prompt_ids: list[int], max_new_tokens: int, depth: int,
           temperature: float, generator: torch.Generator, eos: int | None, prompt: int) -> list[dict]:
    """One request's rounds: features known before the round, and the drafts it accepted."""
    rule = FixedDepth(depth)
    decoder.start(prompt_ids, temperature, generator)
    rows, emitted, previous, root_prob, root_top = [], 1, None, None, None
    while emitted < max_new_tokens:
        verified = decoder.verify_round(rule, temperature, generator)
        accepted, new_tokens = len(verified.nodes), verified.new_tokens
        if previous is not None:
            rows.append({"prompt": prompt, "accepted": accepted, "prev_accepted": previous, "target_prob": root_prob,
                         "target_top": root_top, "draft_top": float(verified.draft.states[0][0, 0].exp())})
        probs = torch.softmax(verified.logits[verified.bonus_row].float(), dim=-1)
        root_prob, root_top = float(probs[new_tokens[-1]]), float(probs.max())
        previous = accepted
        decoder.commit(verified.accepted_rows, new_tokens, verified.aux)
        emitted += len(new_tokens)
        if eos is not None and eos in new_tokens:
            break
    return rows


def account(rounds: list[dict], skip_seconds: float, draft_seconds: float) -> dict:
    accepted = [r["accepted"] for r in rounds]
    first = [a > 0 for a in accepted]
    folds = [r["prompt"] % 2 for r in rounds]  # two folds by prompt
    out = {"rounds": len(rounds), "first_accepted": sum(first) / len(first),
           "tokens_per_round": 1 + sum(accepted) / len(accepted), "features": {}}
    for name in FEATURES:
        values = [float(r[name]) for r in rounds]
        out["features"][name] = {"auc": auc(values, first),
                                 **skip_rule(values, accepted, skip_seconds, draft_seconds),
                                 "held_out": held_out_rule(values, accepted, folds, skip_seconds, draft_seconds)}
    return out


def markdown(result: dict) -> str:
    args = result["args"]
    lines = [f"# What the signals before a round's first draft call buy ({args['depth']}-token chains, batch 1)", "",
             f"Recorded {result['created']} with the reference decoder (float32, batch 1, the shipped EAGLE-3 head, "
             f"{args['num_prompts']} prompts each of {', '.join(args['prompt_sets'])}, up to {args['max_new_tokens']} new "
             f"tokens, seed {args['seed']}); command: `{result['command']}`. Step costs: a depth-0 step "
             f"{args['costs_ms'][0]} ms, a {args['depth']}-draft step {args['costs_ms'][1]} ms ({args['costs_note']}). "
             "Rounds scored one at a time (a skipped round yields one token in a depth-0 step); AUC of each feature "
             "for \"the first draft is accepted\"; rule = \"skip drafting where the feature is below t\", t chosen on the "
             "prompts of the other fold (two folds by prompt: the held-out gain is the honest one; in-sample, t chosen "
             "on the same rounds, in parentheses); "
             "oracle = skip exactly the rounds whose first draft is rejected. The rates are relative (request "
             "tokens per step-second of these rounds), compare them within a row.", "",
             "| T | rounds | 1st draft accepted | tokens/round | feature | AUC | always draft | never | rule, held out "
             "(in-sample, its skips) | held-out gain | oracle gain |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for temperature, block in result["temperatures"].items():
        for name, f in block["features"].items():
            auc_text = "–" if f["auc"] is None else f"{f['auc']:.3f}"
            lines.append(f"| {temperature} | {block['rounds']} | {block['first_accepted']:.1%} | "
                         f"{block['tokens_per_round']:.2f} | {name} | {auc_text} | {f['always']:.1f} | "
                         f"{f['never']:.1f} | {f['held_out']:.1f} ({f['rule']:.1f}, {f['skipped']:.0%}) | "
                         f"{f['held_out'] / f['always'] - 1:+.1%} | {f['oracle'] / f['always'] - 1:+.1%} |")
    lines += ["", "Features: " + "; ".join(f"`{k}`: {v}" for k, v in FEATURES.items()) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output path without suffix (.json, .md)")
    parser.add_argument("--prompt-sets", default="mtbench,humaneval")
    parser.add_argument("--num-prompts", type=int, default=24, help="per prompt set")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--depth", type=int, default=3, help="drafts per round (the batch-1 best fixed K)")
    parser.add_argument("--costs-ms", required=True,
                        help="depth-0 step,K-draft step in ms (e.g. from profile_steps at batch 1)")
    parser.add_argument("--costs-note", default="", help="where the costs were measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    costs = [float(x) for x in args.costs_ms.split(",")]
    if len(costs) != 2 or min(costs) <= 0:
        parser.error("--costs-ms takes two positive numbers: depth-0 step, K-draft step")
    torch.set_num_threads(args.threads)
    target_path = ensure_smollm2(progress=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = load_target(target_path, dtype=torch.float32)
    head = load_head(HEAD, target, dtype=torch.float32)
    decoder = ReferenceDecoder(target, head, TreeConfig.for_mode("chain", args.depth, 1, args.depth + 1),
                               chain_state_size=1)
    prompts = []
    for name in args.prompt_sets.split(","):
        prompts += load_prompt_set(name, "heldout" if name == "sharegpt" else "train")[: args.num_prompts]
    token_ids = tokenize_prompts(tokenizer, prompts)
    result = {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "args": {**vars(args), "costs_ms": costs, "prompt_sets": args.prompt_sets.split(",")},
              "temperatures": {}, "rounds": {}}
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        generator = torch.Generator().manual_seed(args.seed)
        rounds = []
        for index, ids in enumerate(tqdm(token_ids, desc=f"T={temperature:g}", file=sys.stderr)):
            rounds += record(decoder, ids, args.max_new_tokens, args.depth, temperature, generator,
                             tokenizer.eos_token_id, index)
        key = f"{temperature:g}"
        result["rounds"][key] = rounds
        result["temperatures"][key] = account(rounds, costs[0] / 1000, costs[1] / 1000)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    report = markdown(result)
    out.with_suffix(".md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
