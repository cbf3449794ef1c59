"""``radar-vllm policy-headroom``: how much of the gap to the oracle any stop policy could close.

Per held-out round table (``--heldout LABEL=DIR``, one per temperature): the best fixed depth, the
trained policy (``--policy LABEL=DIR``), the exact trainer fitted in-sample, restricted oracles
and the oracle, and how predictable the first draft's fate is (:mod:`radar_vllm.offline.rl.headroom`).
Writes ``PREFIX.json`` and ``PREFIX.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from radar_vllm.commands.evaluate_policy import parse_pair


def display_path(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else path


def run(args: argparse.Namespace) -> int:
    import torch

    from radar_vllm.core.costs import describe_machine, load_cost_table
    from radar_vllm.offline.rl.headroom import headroom, render

    torch.set_num_threads(args.threads)
    costs = load_cost_table(args.costs)
    tables = dict(parse_pair(item, "--heldout") for item in args.heldout)
    policies = dict(parse_pair(item, "--policy") for item in args.policy)
    results = [headroom(label, path, policies.get(label), costs, args.seed) for label, path in tables.items()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    costs_label = display_path(args.costs)
    record = {"command_line": sys.argv, "costs": costs_label, "notes": args.note,
              "machine": describe_machine(), "python": platform.python_version(), "results": results}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    text = render(results, costs_label, args.note)
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "policy-headroom",
        help="ceilings for any stop policy on held-out rounds: restricted oracles, an in-sample fit")
    parser.add_argument("--costs", required=True, help="cost table JSON (radar-vllm calibrate)")
    parser.add_argument("--heldout", action="append", required=True, metavar="LABEL=DIR",
                        help="held-out round table (repeatable, e.g. T0=DIR --heldout T1=DIR)")
    parser.add_argument("--policy", action="append", default=[], metavar="LABEL=DIR",
                        help="the trained policy for the table of the same label (repeatable)")
    parser.add_argument("--out", required=True, help="output prefix")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the report's notes (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.set_defaults(func=run)
