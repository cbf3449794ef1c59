"""The ``radar-vllm`` command line: thin subcommands that parse, build configs and call the library.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; the module sets
``func`` on its parser with ``set_defaults``. Modules are imported lazily by name so that
``radar-vllm --help`` stays fast and never imports vLLM.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# (subcommand module, one-line help). Each module provides add_parser(subparsers).
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "radar_vllm.commands.info",
    "radar_vllm.commands.train_policy",
    "radar_vllm.commands.evaluate_policy",
    "radar_vllm.commands.policy_headroom",
    "radar_vllm.commands.collect",
    "radar_vllm.commands.calibrate",
    "radar_vllm.commands.calibrate_gate",
    "radar_vllm.commands.fetch_assets",
    "radar_vllm.commands.train_head",
    "radar_vllm.commands.pack",
    "radar_vllm.commands.bench",
    "radar_vllm.commands.serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radar-vllm",
        description="RADAR dynamic draft trees for EAGLE-3 speculative decoding in vLLM.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"radar-vllm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
