"""``radar-vllm pack HEAD_DIR POLICY OUT_DIR``: make a RADAR checkpoint from an EAGLE-3 head and a policy."""
from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from radar_vllm.offline.pack import pack_radar_checkpoint
    from radar_vllm.core.config import read_head_config

    out_dir = pack_radar_checkpoint(
        args.head_dir,
        args.policy,
        args.out_dir,
        top_k=args.top_k,
        max_depth=args.max_depth,
        total_tokens=args.total_tokens,
        threshold=args.threshold,
        decision=args.decision,
        mode=args.mode,
        tree_policy_path=args.tree_policy,
        sampled_policy_path=args.sampled_policy,
        gate_costs_paths=args.gate_costs or (),
        tree_sizes=args.tree_size or (),
    )
    print(json.dumps({"checkpoint": str(out_dir), "radar": read_head_config(out_dir)["radar"]}, indent=2))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from radar_vllm.offline.pack import DEFAULT_MAX_DEPTH

    parser = subparsers.add_parser(
        "pack",
        help="write a RADAR checkpoint (EAGLE-3 head + stop policy + radar section)",
        description="Copy an EAGLE-3 head directory and a stop policy into OUT_DIR and add the "
        '"radar" section to its config.json. Stock vLLM still runs OUT_DIR as plain EAGLE-3.',
    )
    parser.add_argument("head_dir", help="EAGLE-3 head directory (config.json + weights)")
    parser.add_argument("policy", help="stop-policy checkpoint: directory with policy.safetensors + policy.json")
    parser.add_argument("out_dir", help="new (or empty) output directory")
    parser.add_argument("--top-k", type=int, default=None, help="policy state width (default: the policy's)")
    parser.add_argument("--max-depth", type=int, default=DEFAULT_MAX_DEPTH, help="most draft calls per round")
    parser.add_argument("--total-tokens", type=int, default=None, help="tree mode: nodes per request incl. root")
    parser.add_argument("--threshold", type=float, default=None, help="P(continue) threshold (default: the policy's)")
    parser.add_argument("--decision", choices=("threshold", "sampled"), default=None,
                        help="decision rule (default: the policy's)")
    parser.add_argument("--mode", choices=("chain", "tree"), default="chain")
    parser.add_argument("--tree-policy", default=None,
                        help="a second stop policy, trained on tree-mode rounds, used when the mode is tree "
                             "(stored as policy-tree/; without it tree mode runs the main policy)")
    parser.add_argument("--gate-costs", action="append", default=None,
                        help="gate-cost table (radar-vllm calibrate-gate) the depth gate starts from on the "
                             "machine it was measured on; repeat it for several machines (copied to "
                             "gate_costs.json, gate_costs_2.json, ...)")
    parser.add_argument("--tree-size", type=int, action="append", default=None,
                        help="tree mode: a smaller tree (tokens per request incl. root, below --total-tokens) the "
                             "depth gate may choose per batch size; repeat it for several")
    parser.add_argument("--sampled-policy", default=None,
                        help="a chain stop policy trained on sampled (T > 0) rounds, used for the requests "
                             "that sample (stored as policy-sampled/; without it they run the main policy)")
    parser.set_defaults(func=run)
