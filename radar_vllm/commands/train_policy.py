"""``radar-vllm train-policy``: train the stop policy offline on recorded round tables.

Writes, per algorithm, ``OUT/<algorithm>/policy.safetensors`` + ``policy.json`` (the stop-policy
checkpoint format of radar_vllm.core.policy) and ``OUT/<algorithm>/training_record.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def add_common_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by train-policy and evaluate-policy: data, costs and the checks on them."""
    parser.add_argument("--costs", required=True, help="cost table JSON (radar-vllm calibrate)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="refuse tables recorded at another temperature")
    parser.add_argument("--head-id", default=None, help="refuse tables recorded with another head")
    parser.add_argument("--max-depth", type=int, default=None,
                        help="refuse tables recorded with another maximum depth")
    parser.add_argument("--engine", default=None,
                        help="refuse cost tables measured on another engine")
    parser.add_argument("--this-machine", action="store_true",
                        help="refuse cost tables measured on another machine than this one")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def load_checked(args: argparse.Namespace, table_paths: list[str]):
    """Load the tables and the cost table, refusing mismatches; returns (table, costs)."""
    import torch

    from radar_vllm.core.costs import check_cost_table, describe_machine, load_cost_table
    from radar_vllm.offline.rl.table import check_table_conditions, load_round_table

    torch.set_num_threads(max(1, args.threads))
    table = load_round_table(table_paths)
    check_table_conditions(table.metadata, temperature=args.temperature, head_id=args.head_id,
                           max_depth=args.max_depth)
    costs = load_cost_table(args.costs)
    check_cost_table(costs, model_id=table.metadata.model_id, head_id=table.metadata.head_id,
                     engine=args.engine,
                     machine=describe_machine() if args.this_machine else None,
                     max_tree_size=int(table.tree_sizes.max()))
    return table, costs


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from radar_vllm.core.policy import DECISION_SAMPLED, DECISION_THRESHOLD, PolicyConfig, save_policy
    from radar_vllm.offline.rl.train import (
        ALGORITHM_EXACT,
        ALGORITHM_REINFORCE,
        ExactConfig,
        ReinforceConfig,
        evaluate_policy_modes,
        train_exact,
        train_exact_with_budget,
        train_reinforce,
    )
    from radar_vllm.offline.rl.simulate import round_outcomes

    if args.acceptance_budget is not None and args.algorithm == ALGORITHM_REINFORCE:
        raise ValueError("--acceptance-budget applies to --algorithm exact (the paper's "
                         "REINFORCE has no acceptance constraint)")
    table, costs = load_checked(args, args.table)
    train, validation = table.split(args.val_fraction, seed=args.seed)
    algorithms = [ALGORITHM_EXACT, ALGORITHM_REINFORCE] if args.algorithm == "both" \
        else [args.algorithm]
    out = Path(args.out)
    for algorithm in algorithms:
        started = time.time()
        if algorithm == ALGORITHM_EXACT:
            config = ExactConfig(epochs=args.epochs or 30, batch_size=args.batch_size or 512,
                                 lr=args.lr or 1e-3, anneal_scale=args.anneal_scale,
                                 seed=args.seed, max_steps_per_epoch=args.max_steps_per_epoch,
                                 # an explicit --epochs is taken literally
                                 min_steps=(args.min_steps if args.min_steps is not None
                                            else 0 if args.epochs else ExactConfig.min_steps),
                                 acceptance_budget=args.acceptance_budget)
            trainer = train_exact if args.acceptance_budget is None else train_exact_with_budget
            decision = DECISION_THRESHOLD
        else:
            config = ReinforceConfig(epochs=args.epochs or 100, batch_size=args.batch_size or 64,
                                     lr=args.lr or 1e-4, alpha=args.alpha, beta=args.beta,
                                     seed=args.seed, max_steps_per_epoch=args.max_steps_per_epoch)
            trainer, decision = train_reinforce, DECISION_SAMPLED
        bar = tqdm(total=None, desc=f"train-policy {algorithm}", file=sys.stderr)

        def progress(entry: dict) -> None:
            bar.update(1)
            bar.set_postfix({k: round(v, 4) for k, v in entry.items()
                             if k.startswith("val_") and isinstance(v, float)})

        result = trainer(train, validation, costs, config, progress=progress)
        bar.close()
        directory = out / algorithm
        directory.mkdir(parents=True, exist_ok=True)
        record = dict(result.record)
        record["command_line"] = sys.argv
        record["table"] = table.metadata.to_dict()
        record["split"] = {"val_fraction": args.val_fraction, "seed": args.seed, "by": "round"}
        record["costs"] = {"path": str(args.costs), "engine": costs.engine,
                           "machine": costs.machine, "model_id": costs.model_id,
                           "head_id": costs.head_id}
        record["validation"] = evaluate_policy_modes(result.policy, validation,
                                                     round_outcomes(validation, costs))
        record["started_unix"] = started
        record_path = directory / "training_record.json"
        record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n",
                               encoding="utf-8")
        policy_config = PolicyConfig(**{**result.policy.config.to_dict(), "decision": decision})
        metadata = {
            "algorithm": algorithm,
            "training_record": record_path.name,
            "model_id": table.metadata.model_id,
            "head_id": table.metadata.head_id,
            "head_hash": table.metadata.head_hash,
            "temperature": table.metadata.temperature,
            "top_k": table.metadata.top_k,
            "max_depth": table.metadata.max_depth,
            "total_tokens": table.metadata.total_tokens,
            "mode": table.metadata.mode,
            "cost_engine": costs.engine,
        }
        save_policy(result.policy, policy_config, directory, metadata=metadata)
        validation_text = json.dumps(record["validation"], indent=1)
        print(f"{algorithm}: saved {directory}; validation {validation_text}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-policy", help="train the stop policy offline on round tables (radar-vllm collect)")
    parser.add_argument("--table", nargs="+", required=True,
                        help="round-table directories (training split)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--algorithm", choices=["exact", "reinforce", "both"], default="both",
                        help="exact: expected-throughput optimisation (ours); reinforce: the "
                             "paper's recipe")
    parser.add_argument("--epochs", type=int, default=None,
                        help="default 30 (exact) / 100 (reinforce)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 512 (exact) / 64 (reinforce)")
    parser.add_argument("--lr", type=float, default=None,
                        help="default 1e-3 (exact) / 1e-4 (reinforce)")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None)
    parser.add_argument("--min-steps", type=int, default=None,
                        help="exact: fewest optimiser steps; epochs repeat until reached (default: "
                             "ExactConfig.min_steps, or 0 when --epochs is given)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="fraction of rounds held out for checkpoint selection")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.02, help="reinforce: continue penalty")
    parser.add_argument("--beta", type=float, default=None,
                        help="reinforce: terminal reward scale (default: scaled to the paper's "
                             "typical full-depth reward)")
    parser.add_argument("--acceptance-budget", type=float, default=None, metavar="B",
                        help="exact: keep the policy's mean acceptance length within the fraction "
                             "B (e.g. 0.01) of full depth's on the training rounds, trading "
                             "throughput for acceptance (default: pure throughput)")
    parser.add_argument("--anneal-scale", type=float, default=1.0,
                        help="exact: final logit scale of the annealing toward determinism")
    add_common_data_arguments(parser)
    parser.set_defaults(func=run)
