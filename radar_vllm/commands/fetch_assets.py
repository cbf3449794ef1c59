"""``radar-vllm assets``: convert the SmolLM2 target (once) and list the offline asset paths."""
from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from radar_vllm.offline.assets import asset_paths

    paths = asset_paths(convert=True)
    if args.json:
        print(json.dumps(paths, indent=2))
        return 0
    print(f"cache directory: {paths['cache_dir']}")
    for name, path in paths["target"].items():
        print(f"target {name}: {path}")
    for name, path in paths["prompt_sets"].items():
        print(f"prompt set {name}: {path}")
    for name, path in paths["checkpoints"].items():
        print(f"checkpoint {name}: {path}")
    if not paths["checkpoints"]:
        print("checkpoints: none shipped")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "assets", help="convert the SmolLM2 target if needed and print asset paths"
    )
    parser.add_argument("--json", action="store_true", help="print the paths as JSON")
    parser.set_defaults(func=run)
