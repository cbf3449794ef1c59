"""Per-step time breakdown of one engine: target forward, drafter, sampling/verification, the rest.

    python benchmarks/profile_steps.py --configs no-spec,eagle3-k1,radar-chain --batch-sizes 1,4,16 \
        --out benchmarks/results/profile_steps_smollm2

Runs every configuration in a fresh process of its own (the engine in-process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``: a second engine in one process runs with other thread
settings and times differently; ``--engine-process``: the engine core and worker in processes of
their own, as ``LLM`` starts them by default and the benchmark runs them, with Intel OpenMP
preloaded: the worker's threads are then bound to one core), one after the other, on the first
``batch_size`` MT-Bench prompts of the real SmolLM2 (greedy, ``--max-new-tokens``), ``--repeats``
times (each from an empty prefix cache), and times from inside the worker: the target model's
forward calls, the drafter's ``propose`` (depth-0 rounds included), the runner's ``_sample``
(rejection sampling when drafts are verified, tree acceptance in tree mode), and the whole
``generate`` call; "other" is what is left (scheduler, input preparation, output processing). Per
step = per engine step (target forward calls that are not warm-up). RADAR rows also report the
drafter's round counts (draft / skip / catch-up) and the depth-0 gate's per-bucket estimates.
``--ops N``: after the timed repeats of each batch size, one more run under the torch profiler
lists, per part, the N ops with the most own CPU time (matrix products, attention kernel calls,
index copies, Python in the wrapped method itself) in ms per engine step. ``--py N``: one more run
under Python's profiler in the engine core's thread (scheduler, runner, drafter: everything but the
front-end), own time per engine step summed by package (radar_vllm, vllm, torch, the rest) and the N
functions with the most own time; the profiler slows Python down, so compare rows, not absolute times.
Writes JSON and a Markdown table. Times are wall clock on a quiet machine; the machine is named in
the output.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "radar_vllm" / "checkpoints"
CONFIGS = {
    "no-spec": None,
    "eagle3-k1": {"method": "eagle3", "model": str(CHECKPOINTS / "smollm2-135m-eagle3"), "num_speculative_tokens": 1},
    "eagle3-k3": {"method": "eagle3", "model": str(CHECKPOINTS / "smollm2-135m-eagle3"), "num_speculative_tokens": 3},
    "eagle3-dynamic-k0": {"method": "eagle3", "model": str(CHECKPOINTS / "smollm2-135m-eagle3"),
                          "num_speculative_tokens": 1,  # stock Dynamic SD scheduling K = 0 at every batch size
                          "num_speculative_tokens_per_batch_size": [[1, 256, 0]]},
    "eagle3-k2": {"method": "eagle3", "model": str(CHECKPOINTS / "smollm2-135m-eagle3"), "num_speculative_tokens": 2},
    "radar-chain": {"method": "radar", "model": str(CHECKPOINTS / "smollm2-135m-radar"), "radar": {"mode": "chain"}},
    "radar-chain-skip": {"method": "radar", "model": str(CHECKPOINTS / "smollm2-135m-radar"),
                         "radar": {"mode": "chain"}},  # the gate forced to skip every round (= radar-chain-g0)
    "radar-tree": {"method": "radar", "model": str(CHECKPOINTS / "smollm2-135m-radar"), "radar": {"mode": "tree"}},
}
# Other RADAR shapes by name: radar-MODE[-tkK][-nN][-dD][-sS][-gG] (tree width K, N tree tokens with the
# root, D draft calls every round: no policy, no gate, the plugin's own cost; S scratch blocks for tree
# rows; G: the depth gate forced to cap every round at G, 0 = never draft), e.g. radar-chain-d3,
# radar-tree-tk2-n6-d3, radar-tree-tk3-n8-d3-s64, radar-tree-g1, radar-chain-g0; in tree mode G above
# the maximum depth is a smaller tree of the checkpoint's tree_sizes (radar-tree-g8: its first).
SHAPE = re.compile(r"radar-(chain|tree)(?:-tk(\d+))?(?:-n(\d+))?(?:-d(\d+))?(?:-s(\d+))?(?:-g(\d+))?")


def speculative_config(name: str) -> dict[str, Any] | None:
    """The speculative config of a named row: :data:`CONFIGS`, or a RADAR shape (:data:`SHAPE`)."""
    if name in CONFIGS:
        return CONFIGS[name]
    match = SHAPE.fullmatch(name)
    if match is None:
        raise SystemExit(f"unknown config {name!r}; choose from {sorted(CONFIGS)} or radar-MODE[-tkK][-nN][-dD][-sS]")
    mode, top_k, total, depth, scratch, _ = match.groups()
    radar: dict[str, Any] = {"mode": mode}
    if top_k:
        radar["top_k"] = int(top_k)
    if total:
        radar["total_tokens"] = int(total)
        radar["tree_sizes"] = None  # (the checkpoint's smaller trees need not be smaller than this)
    if depth:
        radar["fixed_depth"] = int(depth)
    if scratch:
        radar["scratch_blocks"] = int(scratch)
    return {"method": "radar", "model": str(CHECKPOINTS / "smollm2-135m-radar"), "radar": radar}


class Timer:
    """Wraps a bound method of an object, summing its wall time and counting calls; with ``label``
    each call is also a torch profiler range of that name."""

    def __init__(self, owner: Any, name: str, label: str | None = None) -> None:
        self.seconds = 0.0
        self.calls = 0
        inner = getattr(owner, name)
        if label is not None:
            import torch

            unlabelled = inner

            def inner(*args: Any, **kwargs: Any) -> Any:
                with torch.profiler.record_function(label):
                    return unlabelled(*args, **kwargs)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def forced_cap(name: str) -> int | None:
    """The depth cap a named row forces its gate to (``-gG``), or None."""
    if name == "radar-chain-skip":
        return 0
    match = SHAPE.fullmatch(name)
    return int(match.group(6)) if match and match.group(6) is not None else None


OP_LABEL = "profile_steps:"  # record_function labels of the timed parts (--ops)


def install_timers(worker: Any, cap: int | None, ops: bool = False) -> None:
    runner = worker.model_runner
    timers = {"target": Timer(runner.model, "forward", OP_LABEL + "target" if ops else None),
              "sample": Timer(runner, "_sample", OP_LABEL + "sample" if ops else None)}
    drafter = getattr(runner, "drafter", None)
    if drafter is not None:
        timers["draft"] = Timer(drafter, "propose", OP_LABEL + "draft" if ops else None)
        gate = getattr(drafter, "gate", None)
        if cap is not None:
            if gate is None:
                raise ValueError("a forced depth cap needs a RADAR checkpoint with skip_drafting='auto'")
            gate.decide = lambda batch_size, sampling=False: cap
    runner._profile_timers = timers


def start_op_profile(worker: Any) -> None:
    import torch

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    profiler.__enter__()
    worker.model_runner._op_profiler = profiler


def stop_op_profile(worker: Any) -> dict[str, dict[str, float]]:
    """Per timed part (target / draft / sample), the self CPU microseconds of every op inside it."""
    profiler = worker.model_runner._op_profiler
    profiler.__exit__(None, None, None)
    totals: dict[str, dict[str, float]] = {}

    def walk(event: Any, part: dict[str, float]) -> None:
        part[event.name] = part.get(event.name, 0.0) + event.self_cpu_time_total
        for child in event.cpu_children:
            walk(child, part)

    for event in profiler.events():
        if event.name.startswith(OP_LABEL):
            walk(event, totals.setdefault(event.name[len(OP_LABEL):], {}))
    return totals


def start_py_profile(worker: Any) -> None:
    import cProfile

    profiler = cProfile.Profile()
    worker.model_runner._py_profiler = profiler
    profiler.enable()


def package_of(filename: str) -> str:
    """The package a profiled function's file belongs to (radar_vllm, vllm, torch or other)."""
    for package in ("radar_vllm", "vllm", "torch"):
        if f"/{package}/" in filename:
            return package
    return "other"


def stop_py_profile(worker: Any, top: int) -> dict[str, Any]:
    """Own seconds by package, and the ``top`` functions with the most own time (seconds, calls)."""
    import pstats

    profiler = worker.model_runner._py_profiler
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, own, cumulative, callers)
    packages: dict[str, float] = {}
    for (filename, _, _), (_, _, own, _, _) in stats.items():
        package = package_of(filename)
        packages[package] = packages.get(package, 0.0) + own
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    functions = {f"{package_of(f)}:{Path(f).name}:{line}:{name}": (own, calls)
                 for (f, line, name), (calls, _, own, _, _) in ranked}
    return {"packages": packages, "functions": functions}


def read_timers(worker: Any, reset: bool) -> dict[str, Any]:
    runner = worker.model_runner
    out = {name: {"seconds": t.seconds, "calls": t.calls} for name, t in runner._profile_timers.items()}
    drafter = getattr(runner, "drafter", None)
    if drafter is not None and hasattr(drafter, "round_counts"):
        out["rounds"] = dict(drafter.round_counts)
        out["gate"] = drafter.gate.summary() if getattr(drafter, "gate", None) is not None else None
    if reset:
        for timer in runner._profile_timers.values():
            timer.reset()
        if drafter is not None and hasattr(drafter, "round_counts"):
            drafter.round_counts = {key: 0 for key in drafter.round_counts}
    return out


def profiled_run(llm: Any, requests: list[dict[str, Any]], params: Any, start: Any, stop: Any) -> tuple[Any, int]:
    """One more run of ``requests`` from an empty prefix cache between ``start(worker)`` and
    ``stop(worker)`` (called in the worker): what ``stop`` returned, and the run's engine steps."""
    llm.reset_prefix_cache()
    llm.collective_rpc(lambda worker: read_timers(worker, reset=True))
    llm.collective_rpc(start)
    llm.generate(requests, params, use_tqdm=False)
    result = llm.collective_rpc(stop)[0]
    steps = llm.collective_rpc(lambda worker: read_timers(worker, reset=False))[0]["target"]["calls"]
    return result, max(1, steps)


def profile_config(name: str, target: str, prompts: list[list[int]], batch_sizes: list[int], max_new_tokens: int,
                   repeats: int, dtype: str, block_size: int | None = None, ops: int = 0,
                   py: int = 0) -> list[dict[str, Any]]:
    from vllm import LLM, SamplingParams

    from radar_vllm.offline.generate import shutdown_engine

    llm = LLM(model=target, dtype=dtype, max_model_len=1024, max_num_seqs=max(batch_sizes), seed=0,
              speculative_config=speculative_config(name), generation_config="vllm",
              **({"block_size": block_size} if block_size else {}))
    forced = forced_cap(name)
    llm.collective_rpc(lambda worker: install_timers(worker, forced, ops=ops > 0))
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    rows = []
    try:
        llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)  # warm-up
        for batch_size in batch_sizes:
            requests = [{"prompt_token_ids": ids} for ids in prompts[:batch_size]]
            for repeat in range(repeats):
                llm.reset_prefix_cache()  # the same prompts again: no cached blocks (EAGLE engines reuse fewer)
                llm.collective_rpc(lambda worker: read_timers(worker, reset=True))
                start = time.perf_counter()
                outputs = llm.generate(requests, params, use_tqdm=False)
                wall = time.perf_counter() - start
                timers = llm.collective_rpc(lambda worker: read_timers(worker, reset=False))[0]
                tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
                steps = max(1, timers["target"]["calls"])
                parts = {key: timers[key]["seconds"] for key in ("target", "draft", "sample") if key in timers}
                rows.append({
                    "config": name, "batch_size": batch_size, "repeat": repeat, "wall_s": wall,
                    "output_tokens": tokens, "tokens_per_s": tokens / wall, "steps": steps,
                    "ms_per_step": 1000 * wall / steps,
                    "ms_per_step_parts": {**{k: 1000 * v / steps for k, v in parts.items()},
                                          "other": 1000 * (wall - sum(parts.values())) / steps},
                    "rounds": timers.get("rounds"), "gate": timers.get("gate"),
                })
                print(json.dumps({k: rows[-1][k] for k in ("config", "batch_size", "repeat", "tokens_per_s",
                                                           "ms_per_step", "rounds")}), flush=True)
            if ops:  # one more run under the profiler (slower): where each part's time goes, not its speed
                totals, steps = profiled_run(llm, requests, params, start_op_profile, stop_op_profile)
                rows[-1]["ops_ms_per_step"] = {
                    part: dict(sorted(((op, us / 1000 / steps) for op, us in by_op.items()),
                                      key=lambda item: -item[1])[:ops])
                    for part, by_op in totals.items()}
            if py:  # and one under Python's profiler: whose Python the engine thread runs
                profile, steps = profiled_run(llm, requests, params, start_py_profile,
                                              lambda worker: stop_py_profile(worker, py))
                rows[-1]["py_ms_per_step"] = {
                    "packages": {k: 1000 * v / steps for k, v in sorted(profile["packages"].items())},
                    "functions": {k: [1000 * own / steps, calls / steps]
                                  for k, (own, calls) in profile["functions"].items()}}
    finally:
        shutdown_engine(llm)
    return rows


def summarise(rows: list[dict[str, Any]], configs: list[str], batch_sizes: list[int]) -> str:
    lines = ["| batch | config | tok/s (median [min-max]) | vs no-spec | steps | ms/step | target | draft | sample | other "
             "| rounds draft/skip/catch-up |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for batch_size in batch_sizes:
        base = None
        for name in configs:
            picked = [r for r in rows if r["config"] == name and r["batch_size"] == batch_size]
            if not picked:
                continue
            rates = [r["tokens_per_s"] for r in picked]
            median = statistics.median(rates)
            if name == "no-spec":
                base = median
            mid = sorted(picked, key=lambda r: r["tokens_per_s"])[len(picked) // 2]
            parts = mid["ms_per_step_parts"]
            rounds = mid["rounds"] or {}
            lines.append(
                f"| {batch_size} | {name} | {median:.1f} [{min(rates):.1f}-{max(rates):.1f}] | "
                + (f"{median / base:.2f}x" if base else "–")
                + f" | {mid['steps']} | {mid['ms_per_step']:.1f} | {parts.get('target', 0):.1f} | "
                f"{parts.get('draft', 0):.1f} | {parts.get('sample', 0):.1f} | {parts['other']:.1f} | "
                + ("/".join(str(rounds.get(k, 0)) for k in ("draft", "skip", "catch_up")) if rounds else "–") + " |")
    profiled = [r for r in rows if r.get("ops_ms_per_step")]
    if profiled:
        lines += ["", "Where each part's time goes (one more run under the torch profiler, ms per engine step of "
                  "each op's own CPU time, the largest ops):", ""]
        for row in profiled:
            for part, by_op in row["ops_ms_per_step"].items():
                top = ", ".join(f"{op} {ms:.2f}" for op, ms in by_op.items())
                lines.append(f"- batch {row['batch_size']}, {row['config']}, {part} "
                             f"({sum(by_op.values()):.1f} ms in these ops): {top}")
    python_rows = [r for r in rows if r.get("py_ms_per_step")]
    if python_rows:
        lines += ["", "Python in the engine core's thread (one more run under Python's profiler, which slows it: "
                  "compare rows), own ms per engine step by package, then the functions with the most own time "
                  "(ms and calls per step):", ""]
        for row in python_rows:
            packages = ", ".join(f"{k} {v:.2f}" for k, v in row["py_ms_per_step"]["packages"].items())
            top = ", ".join(f"{k} {ms:.2f} ({calls:.1f})" for k, (ms, calls) in row["py_ms_per_step"]["functions"].items())
            lines.append(f"- batch {row['batch_size']}, {row['config']}: {packages}; {top}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="no-spec,radar-chain-skip,radar-chain,eagle3-k1")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--block-size", type=int, default=None,
                        help="KV cache block size (tokens; the CPU platform's default: 128)")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    parser.add_argument("--engine-process", action="store_true",
                        help="engine core and worker in their own processes (as the benchmark runs engines)")
    parser.add_argument("--ops", type=int, default=0, metavar="N",
                        help="after the timed repeats, one more run under the torch profiler per batch size: "
                             "the N ops with the most own CPU time in each part (target, draft, sample)")
    parser.add_argument("--py", type=int, default=0, metavar="N",
                        help="one more run under Python's profiler per batch size: own time of the engine core's "
                             "thread by package and its N most expensive functions")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child: one config
    args = parser.parse_args()
    from radar_vllm.bench.harness import preload_intel_openmp
    from radar_vllm.bench.workloads import MTBENCH, load_tokenizer, load_workload
    from radar_vllm.offline.assets import smollm2_dir

    configs = args.configs.split(",")
    for name in configs:
        speculative_config(name)  # unknown names fail here, before any engine starts
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    target = str(smollm2_dir())
    workload = load_workload(MTBENCH, load_tokenizer(target), max(batch_sizes), 512)
    if args.one:
        rows = profile_config(configs[0], target, workload.prompt_ids, batch_sizes, args.max_new_tokens, args.repeats,
                              args.dtype, args.block_size, args.ops, args.py)
        args.out.with_suffix(".json").write_text(json.dumps(rows))
        return
    rows = []
    for name in configs:
        part = args.out.parent / f".{args.out.name}-{name}"
        command = [sys.executable, __file__, "--one", "--configs", name, "--batch-sizes", args.batch_sizes,
                   "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats), "--dtype", args.dtype,
                   "--out", str(part), "--ops", str(args.ops), "--py", str(args.py)] + (
                       ["--block-size", str(args.block_size)] if args.block_size else [])
        env = dict(os.environ)
        if args.engine_process:
            env.update(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # timers via lambdas
                       VLLM_DISABLE_COMPILE_CACHE="1")
            preload_intel_openmp(env)
        subprocess.run(command, check=True, env=env)
        rows += json.loads(part.with_suffix(".json").read_text())
        part.with_suffix(".json").unlink()
    table = summarise(rows, configs, batch_sizes)
    from radar_vllm.core.costs import describe_machine

    described = describe_machine()
    machine = (f"{described['cpu_model']}, {described['num_cpus']} logical CPUs, "
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "args": vars(args) | {"out": str(args.out)},
                                                         "rows": rows}, indent=1) + "\n")
    header = (f"# Per-step profile ({args.dtype}, MT-Bench, greedy, {args.max_new_tokens} new tokens, ignore_eos, "
              f"{args.repeats} repeats; {machine})\n\nCommand: `python benchmarks/profile_steps.py "
              f"--configs {args.configs} --batch-sizes {args.batch_sizes} --max-new-tokens {args.max_new_tokens} "
              f"--repeats {args.repeats} --dtype {args.dtype} --out {args.out}"
              f"{f' --block-size {args.block_size}' if args.block_size else ''}"
              f"{' --engine-process' if args.engine_process else ''}{f' --ops {args.ops}' if args.ops else ''}{f' --py {args.py}' if args.py else ''}`\n\n"
              "ms/step parts: target = the target model's forward, draft = the drafter's propose (depth-0 rounds "
              "included), sample = the runner's _sample (rejection sampling / tree acceptance), other = the rest "
              "(scheduler, input preparation, output processing). Row = the median-throughput repeat.\n\n")
    args.out.with_suffix(".md").write_text(header + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
