"""The benchmark on the plain PyTorch reference decoder (where vLLM is not installed, e.g. a GPU box).

Batch 1 only (the reference decoder's scope), offline only. The rows are the same as with vLLM:

- no-spec: a plain KV-cache decode loop of the HF target;
- eagle3-kK: chain of K drafted tokens per round (``FixedDepth(K)``);
- radar-chain / confidence-chain: chain with the stop policy (``PolicyStop``);
- radar-chain-dD: chain of D drafted tokens per round, no policy (``FixedDepth(D)``);
- radar-tree: the dynamic tree (top_k, max_depth, total_tokens of the checkpoint) with the policy;
- static-tree: the same tree at full depth (``FixedDepth(max_depth)``, no policy at all).

Each run yields the same record as a vLLM run, with the counters vLLM would have counted written
under vLLM's metric names (:mod:`radar_vllm.bench.snapshots`), so one report serves both. Runs
are interleaved (repeat, workload, temperature, then configuration), so when ``deadline`` passes
every row has had the same share of the time; the rest is reported as cut.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from radar_vllm.bench.configs import (
    KIND_CONFIDENCE,
    KIND_EAGLE3,
    KIND_NONE,
    KIND_RADAR,
    KIND_STATIC,
    BenchConfig,
    radar_config_of,
)
from radar_vllm.bench.offline import output_key, sampled_entry
from radar_vllm.bench.settings import GREEDY, MODE_BATCH1, temperatures_for
from radar_vllm.bench.snapshots import (
    ACCEPTED_PER_POSITION,
    GENERATION_TOKENS,
    ITERATION_TOKENS,
    NUM_ACCEPTED_TOKENS,
    NUM_DRAFT_TOKENS,
    NUM_DRAFTS,
    RADAR_DRAFT_CALLS,
    RADAR_ROUNDS,
    RADAR_STOP_DEPTH,
    RADAR_TREE_SIZE,
    Histogram,
    MetricSnapshot,
    merge_snapshots,
)
from radar_vllm.bench.workloads import MTBENCH, Workload, build_second_turn
from radar_vllm.core.config import MODE_CHAIN, MODE_TREE

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cumulative_histogram(values: Sequence[int], bounds: Sequence[int]) -> Histogram:
    """Prometheus-style histogram of integer ``values`` with ``le`` buckets ``bounds`` (+Inf)."""
    buckets = {repr(float(b)): float(sum(1 for v in values if v <= b)) for b in bounds}
    buckets["+Inf"] = float(len(values))
    return Histogram(count=float(len(values)), sum=float(sum(values)), buckets=buckets)


def round_counters(tokens: int, draft_calls: Sequence[int], accepted: Sequence[int],
                   tree_sizes: Sequence[int], max_depth: int, max_nodes: int) -> MetricSnapshot:
    """The counters vLLM would report for one request decoded in these rounds.

    Target passes = 1 prefill + one verify pass per round. Histogram bounds are fixed (1..max)
    so that histograms of different requests add up bucket by bucket.
    """
    rounds = len(draft_calls)
    snapshot = MetricSnapshot()
    snapshot.counters[GENERATION_TOKENS] = float(tokens)
    snapshot.histograms[ITERATION_TOKENS] = Histogram(count=float(1 + rounds))
    if rounds:
        snapshot.counters[NUM_DRAFTS] = float(rounds)
        snapshot.counters[NUM_DRAFT_TOKENS] = float(sum(tree_sizes))
        snapshot.counters[NUM_ACCEPTED_TOKENS] = float(sum(accepted))
        snapshot.counters[RADAR_DRAFT_CALLS] = float(sum(draft_calls))
        snapshot.counters[RADAR_ROUNDS] = float(rounds)
        # rounds that accepted at least i + 1 tokens, as vLLM counts them per draft position
        snapshot.vectors[ACCEPTED_PER_POSITION] = [float(sum(1 for a in accepted if a > i)) for i in range(max_depth)]
        depth_bounds = list(range(1, max_depth + 1))
        snapshot.histograms[RADAR_STOP_DEPTH] = cumulative_histogram(draft_calls, depth_bounds)
        snapshot.histograms[RADAR_TREE_SIZE] = cumulative_histogram(tree_sizes, list(range(1, max_nodes + 1)))
    return snapshot


def add_snapshot(total: MetricSnapshot, part: MetricSnapshot) -> None:
    """``total += part`` in place."""
    merged = merge_snapshots([total, part])
    total.counters, total.vectors, total.histograms = merged.counters, merged.vectors, merged.histograms


@torch.no_grad()
def autoregressive(model: Any, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float,
                   generator: torch.Generator | None, eos_token_id: int | None) -> list[int]:
    """Target-only decoding with a KV cache (the no-speculation row)."""
    from transformers import DynamicCache

    from radar_vllm.core.verify import shape_probs

    device = next(model.parameters()).device
    cache = DynamicCache()
    ids = torch.tensor([list(prompt_ids)], device=device)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].float()
        if temperature <= GREEDY:
            token = int(logits.argmax())
        else:
            probs = shape_probs(logits[None], temperature)[0]
            token = int(torch.multinomial(probs, 1, generator=generator))
        tokens.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        ids = torch.tensor([[token]], device=device)
    return tokens


@dataclass
class ReferenceRow:
    """A configuration made runnable on the reference decoder."""

    config: BenchConfig
    decoder: Any  # ReferenceDecoder, None for no-spec
    make_rule: Callable[[], Any] | None
    tree_nodes: Callable[[int], int]  # draft calls -> nodes verified
    max_depth: int
    max_nodes: int


def _tree_config(mode: str, top_k: int, max_depth: int, total_tokens: int) -> Any:
    """The reference decoder's tree shape: the checkpoint's tree, or a chain (top_k 1, depth nodes)."""
    from radar_vllm.core.config import TreeConfig

    if mode == MODE_TREE:
        return TreeConfig(top_k=top_k, max_depth=max_depth, total_tokens=total_tokens)
    return TreeConfig(top_k=1, max_depth=max_depth, total_tokens=max_depth + 1)


def build_rows(configs: Sequence[BenchConfig], target: Any, head: Any, device: torch.device,
               confidence_threshold: float | None) -> list[ReferenceRow]:
    from radar_vllm.bench.confidence import make_confidence_policy
    from radar_vllm.core.policy import load_policy
    from radar_vllm.offline.reference.decoder import FixedDepth, PolicyStop, ReferenceDecoder

    rows: list[ReferenceRow] = []
    for config in configs:
        if config.kind == KIND_NONE:
            rows.append(ReferenceRow(config, None, None, lambda calls: 0, 0, 0))
            continue
        if config.kind == KIND_EAGLE3:
            depth = int(config.max_depth or config.num_speculative_tokens)
            tree = _tree_config(MODE_CHAIN, 1, depth, depth + 1)
            decoder = ReferenceDecoder(target, head, tree, chain_state_size=1)
            rows.append(ReferenceRow(config, decoder, lambda d=depth: FixedDepth(d), lambda calls: calls, depth, depth))
            continue
        radar = radar_config_of(str(config.draft_model), config.radar_overrides)
        tree = _tree_config(radar.mode, radar.top_k, radar.max_depth, radar.total_tokens)
        chain_state = radar.top_k if radar.mode != MODE_TREE else None
        decoder = ReferenceDecoder(target, head, tree, chain_state_size=chain_state)
        if radar.mode == MODE_TREE:
            def nodes(calls: int, tree=tree) -> int:
                return min(tree.max_nodes, tree.num_candidates_at_depth(max(calls, 1)))
        else:
            def nodes(calls: int) -> int:
                return calls
        if config.kind == KIND_STATIC or radar.fixed_depth is not None:
            rule_factory = (lambda d=radar.fixed_depth or radar.max_depth: FixedDepth(d))
        elif config.kind == KIND_CONFIDENCE:
            if confidence_threshold is None:
                raise ValueError("the confidence row needs confidence_threshold")
            policy = make_confidence_policy(confidence_threshold, radar.top_k).to(device)
            rule_factory = (lambda p=policy: PolicyStop(p))
        elif config.kind == KIND_RADAR:
            policy = load_policy(radar.policy_path(str(config.draft_model)), device=device)
            rule_factory = (lambda p=policy, r=radar: PolicyStop(p, decision=r.decision, threshold=r.threshold))
        else:
            raise ValueError(f"unknown configuration kind {config.kind!r}")
        rows.append(ReferenceRow(config, decoder, rule_factory, nodes, radar.max_depth, tree.max_nodes))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(row: ReferenceRow, model: Any, workload: Workload, temperature: float, repeat: int,
            max_new_tokens: int, seed: int, eos_token_id: int | None, device: torch.device
            ) -> tuple[dict[str, Any], list[list[int]]]:
    """One timed batch-1 pass over the workload's prompts with one row."""
    totals = MetricSnapshot()
    outputs: list[list[int]] = []
    seconds = 0.0
    for index, prompt in enumerate(workload.prompt_ids):
        generator = torch.Generator(device=device).manual_seed(seed + index) if temperature > GREEDY else None
        _sync(device)
        started = time.perf_counter()
        if row.decoder is None:
            tokens = autoregressive(model, prompt, max_new_tokens, temperature, generator, eos_token_id)
            _sync(device)
            seconds += time.perf_counter() - started
            part = MetricSnapshot(counters={GENERATION_TOKENS: float(len(tokens))},
                                  histograms={ITERATION_TOKENS: Histogram(count=float(len(tokens)))})
        else:
            result = row.decoder.generate(prompt, max_new_tokens, row.make_rule(), temperature=temperature,
                                          generator=generator, eos_token_id=eos_token_id)
            _sync(device)
            seconds += time.perf_counter() - started
            tokens = result.tokens
            part = round_counters(len(tokens), result.draft_calls, result.accepted,
                                  [row.tree_nodes(c) for c in result.draft_calls], row.max_depth, row.max_nodes)
        add_snapshot(totals, part)
        outputs.append(list(tokens))
    record = {
        "workload": workload.name,
        "temperature": temperature,
        "mode": MODE_BATCH1,
        "repeat": repeat,
        "num_prompts": workload.num_prompts,
        "prompt_tokens": workload.num_prompt_tokens,
        "output_tokens": sum(len(o) for o in outputs),
        "seconds": seconds,
        "metrics": totals.to_dict(),
    }
    return record, outputs


def _eos_id(model: Any) -> int | None:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        return int(eos[0]) if eos else None
    return None if eos is None else int(eos)


def run_reference_benchmark(
    *,
    configs: Sequence[BenchConfig],
    target_dir: str,
    head_dir: str,
    workloads: list[Workload],
    temperatures: Sequence[float],
    repeats: int,
    max_new_tokens: int,
    seed: int,
    dtype: str,
    device: str | None,
    confidence_threshold: float | None,
    tokenizer: Any,
    turn2_max_prompt_tokens: int | None,
    deadline: float | None,
    progress: Callable[[], None],
    sampled_workloads: Sequence[str] = (),
) -> tuple[dict[str, dict[str, Any]], list[Workload], list[str]]:
    """All rows on the reference decoder: (results by row name, workloads incl. turn 2, notes)."""
    from radar_vllm.offline.reference.runners import load_head, load_target

    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    started = time.perf_counter()
    model = load_target(target_dir, dtype=DTYPES[dtype], device=torch_device)
    head = load_head(head_dir, model, dtype=DTYPES[dtype], device=torch_device)
    rows = build_rows([c for c in configs if not c.skipped], model, head, torch_device, confidence_threshold)
    load_seconds = time.perf_counter() - started
    eos = _eos_id(model)
    notes = [f"reference decoder (plain PyTorch, batch 1) on {torch_device.type}"
             f"{' (' + torch.cuda.get_device_name(torch_device) + ')' if torch_device.type == 'cuda' else ''}"]
    results: dict[str, dict[str, Any]] = {
        row.config.name: {"config": row.config.name, "runs": [], "outputs": {}, "outputs_consistent": {},
                          "sampled_outputs": [], "engine_start_seconds": load_seconds, "error": None}
        for row in rows
    }
    workloads = list(workloads)
    done: set[tuple[str, str, float, int]] = set()

    def record(row: ReferenceRow, workload: Workload, temperature: float, repeat: int) -> list[list[int]]:
        entry = results[row.config.name]
        run, outputs = run_one(row, model, workload, temperature, repeat, max_new_tokens, seed, eos, torch_device)
        entry["runs"].append(run)
        if temperature == GREEDY:
            key = output_key(workload.name, MODE_BATCH1)
            if repeat == 0:
                entry["outputs"][key] = outputs
                entry["outputs_consistent"][key] = True
            elif outputs != entry["outputs"].get(key):
                entry["outputs_consistent"][key] = False
        elif repeat == 0:
            entry["sampled_outputs"].append(sampled_entry(workload.name, temperature, MODE_BATCH1, outputs))
        done.add((row.config.name, workload.name, temperature, repeat))
        progress()
        return outputs

    no_spec = next((row for row in rows if row.config.kind == KIND_NONE), None)
    mtbench = next((w for w in workloads if w.name == MTBENCH), None)
    if turn2_max_prompt_tokens and no_spec is not None and mtbench is not None and GREEDY in temperatures:
        answers = record(no_spec, mtbench, GREEDY, 0)
        second = build_second_turn(tokenizer, mtbench, answers, turn2_max_prompt_tokens)
        if second.num_prompts:
            workloads.insert(workloads.index(mtbench) + 1, second)
    cut = 0
    for repeat in range(repeats):
        for workload in workloads:
            for temperature in temperatures_for(temperatures, sampled_workloads, workload.name):
                for row in rows:
                    if (row.config.name, workload.name, temperature, repeat) in done:
                        continue
                    if deadline is not None and time.perf_counter() > deadline:
                        cut += 1
                        continue
                    record(row, workload, temperature, repeat)
    if cut:
        notes.append(f"time budget reached: {cut} run(s) not started (fewer repeats for some cells)")
    return results, workloads, notes
