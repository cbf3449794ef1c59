"""Every row's engine loaded at once and the rows run in turn on each prompt (batch 1) or batch.

``python benchmarks/interleaved.py --out benchmarks/results/interleaved_b1_amd_smollm2``
``python benchmarks/interleaved.py --mode batched --configs no-spec,radar-chain,radar-tree --repeats 3 --out ...``

The report preset runs one engine at a time: a row's cells take a few minutes, and the next
row's the same cells minutes later. On a machine whose speed drifts by 10-30% within
minutes (a shared VM), rows a few percent apart then swap places from one run to the next (in
one report, stock EAGLE-3 + Dynamic SD, which runs K = 3 at batch 1 as the K = 3 row does, ran
8-13% slower than that row). Here every row's engine is started first, each in its own process
with the engine in-process (an idle engine then waits on its pipe and takes no CPU), and the
rows answer each prompt (``--mode batch1``) or each workload's batch (``--mode batched``: its
prompts in one call) in turn, back to back, in an order that rotates from one to the next: every
row's run sees the machine within a minute of every other row's. A cell's speed is its output
tokens over its seconds (ratio of sums over prompts and repeats); a ratio's range is the spread
over repeats. Greedy outputs are compared with no speculation's, prompt by prompt.

The prompts are the report preset's (16 chosen evenly from each workload; batch 1 times the first
``--prompts``, 4 by default, batched all 16), greedy and T = 1 (top-p 1, seed = the prompt's
index), up to 128 new tokens, float32, 32-token KV blocks, 16 sequences at most, as the report's
engines. Engines differ from the report's in running in-process (``--engine-inline`` there), for
every row alike. Each engine holds about 3 GB (batch 1, 1 GB of KV cache).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
READY = "READY"


# ----------------------------------------------------------------------------------- engine side
def serve_engine(spec_path: str) -> int:
    """One engine: read requests as JSON lines on stdin, answer each with one JSON line."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    from radar_vllm.bench.engine_process import engine_kwargs
    from radar_vllm.bench.snapshots import NUM_ACCEPTED_TOKENS, NUM_DRAFTS, snapshot_delta, snapshot_from_metrics
    from radar_vllm.offline.generate import make_llm

    llm = make_llm(spec["engine"]["model"], **engine_kwargs(spec["engine"], spec["speculative_config"]))
    params_class = type(llm.get_default_sampling_params())

    def params(request: dict[str, Any], seed: int) -> Any:
        kwargs: dict[str, Any] = {"temperature": request["temperature"], "max_tokens": request["max_tokens"]}
        if request["temperature"] > 0:
            kwargs.update(top_p=1.0, seed=seed)
        return params_class(**kwargs)

    def run(request: dict[str, Any]) -> dict[str, Any]:
        """The request's prompts in one call (one prompt: batch 1)."""
        prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
        sampling = [params(request, seed) for seed in request["seeds"]]
        llm.reset_prefix_cache()  # as the report's runs: real traffic does not repeat whole prompts
        before = snapshot_from_metrics(llm.get_metrics())
        start = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
        delta = snapshot_delta(snapshot_from_metrics(llm.get_metrics()), before)
        return {"outputs": [list(output.outputs[0].token_ids) for output in outputs], "seconds": seconds,
                "counters": {name: delta.counter(name) for name in (NUM_DRAFTS, NUM_ACCEPTED_TOKENS)}}

    run({"prompts": [[1, 2, 3, 4]], "seeds": [0], "temperature": 0.0, "max_tokens": 8})  # warm-up
    print(READY, flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run(json.loads(line))), flush=True)
    return 0


class Engine:
    """A row's engine process (``--engine``), asked one prompt or batch at a time."""

    def __init__(self, name: str, spec: dict[str, Any], env: dict[str, str], work_dir: Path) -> None:
        self.name = name
        spec_path = work_dir / f"{name}.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        self.log = open(work_dir / f"{name}.log", "w", encoding="utf-8")
        self.process = subprocess.Popen([sys.executable, __file__, "--engine", str(spec_path)], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._expect(READY)

    def _expect(self, word: str) -> None:
        for line in self.process.stdout:
            if line.strip() == word:
                return
        raise RuntimeError(f"{self.name}: the engine exited before {word} (see {self.log.name})")

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.name}: the engine exited (see {self.log.name})")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


# ----------------------------------------------------------------------------------- driver side
def rows(args: argparse.Namespace, work_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any] | None], Any]:
    """(engine settings, speculative config per row, the benchmark settings) as the report starts them."""
    from radar_vllm.bench.configs import build_configs
    from radar_vllm.bench.harness import engine_spec, prepare_models
    from radar_vllm.bench.settings import BenchSettings

    settings = BenchSettings(target=args.target, radar_checkpoint=args.checkpoint, max_new_tokens=args.max_new_tokens,
                             dtype="float32", kv_cache_gb=args.kv_cache_gb, engine_inline=True,
                             k_list=tuple(sorted({int(n[len("eagle3-k"):]) for n in args.configs
                                                  if n.startswith("eagle3-k")})),
                             include_static_tree=False, confidence_threshold=None, include_dynamic_sd=False)
    models = prepare_models(settings, work_dir)
    configs = build_configs(head=models.head, radar_checkpoint=models.radar_checkpoint, k_list=settings.k_list,
                            include_static_tree=False, only=args.configs)
    engine = engine_spec(settings, models, max_num_seqs=16)
    return engine, {c.name: c.speculative_config() for c in configs if c.name in args.configs}, settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--configs", default="no-spec,eagle3-k2,eagle3-k3,eagle3-k4,radar-chain,radar-tree")
    parser.add_argument("--workloads", default="mtbench,humaneval,sharegpt")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--mode", choices=("batch1", "batched"), default="batch1")
    parser.add_argument("--prompts", type=int, default=None,
                        help="prompts per workload (of 16 chosen evenly; default 4 at batch 1, 16 batched)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv-cache-gb", type=int, default=1)
    parser.add_argument("--target", default=None, help="HF folder of SmolLM2-135M-Instruct (default: the asset cache)")
    parser.add_argument("--checkpoint", default=str(ROOT / "radar_vllm" / "checkpoints" / "smollm2-135m-radar"))
    parser.add_argument("--work-dir", default="/tmp/radar_interleaved_b1")
    parser.add_argument("--out", required=False, help="output stem (.json and .md)")
    args = parser.parse_args(argv)
    if args.engine:
        return serve_engine(args.engine)
    if not args.out:
        parser.error("--out is required")
    from tqdm import tqdm

    from radar_vllm.bench.harness import subprocess_env
    from radar_vllm.bench.workloads import load_tokenizer, load_workload
    from radar_vllm.offline.assets import smollm2_dir

    args.configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    if "no-spec" not in args.configs:
        args.configs.insert(0, "no-spec")
    args.target = str(Path(args.target or smollm2_dir()).resolve())
    if args.prompts is None:
        args.prompts = 4 if args.mode == "batch1" else 16
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    engine, speculative, settings = rows(args, work_dir)
    env = subprocess_env(settings)  # (engine_inline: in-process engines)
    tokenizer = load_tokenizer(args.target)
    workloads = {name: load_workload(name, tokenizer, 16, settings.max_prompt_tokens).prompt_ids[: args.prompts]
                 for name in args.workloads.split(",")}
    temperatures = [float(t) for t in args.temperatures.split(",")]
    started = time.time()
    engines: dict[str, Engine] = {}
    try:
        for name in args.configs:
            print(f"starting {name} ...", flush=True)
            engines[name] = Engine(name, {"engine": engine, "speculative_config": speculative[name]}, env, work_dir)
        records: list[dict[str, Any]] = []
        per_call = 1 if args.mode == "batch1" else args.prompts  # prompts sent in one call
        blocks = [(r, w, t, i) for r in range(args.repeats) for w in workloads for t in temperatures
                  for i in range(0, len(workloads[w]), per_call)]
        with tqdm(total=len(blocks) * len(args.configs), desc="interleaved", unit="run") as bar:
            for number, (repeat, workload, temperature, index) in enumerate(blocks):
                shift = number % len(args.configs)  # each row first as often as the others
                for name in args.configs[shift:] + args.configs[:shift]:
                    prompts = workloads[workload][index:index + per_call]
                    answer = engines[name].ask({"prompts": prompts, "seeds": list(range(index, index + len(prompts))),
                                                "temperature": temperature, "max_tokens": args.max_new_tokens})
                    records.append({"config": name, "repeat": repeat, "workload": workload,
                                    "temperature": temperature, "prompt": index, **answer})
                    bar.update(1)
    finally:
        for item in engines.values():
            item.close()
    document = summarize(records, args, started)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(document), encoding="utf-8")
    print(markdown(document))
    return 0


def _tokens(records: list[dict[str, Any]]) -> int:
    return sum(len(output) for r in records for output in r["outputs"])


def _rate(records: list[dict[str, Any]]) -> float:
    return _tokens(records) / sum(r["seconds"] for r in records)


def summarize(records: list[dict[str, Any]], args: argparse.Namespace, started: float) -> dict[str, Any]:
    """Per cell (workload, temperature): every row's tok/s and its ratios to no speculation and to
    the best stock row, each with the range over repeats."""
    from radar_vllm.bench.snapshots import NUM_ACCEPTED_TOKENS, NUM_DRAFTS
    from radar_vllm.core.costs import describe_machine

    cells = []
    for workload in dict.fromkeys(r["workload"] for r in records):
        for temperature in dict.fromkeys(r["temperature"] for r in records):
            mine = [r for r in records if r["workload"] == workload and r["temperature"] == temperature]
            by_row = {name: [r for r in mine if r["config"] == name] for name in args.configs}
            repeats = sorted({r["repeat"] for r in mine})
            rate = {name: _rate(rs) for name, rs in by_row.items()}
            per_repeat = {name: [_rate([r for r in rs if r["repeat"] == k]) for k in repeats]
                          for name, rs in by_row.items()}
            stock = [name for name in args.configs if name.startswith("eagle3-")]
            best = max(stock, key=lambda name: rate[name]) if stock else None
            reference = {(r["prompt"], r["repeat"]): r["outputs"] for r in by_row["no-spec"]}
            entry: dict[str, Any] = {"workload": workload, "temperature": temperature, "best_stock": best, "rows": {}}
            for name, rs in by_row.items():
                drafts = sum(r["counters"].get(NUM_DRAFTS, 0.0) for r in rs)
                accepted = sum(r["counters"].get(NUM_ACCEPTED_TOKENS, 0.0) for r in rs)
                row = {"tokens_per_s": rate[name], "tokens_per_s_by_repeat": per_repeat[name],
                       "vs_no_spec": rate[name] / rate["no-spec"],
                       "vs_no_spec_by_repeat": [a / b for a, b in zip(per_repeat[name], per_repeat["no-spec"])],
                       "acceptance_length": 1.0 + accepted / drafts if drafts else None,
                       "tokens": _tokens(rs), "seconds": sum(r["seconds"] for r in rs)}
                if best is not None:
                    row["vs_best_stock"] = rate[name] / rate[best]
                    row["vs_best_stock_by_repeat"] = [a / b for a, b in zip(per_repeat[name], per_repeat[best])]
                if temperature == 0.0:
                    row["greedy_match"] = sum(mine == theirs for r in rs
                                              for mine, theirs in zip(r["outputs"], reference[(r["prompt"], r["repeat"])]))
                    row["greedy_outputs"] = sum(len(r["outputs"]) for r in rs)
                entry["rows"][name] = row
            cells.append(entry)
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_seconds": time.time() - started,
            "machine": describe_machine(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "settings": {"mode": args.mode, "configs": args.configs, "prompts": args.prompts,
                         "max_new_tokens": args.max_new_tokens,
                         "repeats": args.repeats, "kv_cache_gb": args.kv_cache_gb},
            "cells": cells, "records": [dict({k: v for k, v in r.items() if k != "outputs"},
                                             num_tokens=[len(output) for output in r["outputs"]]) for r in records]}


def markdown(document: dict[str, Any]) -> str:
    def ratio(row: dict[str, Any], key: str) -> str:
        values = row.get(f"{key}_by_repeat") or []
        spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
        return f"{row[key]:.2f}x{spread}" if key in row else "–"

    machine = document["machine"]
    what = "Batch 1, rows interleaved prompt by prompt" if document["settings"].get("mode", "batch1") == "batch1" \
        else "Batched, rows interleaved batch by batch"
    lines = [f"# {what} ({machine.get('cpu_model')}, "
             f"{machine.get('num_cpus')} logical CPUs, {document['created']})", "",
             f"Command: `python benchmarks/{document['command']}`; {document['wall_seconds'] / 60:.0f} min.", "",
             "tok/s = output tokens / seconds over the cell's prompts and repeats; ratios of those, range over "
             "repeats in parentheses; best stock = the fastest eagle3-kK row of the cell.", ""]
    for cell in document["cells"]:
        lines += [f"## {cell['workload']}, T={cell['temperature']:g} (best stock: {cell['best_stock']})", "",
                  "| config | tok/s | vs no-spec | vs best stock | accept len | greedy match |",
                  "|---|---|---|---|---|---|"]
        for name, row in cell["rows"].items():
            accept = f"{row['acceptance_length']:.2f}" if row["acceptance_length"] else "–"
            match = f"{row['greedy_match']}/{row['greedy_outputs']}" if "greedy_match" in row else "–"
            lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {ratio(row, 'vs_no_spec')} | "
                         f"{ratio(row, 'vs_best_stock')} | {accept} | {match} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
