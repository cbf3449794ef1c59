"""``radar-vllm evaluate-policy``: fixed depths, policies, cost rule and oracle on held-out rounds.

Writes ``PREFIX.json``, ``PREFIX.md`` and ``PREFIX.png``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from radar_vllm.commands.train_policy import add_common_data_arguments, load_checked

logger = logging.getLogger(__name__)


def parse_pair(text: str, flag: str = "--policy") -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH); ValueError naming ``flag`` otherwise."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"{flag} must look like NAME=PATH, got {text!r}")
    return name, path


def run(args: argparse.Namespace) -> int:
    from radar_vllm.core.policy import load_policy_checkpoint
    from radar_vllm.offline.rl.evaluate import evaluate_rules, markdown_table, write_report
    from radar_vllm.offline.rl.table import load_round_table

    table, costs = load_checked(args, args.table)
    train_table = load_round_table(args.train_table) if args.train_table else None
    if train_table is not None and train_table.metadata.head_id != table.metadata.head_id:
        raise ValueError(f"--train-table was recorded with head {train_table.metadata.head_id!r},"
                         f" the evaluation table with {table.metadata.head_id!r}")
    policies = {}
    for text in args.policy or []:
        name, path = parse_pair(text)
        checkpoint = load_policy_checkpoint(path)
        meta = checkpoint.metadata
        for key in ("head_id", "temperature", "max_depth", "top_k"):
            if key in meta and meta[key] != getattr(table.metadata, key):
                raise ValueError(
                    f"policy {path} was trained with {key}={meta[key]!r} but the evaluation "
                    f"table has {key}={getattr(table.metadata, key)!r}")
        policies[name] = checkpoint.policy
    report = evaluate_rules(table, costs, policies, train_table=train_table,
                            threshold=args.threshold)
    title = args.title or f"Stop rules, T = {table.metadata.temperature:g}"
    paths = write_report(report, Path(args.out), title=title, plot=not args.no_plot)
    print(markdown_table(report, title))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate-policy",
        help="compare fixed depths, stop policies, a cost rule and the oracle on round tables")
    parser.add_argument("--table", nargs="+", required=True,
                        help="round-table directories (held-out split)")
    parser.add_argument("--policy", action="append", metavar="NAME=PATH",
                        help="a stop-policy checkpoint to evaluate (repeatable)")
    parser.add_argument("--train-table", nargs="+", default=None,
                        help="training rounds, used to set and tune the cost rule")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="P(continue) threshold of the deterministic decision")
    parser.add_argument("--out", required=True, help="output prefix, e.g. "
                        "benchmarks/results/policy_eval_T1")
    parser.add_argument("--title", default="")
    parser.add_argument("--no-plot", action="store_true")
    add_common_data_arguments(parser)
    parser.set_defaults(func=run)
