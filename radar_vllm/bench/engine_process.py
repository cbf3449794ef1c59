"""Subprocess entry: one configuration, one vLLM engine, every offline run of the job.

``python -m radar_vllm.bench.engine_process --job JOB.json --result RESULT.json``

The job (written by :mod:`radar_vllm.bench.harness`) holds the engine settings, the
configuration and the workloads; the result holds the engine start time, every run record and
the greedy outputs, or ``error`` with the traceback. One line is appended to the job's
``progress_file`` per finished run (the parent's progress bar reads it). A process per
configuration frees all memory between rows and keeps a crash to its own row.

The worker imports nothing of :mod:`radar_vllm.vllm` but ``generate`` (no hooks): whether the
plugin (and its CPU sampling correction) is active is vLLM's choice from ``VLLM_PLUGINS``, and the
result says what happened (``radar_plugin_loaded``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from radar_vllm.bench.harness import write_json

logger = logging.getLogger(__name__)

PLUGIN_MODULE = "radar_vllm.vllm.plugin"  # imported by vLLM when it loads the radar plugin


def engine_kwargs(engine: dict[str, Any], speculative_config: dict[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` (the model aside); ``engine_args`` override the others."""
    kwargs: dict[str, Any] = {
        "max_model_len": int(engine["max_model_len"]),
        "max_num_seqs": int(engine["max_num_seqs"]),
        "seed": int(engine["seed"]),
        "dtype": engine["dtype"],
        "disable_log_stats": False,  # metrics for get_metrics()
        "enforce_eager": bool(engine.get("enforce_eager", False)),
        "generation_config": "vllm",  # sampling exactly as requested, not the model's defaults
    }
    if engine.get("inline"):
        kwargs["distributed_executor_backend"] = "uni"
    if speculative_config is not None:
        kwargs["speculative_config"] = speculative_config
    kwargs.update(engine.get("engine_args") or {})
    return kwargs


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from radar_vllm.bench.offline import run_offline_job
    from radar_vllm.offline.generate import make_llm

    engine = job["engine"]
    progress_file = Path(job["progress_file"])

    def progress() -> None:
        with open(progress_file, "a", encoding="utf-8") as handle:
            handle.write("1\n")

    started = time.perf_counter()
    llm = make_llm(engine["model"], **engine_kwargs(engine, job["config"].get("speculative_config")))
    start_seconds = time.perf_counter() - started
    plugin_loaded = PLUGIN_MODULE in sys.modules  # vLLM loads general plugins while building the engine
    result = run_offline_job(job, llm, progress)
    result["engine_start_seconds"] = start_seconds
    result["radar_plugin_loaded"] = plugin_loaded
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    job = json.loads(args.job.read_text(encoding="utf-8"))
    name = job["config"]["name"]
    try:
        result = run_job(job)
        result["error"] = None
    except BaseException as error:  # the parent reports the row as failed and goes on
        logger.error("configuration %s failed: %s", name, error)
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    result["config"] = name
    write_json(args.result, result)
    # vLLM's exit handlers stop the engine processes; the parent kills the process group if they hang.
    return 0 if result.get("error") is None else 1


if __name__ == "__main__":
    sys.exit(main())
