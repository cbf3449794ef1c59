"""RADAR draft trees verified inside stock vLLM (CPU build): greedy outputs equal no speculation.

bf16 tiny models (near-ties are likely, which is what exactness is about). Engines run in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the tests can read the runner's tree counters and make
sure trees, path recomputation and compaction really ran. Four engines per module:

- baseline, no speculation (block size 32, max_model_len 256);
- the tree drafter of the tiny EAGLE-3 head with a random stop policy (varied depths), batch
  sizes 1, 4 and 16, rows recomputed over scratch KV blocks (``RADAR_TREE_SCRATCH_BLOCKS``);
- the test oracle drafter (random tree shapes with the true tokens planted, see
  ``radar_vllm.vllm.tree_oracle``) with prefix caching off (like every other engine here, rows
  recomputed in the requests' own slots, the default);
- a RADAR checkpoint run through the plugin with ``"mode": "tree"`` set at launch;
- EAGLE-2 frontier drafting with top_k = 1 against the one-row spine drafter (identical drafts);
- the oracle with chunked prefill (64-token budget), prefix caching on with a second turn reusing
  blocks written by tree steps, and a KV cache small enough to preempt and resume requests.

Prompts: 24 of mixed lengths (token ids) with different output lengths, so requests finish
mid-batch, plus one prompt whose output reaches max_model_len (its trees are cut by the scheduler).
"""
from __future__ import annotations

import json
import os
import random

import pytest

from tiny_models import make_tiny_llama, make_tiny_radar_checkpoint, scoped_environment, shutdown_engine
from radar_vllm.vllm.scratch import SCRATCH_ENV

vllm = pytest.importorskip("vllm")

MAX_MODEL_LEN = 256
NUM_PROMPTS = 24
NUM_NODES = 9  # num_speculative_tokens: the tree's node budget
TREE = '{"top_k": 3, "max_depth": 5}'
TREE_WORKER = "radar_vllm.vllm.tree_runner.RadarTreeCPUWorker"
RADAR_SCHEDULER = "radar_vllm.vllm.scheduler.RadarScheduler"
ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "RADAR_TREE": TREE,
}


@pytest.fixture(scope="module", autouse=True)
def engine_environment():
    with scoped_environment(ENV, also_restore=("RADAR_TREE_ORACLE", SCRATCH_ENV)):
        yield


def _requests() -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens): mixed lengths; the last one ends at max_model_len."""
    rng = random.Random(7)
    requests = []
    for i in range(NUM_PROMPTS):
        length = 1 + (i * 13) % 70
        requests.append(([rng.randrange(3, 500) for _ in range(length)], 8 + (i * 5) % 33))
    long_prompt = [rng.randrange(3, 500) for _ in range(MAX_MODEL_LEN - 21)]
    requests.append((long_prompt, 21))
    return requests


def _generate(llm, requests, batch_size: int | None = None) -> list[list[int]]:
    outputs: list[list[int]] = []
    step = batch_size or len(requests)
    for start in range(0, len(requests), step):
        chunk = requests[start : start + step]
        prompts = [{"prompt_token_ids": ids} for ids, _ in chunk]
        params = [vllm.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in chunk]
        outputs += [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    return outputs


def _mixed_batch(llm, requests) -> list[list[int]]:
    """8 tree requests and 4 that need the stock sampler (penalty, logprobs) in one batch."""
    chunk = requests[:12]
    params = []
    for i, (_, max_tokens) in enumerate(chunk):
        extra = {}
        if i >= 8:
            extra = {"repetition_penalty": 1.3} if i % 2 else {"logprobs": 2}
        params.append(vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra))
    prompts = [{"prompt_token_ids": ids} for ids, _ in chunk]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def _second_turn(requests, outputs) -> list[tuple[list[int], int]]:
    """Continue the first 8 conversations: earlier prompt + its output + a few new tokens."""
    return [(ids + out + [11, 12, 13], 12) for (ids, _), out in list(zip(requests, outputs))[:8]]


def _engine(target, **kwargs):
    return vllm.LLM(
        model=str(target), dtype="bfloat16", max_model_len=MAX_MODEL_LEN, block_size=32,
        enforce_eager=True, seed=0, **kwargs,
    )


def _tree_engine(target, head, **kwargs):
    return _engine(
        target,
        speculative_config={"method": "eagle3", "model": str(head), "num_speculative_tokens": NUM_NODES},
        worker_cls=TREE_WORKER,
        scheduler_cls=RADAR_SCHEDULER,
        **kwargs,
    )



def _tree_stats(llm) -> dict:
    return llm.collective_rpc(lambda worker: dict(worker.model_runner.tree_stats))[0]


def _preemptions(llm) -> float:
    return sum(float(getattr(m, "value", 0) or 0) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree_greedy")
    target = make_tiny_llama(root / "target")
    # head + a random stop policy calibrated on the head's draft distributions (varied depths)
    checkpoint = make_tiny_radar_checkpoint(root / "ckpt", target, top_k=3, max_depth=5)
    return target, root / "ckpt" / "head", root / "ckpt" / "policy", checkpoint


@pytest.fixture(scope="module")
def baseline(models):
    target = models[0]
    llm = _engine(target, max_num_seqs=16)
    requests = _requests()
    outputs = _generate(llm, requests)
    turn2 = _second_turn(requests, outputs)
    outputs2 = _generate(llm, turn2)
    mixed = _mixed_batch(llm, requests)
    shutdown_engine(llm)
    return requests, outputs, turn2, outputs2, mixed


def _assert_same(expected, actual, label):
    mismatched = [i for i, (a, b) in enumerate(zip(expected, actual)) if a != b]
    assert len(expected) == len(actual)
    assert not mismatched, f"{label}: outputs differ for requests {mismatched}: {expected[mismatched[0]]} vs {actual[mismatched[0]]}"


def test_policy_trees_batch_sizes_1_4_16(models, baseline):
    """The tiny head's trees, depth per request chosen by a random stop policy."""
    target, head, policy, _ = models
    requests, expected = baseline[:2]
    os.environ["RADAR_TREE"] = json.dumps({"top_k": 3, "max_depth": 5, "policy": str(policy)})
    os.environ[SCRATCH_ENV] = "64"  # rows recomputed over scratch blocks (opt-in)
    try:
        llm = _tree_engine(target, head, max_num_seqs=16)
    finally:
        os.environ["RADAR_TREE"] = TREE
        os.environ.pop(SCRATCH_ENV, None)
    try:
        for batch_size in (1, 4, 16):
            _assert_same(expected, _generate(llm, requests, batch_size), f"batch size {batch_size}")
        stats = _tree_stats(llm)
        depths = llm.collective_rpc(lambda worker: list(worker.model_runner.drafter.stop_depth_counts))[0]
    finally:
        shutdown_engine(llm)
    assert stats["trees"] > 100
    assert stats["path_rows"] > 0  # rows recomputed through the platform kernel
    # over scratch blocks many rows share a kernel call
    assert stats["path_rounds"] < stats["path_rows"] / 2
    assert sum(1 for count in depths[1:] if count > 0) >= 3, f"stop depths should vary: {depths}"


def test_oracle_trees_without_prefix_caching_or_scratch_blocks(models, baseline, tmp_path):
    """Also the path without scratch blocks: rows recomputed one per request per kernel call in the
    request's own slots, restored afterwards."""
    target, head, _, _ = models
    requests, expected = baseline[:2]
    os.environ["RADAR_TREE_ORACLE"] = _write_oracle(tmp_path, requests, expected)
    os.environ[SCRATCH_ENV] = "0"
    try:
        llm = _tree_engine(target, head, max_num_seqs=16, enable_prefix_caching=False)
        try:
            _assert_same(expected, _generate(llm, requests), "oracle, no prefix caching, no scratch blocks")
            stats = _tree_stats(llm)
            scratch = llm.collective_rpc(lambda worker: list(worker.model_runner._scratch_blocks))[0]
        finally:
            shutdown_engine(llm)
    finally:
        os.environ.pop("RADAR_TREE_ORACLE", None)
        os.environ.pop(SCRATCH_ENV, None)
    assert scratch == []
    # the planted paths are accepted deep and off the first branch: compaction ran many times
    assert stats["accepted"] > stats["trees"]
    assert stats["moved"] > 50 and stats["off_spine"] > 20


def test_oracle_trees_chunked_prefill_prefix_cache_preemption(models, baseline, tmp_path):
    target, head, _, _ = models
    requests, expected, turn2, expected2 = baseline[:4]
    os.environ["RADAR_TREE_ORACLE"] = _write_oracle(tmp_path, requests + turn2, expected + expected2)
    try:
        llm = _tree_engine(
            target, head, max_num_seqs=16, enable_chunked_prefill=True, max_num_batched_tokens=64,
            enable_prefix_caching=True, num_gpu_blocks_override=24, disable_log_stats=False,
        )
        try:
            _assert_same(expected, _generate(llm, requests), "oracle, chunked prefill, small cache")
            _assert_same(expected2, _generate(llm, turn2), "second turn on prefix-cached tree blocks")
            stats = _tree_stats(llm)
            preemptions = _preemptions(llm)
        finally:
            shutdown_engine(llm)
    finally:
        os.environ.pop("RADAR_TREE_ORACLE", None)
    assert stats["moved"] > 50
    assert preemptions > 0, "the small KV cache should have preempted a request"


def _write_oracle(directory, requests, outputs) -> str:
    path = directory / "oracle.json"
    path.write_text(json.dumps([{"prompt": ids, "output": out} for (ids, _), out in zip(requests, outputs)]))
    return str(path)


def test_radar_checkpoint_in_tree_mode(models, baseline):
    """The product path: a RADAR checkpoint selected by the plugin, tree mode set at launch; RADAR's
    metrics (stop depths from the worker, tree sizes, acceptance lengths) reach LLM.get_metrics()."""
    target, _, _, checkpoint = models
    requests, expected = baseline[:2]
    llm = _engine(
        target, max_num_seqs=16, disable_log_stats=False,
        speculative_config={"method": "radar", "model": str(checkpoint),
                            "radar": {"mode": "tree", "total_tokens": NUM_NODES + 1}},
    )
    try:
        _assert_same(expected, _generate(llm, requests), "RADAR checkpoint, tree mode")
        # requests with a penalty or logprobs fall back to chains in the same batch as trees
        _assert_same(baseline[4], _mixed_batch(llm, requests), "trees mixed with chain fallbacks")
        stats = _tree_stats(llm)
        drafted_depths = llm.collective_rpc(lambda worker: list(worker.model_runner.drafter.stop_depth_counts))[0]
        num_speculative_tokens = llm.llm_engine.vllm_config.speculative_config.num_speculative_tokens
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        shutdown_engine(llm)
    assert num_speculative_tokens == NUM_NODES  # defaulted to total_tokens - 1
    assert stats["trees"] > 50
    _check_tree_metrics(metrics, drafted_depths, max_depth=5)


def _exact_counts(histogram, upper: int) -> list[int]:
    """Observations equal to 1..upper from a cumulative integer-bucket histogram."""
    cumulative = [histogram.buckets[f"{value}.0"] for value in range(1, upper + 1)]
    assert histogram.count == cumulative[-1], "an observation above the largest bucket"
    return [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]


def _check_tree_metrics(metrics, drafted_depths: list[int], max_depth: int) -> None:
    drafts = metrics["vllm:spec_decode_num_drafts"].value
    draft_tokens = metrics["vllm:spec_decode_num_draft_tokens"].value
    accepted = metrics["vllm:spec_decode_num_accepted_tokens"].value
    depth, size = metrics["vllm:radar_stop_depth"], metrics["vllm:radar_tree_size"]
    acceptance = metrics["vllm:radar_acceptance_length"]
    # one observation per verified request-round; stop depths only for rounds the drafter ran
    # (vLLM verifies zero drafts for the whole batch when the long request nears max_model_len)
    assert drafts > 50 and size.count == acceptance.count == drafts
    assert 0.8 * drafts <= depth.count <= drafts
    # tree sizes are the verified nodes; trees (top_k 3) hold more nodes than draft calls
    assert size.sum == pytest.approx(draft_tokens)
    assert _exact_counts(size, NUM_NODES)[NUM_NODES - 1] > 0  # full trees occur
    assert size.sum > depth.sum
    assert acceptance.sum == pytest.approx(drafts + accepted) and accepted > 0
    # stop depths come from the worker: every verified round is one of the drafter's proposals
    # (proposals for requests that finished before verification are not counted)
    verified = _exact_counts(depth, max_depth)
    assert all(v <= d for v, d in zip(verified, drafted_depths[1:])), (verified, drafted_depths)
    assert sum(1 for v in verified if v > 0) >= 3, f"stop depths should vary: {verified}"
    calls, rounds = metrics["vllm:radar_draft_calls"].value, metrics["vllm:radar_rounds"].value
    assert 0 < rounds <= drafts
    assert depth.sum / depth.count <= calls / rounds <= max_depth  # a round runs its deepest request's calls


def _recorded_trees(target, head, drafter: str, requests) -> tuple[list[list[int]], list]:
    os.environ["RADAR_TREE"] = json.dumps({"top_k": 1, "max_depth": 4, "drafter": drafter})
    try:
        llm = _tree_engine(target, head, max_num_seqs=4)
    finally:
        os.environ["RADAR_TREE"] = TREE
    try:
        llm.collective_rpc(lambda worker: setattr(worker.model_runner.drafter, "recorded_trees", []))
        outputs = _generate(llm, requests, batch_size=4)
        trees = llm.collective_rpc(lambda worker: list(worker.model_runner.drafter.recorded_trees))[0]
    finally:
        shutdown_engine(llm)
    return outputs, trees


def test_frontier_passes_reproduce_stock_draft_passes(models, baseline):
    """With top_k = 1 a frontier tree is a chain: the frontier passes (platform kernel over the
    cached context plus the round's private K/V history) must propose exactly what vLLM's own
    chain passes propose."""
    target, head, _, _ = models
    requests = baseline[0][:8]
    frontier_outputs, frontier_trees = _recorded_trees(target, head, "frontier", requests)
    spine_outputs, spine_trees = _recorded_trees(target, head, "spine", requests)
    assert frontier_outputs == spine_outputs == baseline[1][:8]
    assert len(frontier_trees) > 50
    assert frontier_trees == spine_trees
