"""Offline measurements of one configuration in one vLLM engine (runs inside the worker subprocess).

For every workload x temperature x mode x repeat: empty the prefix cache, read the engine's
metrics, time ``LLM.generate`` (batch 1: one call per prompt; batched: one call for all prompts),
read the metrics again and keep the difference (:mod:`radar_vllm.bench.snapshots`); RADAR rows also keep
the depth gate's estimates and round counts after each run (``gate``). Greedy outputs of the
first repeat are kept (token ids) for the match check against no speculation; later repeats are
checked against the first. Sampled (T > 0) outputs of the first repeat are kept too
(``sampled_outputs``): the harness scores them after the row (:mod:`radar_vllm.bench.sample_quality`).

T > 0 requests get a per-prompt seed (``seed + prompt index``), identical for every row.
vLLM is reached through :func:`radar_vllm.offline.generate.make_llm` only; sampling parameters are
built from the class of ``LLM.get_default_sampling_params()``, so this module imports no vLLM.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

from radar_vllm.bench.configs import RADAR_KINDS
from radar_vllm.bench.settings import GREEDY, MODE_BATCH1, MODE_BATCHED, temperatures_for
from radar_vllm.bench.snapshots import (
    RADAR_ROUNDS,
    MetricSnapshot,
    snapshot_delta,
    snapshot_from_metrics,
)
from radar_vllm.bench.workloads import MTBENCH, MTBENCH_TURN2, Workload, build_second_turn, load_tokenizer

logger = logging.getLogger(__name__)

KEPT_METRIC_PREFIXES = (
    "vllm:spec_decode",
    "vllm:radar_",
    "vllm:generation_tokens",
    "vllm:prompt_tokens",
    "vllm:iteration_tokens_total",
    "vllm:num_preemptions",
)
WARMUP_PROMPTS = 2
WARMUP_TOKENS = 8


def output_key(workload: str, mode: str) -> str:
    """Key of a greedy output list: ``"mtbench|batch1"``."""
    return f"{workload}|{mode}"


def keep_relevant(snapshot: MetricSnapshot) -> MetricSnapshot:
    """Only the metrics the report reads (keeps the JSON small)."""
    def kept(name: str) -> bool:
        return name.startswith(KEPT_METRIC_PREFIXES)

    return MetricSnapshot(
        counters={k: v for k, v in snapshot.counters.items() if kept(k)},
        vectors={k: v for k, v in snapshot.vectors.items() if kept(k)},
        histograms={k: v for k, v in snapshot.histograms.items() if kept(k)},
    )


def sampled_entry(workload: str, temperature: float, mode: str, outputs: list[list[int]]) -> dict[str, Any]:
    """One cell's sampled outputs (first repeat), in prompt order from the workload's first prompt."""
    return {"workload": workload, "temperature": temperature, "mode": mode, "outputs": outputs}


def turn2_source_mode(modes: Sequence[str], num_prompts: int, batch1_prompts: int | None) -> str:
    """The mode whose greedy MT-Bench answers make turn 2: batch 1 when it covers every prompt, else batched."""
    batch1_covers = batch1_prompts is None or batch1_prompts >= num_prompts
    if MODE_BATCH1 in modes and (batch1_covers or MODE_BATCHED not in modes):
        return MODE_BATCH1
    return MODE_BATCHED if MODE_BATCHED in modes else modes[0]


class OfflineRunner:
    """Times ``LLM.generate`` on one engine; ``llm`` is a ``vllm.LLM`` (duck-typed)."""

    def __init__(self, llm: Any, max_new_tokens: int, seed: int, gate_report: bool = False) -> None:
        self.llm = llm
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.gate_report = gate_report  # record the RADAR worker's depth-gate state after each run
        self.params_class = type(llm.get_default_sampling_params())

    def sampling_params(self, temperature: float, index: int, max_tokens: int | None = None) -> Any:
        kwargs: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens or self.max_new_tokens}
        if temperature > GREEDY:
            kwargs.update(top_p=1.0, seed=self.seed + index)
        return self.params_class(**kwargs)

    def snapshot(self) -> MetricSnapshot:
        return snapshot_from_metrics(self.llm.get_metrics())

    def generate(self, prompts: Sequence[Sequence[int]], temperature: float, mode: str,
                 max_tokens: int | None = None) -> list[list[int]]:
        requests = [{"prompt_token_ids": list(ids)} for ids in prompts]
        params = [self.sampling_params(temperature, i, max_tokens) for i in range(len(requests))]
        if mode == MODE_BATCHED:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        elif mode == MODE_BATCH1:
            outputs = []
            for request, param in zip(requests, params):
                outputs.extend(self.llm.generate([request], [param], use_tqdm=False))
        else:
            raise ValueError(f"mode must be {MODE_BATCH1!r} or {MODE_BATCHED!r}, got {mode!r}")
        return [list(output.outputs[0].token_ids) for output in outputs]

    def measure(self, workload: Workload, temperature: float, mode: str, repeat: int,
                batch1_prompts: int | None = None) -> tuple[dict[str, Any], list[list[int]]]:
        """One timed run: (record, outputs). Batch 1 times the first ``batch1_prompts`` prompts (None: all)."""
        prompts = workload.prompt_ids
        if mode == MODE_BATCH1 and batch1_prompts is not None:
            prompts = prompts[:batch1_prompts]
        # Every run starts from an empty prefix cache: repeats send the same prompts, whose cached
        # blocks a no-speculation engine would reuse in full and an EAGLE engine (which recomputes
        # the last matched block for its drafter) less; real traffic does not repeat whole prompts.
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:
            reset()
        before = self.snapshot()
        started = time.perf_counter()
        outputs = self.generate(prompts, temperature, mode)
        seconds = time.perf_counter() - started
        delta = keep_relevant(snapshot_delta(self.snapshot(), before))
        record = {
            "workload": workload.name,
            "temperature": temperature,
            "mode": mode,
            "repeat": repeat,
            "num_prompts": len(prompts),
            "prompt_tokens": sum(len(ids) for ids in prompts),
            "output_tokens": sum(len(ids) for ids in outputs),
            "seconds": seconds,
            "metrics": delta.to_dict(),
        }
        if self.gate_report:  # cumulative over the engine's runs so far
            record["gate"] = self.llm.collective_rpc("radar_gate_summary")[0]
        return record, outputs


def run_offline_job(job: dict[str, Any], llm: Any, progress: Callable[[], None]) -> dict[str, Any]:
    """Every measured run of ``job`` on ``llm``; returns the worker's result (without engine info).

    ``job`` keys: workloads (list of Workload dicts), temperatures, modes, repeats,
    max_new_tokens, seed, warmup; optionally config (a BenchConfig dict: RADAR rows record the
    depth gate after each run), sampled_workloads (T > 0 only for these; empty or
    absent: all), batch1_prompts (batch 1 times the first N prompts; absent or None: all) and
    build_turn2 = {"max_prompt_tokens": N, "tokenizer": DIR} (the no-speculation run builds
    MT-Bench turn 2 from its own greedy answers).
    """
    config = job.get("config") or {}
    runner = OfflineRunner(llm, int(job["max_new_tokens"]), int(job["seed"]),
                           gate_report=config.get("kind") in RADAR_KINDS and not config.get("plugin_disabled"))
    workloads = [Workload.from_dict(w) for w in job["workloads"]]
    temperatures = [float(t) for t in job["temperatures"]]
    sampled_workloads = list(job.get("sampled_workloads") or ())
    batch1_prompts = job.get("batch1_prompts")
    modes = list(job["modes"])
    repeats = int(job["repeats"])
    if job.get("warmup", True) and workloads:
        runner.generate(workloads[0].prompt_ids[:WARMUP_PROMPTS], GREEDY, MODE_BATCHED, max_tokens=WARMUP_TOKENS)
    runs: list[dict[str, Any]] = []
    outputs: dict[str, list[list[int]]] = {}
    consistent: dict[str, bool] = {}
    sampled_outputs: list[dict[str, Any]] = []
    derived: list[dict[str, Any]] = []
    radar_seen = False
    queue = list(workloads)
    while queue:
        workload = queue.pop(0)
        for temperature in temperatures_for(temperatures, sampled_workloads, workload.name):
            for mode in modes:
                for repeat in range(repeats):
                    record, ids = runner.measure(workload, temperature, mode, repeat, batch1_prompts)
                    runs.append(record)
                    radar_seen = radar_seen or RADAR_ROUNDS in record["metrics"]["counters"]
                    if temperature == GREEDY:
                        key = output_key(workload.name, mode)
                        if repeat == 0:
                            outputs[key] = ids
                            consistent[key] = True
                        elif ids != outputs[key]:
                            consistent[key] = False
                    elif repeat == 0:
                        sampled_outputs.append(sampled_entry(workload.name, temperature, mode, ids))
                    progress()
        turn2 = job.get("build_turn2")
        if turn2 and workload.name == MTBENCH and GREEDY in temperatures:
            source_mode = turn2_source_mode(modes, workload.num_prompts, batch1_prompts)
            tokenizer = load_tokenizer(turn2["tokenizer"])
            answers = outputs[output_key(MTBENCH, source_mode)]
            second = build_second_turn(tokenizer, workload.head(len(answers)), answers,
                                       int(turn2["max_prompt_tokens"]))
            if second.num_prompts:
                derived.append(second.to_dict())
                queue.insert(0, second)
            else:
                logger.warning("no MT-Bench turn-2 prompt fits %s tokens", turn2["max_prompt_tokens"])
    return {
        "runs": runs,
        "outputs": outputs,
        "outputs_consistent": consistent,
        "sampled_outputs": sampled_outputs,
        "derived_workloads": derived,
        "radar_metrics_seen": radar_seen,
        "turn2_source": MTBENCH_TURN2 if derived else None,
    }
