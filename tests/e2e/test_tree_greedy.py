"""RADAR draft trees verified inside stock vLLM (CPU build): greedy outputs equal no speculation.

bf16 tiny models (near-ties are likely, which is what exactness is about). Every engine is started
as a user starts it (a tiny RADAR checkpoint, options in the speculative config's ``"radar"``
object) and runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the tests can read the
runner's tree counters and make sure trees, path recomputation and compaction really ran:

- baseline, no speculation (block size 32, max_model_len 256);
- the tiny head's trees with a random stop policy (varied depths), batch sizes 1, 4 and 16, rows
  recomputed over a small pool of scratch KV blocks (``"scratch_blocks": 64``: several calls per
  layer when a batch's paths need more; every other tree engine here has the default pool, sized
  for one call per layer);
- the test oracle drafter (random tree shapes with the true tokens planted, ``tests/oracle_drafter.py``)
  with prefix caching off and ``"scratch_blocks": 0`` (rows recomputed one per request per kernel
  call in the requests' own slots);
- tree mode and no speculation each at its default KV block size (32 and the platform's 128);
- the checkpoint with ``"mode": "tree"`` only, trees mixed with chain fallbacks, RADAR's metrics;
- tree mode with the depth gate capping every round below the maximum depth (fixed-depth chains
  from vLLM's loop, no trees);
- tree mode with top_k = 1 against chain mode (the frontier passes must draft what vLLM's chain
  passes draft);
- the oracle with chunked prefill (64-token budget), prefix caching on with a second turn reusing
  blocks written by tree steps, and a KV cache small enough to preempt and resume requests.

Prompts: 24 of mixed lengths (token ids) with different output lengths, so requests finish
mid-batch, plus one prompt whose output reaches max_model_len (its trees are cut by the scheduler).
"""
from __future__ import annotations

import random

import pytest
from oracle_drafter import install_oracle, install_recorder
from tiny_models import make_tiny_llama, make_tiny_radar_checkpoint, scoped_environment, shutdown_engine

vllm = pytest.importorskip("vllm")

MAX_MODEL_LEN = 256
NUM_PROMPTS = 24
NUM_NODES = 9  # num_speculative_tokens: the tree's node budget
TREE = {"mode": "tree", "top_k": 3, "max_depth": 5, "total_tokens": NUM_NODES + 1}
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module", autouse=True)
def engine_environment():
    with scoped_environment(ENV):
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
    kwargs.setdefault("block_size", 32)  # None: the platform's default (no speculation) or tree mode's
    if kwargs["block_size"] is None:
        del kwargs["block_size"]
    return vllm.LLM(model=str(target), dtype="bfloat16", max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0,
                    **kwargs)


def _tree_engine(target, checkpoint, radar=None, **kwargs):
    """A RADAR engine in tree mode (``radar``: more options for the speculative config)."""
    return _engine(target, speculative_config={"method": "radar", "model": str(checkpoint),
                                               "radar": dict(TREE, **(radar or {}))}, **kwargs)


def _oracle_engine(target, checkpoint, requests, outputs, radar=None, **kwargs):
    """Tree mode with every request drafting full-depth trees, replaced by oracle trees."""
    llm = _tree_engine(target, checkpoint, {"fixed_depth": 5, **(radar or {})}, **kwargs)
    llm.collective_rpc(lambda worker: install_oracle(worker.model_runner.drafter, requests, outputs))
    return llm


def _stop_depths(rounds, max_depth: int) -> list[int]:
    """Requests per stop depth 0..max_depth over recorded rounds."""
    counts = [0] * (max_depth + 1)
    for tree in rounds:
        for depth in tree.stop_depth.tolist():
            counts[depth] += 1
    return counts



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
    return target, checkpoint


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
    target, checkpoint = models
    requests, expected = baseline[:2]
    llm = _tree_engine(target, checkpoint, {"scratch_blocks": 64}, max_num_seqs=16)  # rows over scratch blocks
    try:
        rounds = llm.collective_rpc(lambda worker: install_recorder(worker.model_runner.drafter))[0]
        for batch_size in (1, 4, 16):
            _assert_same(expected, _generate(llm, requests, batch_size), f"batch size {batch_size}")
        stats = _tree_stats(llm)
    finally:
        shutdown_engine(llm)
    assert stats["trees"] > 100
    assert stats["path_rows"] > 0  # rows recomputed through the platform kernel
    # over scratch blocks many rows share a kernel call
    assert stats["path_rounds"] < stats["path_rows"] / 2
    depths = _stop_depths(rounds, 5)
    assert sum(1 for count in depths[1:] if count > 0) >= 3, f"stop depths should vary: {depths}"


def test_oracle_trees_without_prefix_caching_or_scratch_blocks(models, baseline):
    """Also the path without scratch blocks: rows recomputed one per request per kernel call in the
    request's own slots, restored afterwards."""
    target, checkpoint = models
    requests, expected = baseline[:2]
    llm = _oracle_engine(target, checkpoint, requests, expected, {"scratch_blocks": 0}, max_num_seqs=16,
                         enable_prefix_caching=False)
    try:
        _assert_same(expected, _generate(llm, requests), "oracle, no prefix caching, no scratch blocks")
        stats = _tree_stats(llm)
        scratch = llm.collective_rpc(lambda worker: list(worker.model_runner._scratch_blocks))[0]
    finally:
        shutdown_engine(llm)
    assert scratch == []
    assert stats["path_rounds"] > stats["steps"]  # one node per request per call: several calls a step
    # steps in which every request verified a greedy tree skipped vLLM's rejection sampler (the
    # others, with requests whose planted drafts were chains or none, ran it for those)
    assert 0 < stats["own_sampling"] < stats["steps"]
    # the planted paths are accepted deep and off the first branch: compaction ran many times
    assert stats["accepted"] > stats["trees"]
    assert stats["moved"] > 50 and stats["off_spine"] > 20
    assert stats["block_compactions"] == 0  # no pool: compaction rewrites each layer's kept rows


def test_tree_mode_default_block_size_against_no_speculation_at_the_platform_default(models, baseline):
    """Tree mode picks 32-token KV blocks and a scratch pool for one kernel call per layer when the
    user chose neither; greedy outputs still equal no speculation's at the platform's block size."""
    target, checkpoint = models
    requests = baseline[0]
    reference = _engine(target, block_size=None, max_num_seqs=16)
    try:
        expected = _generate(reference, requests)
        reference_block_size = reference.llm_engine.vllm_config.cache_config.block_size
    finally:
        shutdown_engine(reference)
    llm = _oracle_engine(target, checkpoint, requests, expected, block_size=None, max_num_seqs=16)
    calls_per_forward = _count_verify_kernel_calls()
    try:
        _assert_same(expected, _generate(llm, requests), "oracle trees, default block sizes")
        stats = _tree_stats(llm)
        block_size = llm.llm_engine.vllm_config.cache_config.block_size
        scratch = llm.collective_rpc(lambda worker: len(worker.model_runner._scratch_blocks))[0]
    finally:
        shutdown_engine(llm)
    assert (reference_block_size, block_size) == (128, 32)
    assert scratch > 0 and stats["path_rows"] > 0
    assert stats["path_rounds"] <= stats["steps"]  # at most one kernel round per layer for a step's trees
    # the planted paths leave the first branch, and one round leaves them in the scratch blocks:
    # every such path was compacted by copying those back (greedy equality above checks the copies)
    assert stats["off_spine"] > 20 and stats["block_compactions"] == stats["off_spine"]
    # and that round runs in the same kernel call as the batch's causal rows: one call per layer
    assert len(calls_per_forward) > 20 and set(calls_per_forward) == {1}, sorted(set(calls_per_forward))


def _count_verify_kernel_calls() -> list[int]:
    """Kernel calls of every layer forward that verifies trees, appended to the returned list
    (engines run in this process; the patch lasts for the module's engines)."""
    from vllm import _custom_ops

    from radar_vllm.vllm import attention

    counts: list[int] = []
    kernel, forward = _custom_ops.cpu_attention_with_kv_cache, attention.RadarTreeCPUAttentionImpl.forward
    active: list[int] = []

    def counting_kernel(*args, **kwargs):
        if active:
            active[-1] += 1
        return kernel(*args, **kwargs)

    def counting_forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
        if not isinstance(getattr(attn_metadata, "tree_plan", None), attention.TreeVerifyPlan):
            return forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        active.append(0)
        try:
            return forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        finally:
            counts.append(active.pop())

    _custom_ops.cpu_attention_with_kv_cache = counting_kernel
    attention.RadarTreeCPUAttentionImpl.forward = counting_forward
    _RESTORE.append(lambda: (setattr(_custom_ops, "cpu_attention_with_kv_cache", kernel),
                             setattr(attention.RadarTreeCPUAttentionImpl, "forward", forward)))
    return counts


_RESTORE: list = []


@pytest.fixture(autouse=True)
def _restore_patches():
    yield
    while _RESTORE:
        _RESTORE.pop()()


def test_oracle_trees_chunked_prefill_prefix_cache_preemption(models, baseline):
    target, checkpoint = models
    requests, expected, turn2, expected2 = baseline[:4]
    llm = _oracle_engine(
        target, checkpoint, requests + turn2, expected + expected2, max_num_seqs=16, enable_chunked_prefill=True,
        max_num_batched_tokens=64, enable_prefix_caching=True, num_gpu_blocks_override=24, disable_log_stats=False,
    )
    try:
        _assert_same(expected, _generate(llm, requests), "oracle, chunked prefill, small cache")
        _assert_same(expected2, _generate(llm, turn2), "second turn on prefix-cached tree blocks")
        stats = _tree_stats(llm)
        preemptions = _preemptions(llm)
    finally:
        shutdown_engine(llm)
    assert stats["moved"] > 50
    assert preemptions > 0, "the small KV cache should have preempted a request"


def test_radar_checkpoint_in_tree_mode(models, baseline):
    """The product path: a RADAR checkpoint selected by the plugin, tree mode set at launch; RADAR's
    metrics (stop depths from the worker, tree sizes, acceptance lengths) reach LLM.get_metrics()."""
    target, checkpoint = models
    requests, expected = baseline[:2]
    llm = _engine(
        target, max_num_seqs=16, disable_log_stats=False,
        speculative_config={"method": "radar", "model": str(checkpoint),
                            "radar": {"mode": "tree", "total_tokens": NUM_NODES + 1}},
    )
    try:
        rounds = llm.collective_rpc(lambda worker: install_recorder(worker.model_runner.drafter))[0]
        _assert_same(expected, _generate(llm, requests), "RADAR checkpoint, tree mode")
        # requests with a penalty or logprobs fall back to chains in the same batch as trees
        _assert_same(baseline[4], _mixed_batch(llm, requests), "trees mixed with chain fallbacks")
        stats = _tree_stats(llm)
        drafted_depths = _stop_depths(rounds, 5)
        num_speculative_tokens = llm.llm_engine.vllm_config.speculative_config.num_speculative_tokens
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        shutdown_engine(llm)
    assert num_speculative_tokens == NUM_NODES  # defaulted to total_tokens - 1
    assert stats["trees"] > 50
    _check_tree_metrics(metrics, drafted_depths, max_depth=5)


def _cap_gate(worker, cap: int) -> None:
    """Force the depth gate's cap; record the drafts per request of every proposal."""
    drafter = worker.model_runner.drafter
    drafter.gate.decide = lambda batch_size, sampling=False: cap
    inner, drafter.proposed_lengths = drafter.propose, []

    def propose(*args, **kwargs):
        drafts = inner(*args, **kwargs)
        drafter.proposed_lengths += (drafts >= 0).sum(dim=1).tolist()
        return drafts

    drafter.propose = propose


@pytest.mark.parametrize("cap", [1, 3])
def test_tree_mode_rounds_capped_below_the_maximum_depth_draft_fixed_chains(models, baseline, cap):
    """Where the depth gate caps a tree engine's round below the maximum depth the round drafts a
    chain of exactly ``cap`` tokens per request (vLLM's own loop, no policy) and vLLM verifies it
    as a chain: no tree, no tree-row recompute; RADAR's metrics count ``cap`` draft calls."""
    target, checkpoint = models
    requests, expected = baseline[:2]
    llm = _tree_engine(target, checkpoint, {"skip_drafting": "auto"}, max_num_seqs=16, disable_log_stats=False)
    try:
        llm.collective_rpc(lambda worker: _cap_gate(worker, cap))
        _assert_same(expected, _generate(llm, requests), f"tree mode, every round capped at depth {cap}")
        stats = _tree_stats(llm)
        lengths = llm.collective_rpc(lambda worker: worker.model_runner.drafter.proposed_lengths)[0]
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        shutdown_engine(llm)
    counters = {name: m.value for name, m in metrics.items() if hasattr(m, "value")}
    assert stats["trees"] == 0 and stats["path_rows"] == 0
    assert len(lengths) > 50 and set(lengths) == {cap}  # exactly cap draft tokens per request, every round
    # (vLLM's counters also count the zeros it drafts for a request near max_model_len)
    assert counters["vllm:spec_decode_num_drafts"] > 50 // cap
    assert 0 < counters["vllm:spec_decode_num_accepted_tokens"] <= cap * counters["vllm:spec_decode_num_drafts"]
    # RADAR's metrics count them as rounds stopped after cap draft calls (not the zeros above)
    depth = metrics["vllm:radar_stop_depth"]
    assert 0.8 * counters["vllm:spec_decode_num_drafts"] <= depth.count <= counters["vllm:spec_decode_num_drafts"]
    assert _exact_counts(depth, cap) == [0] * (cap - 1) + [depth.count]
    assert counters["vllm:radar_draft_calls"] == cap * counters["vllm:radar_rounds"] > 0


@pytest.mark.parametrize("arm, largest", [(5, NUM_NODES), (6, 3)], ids=["full tree", "smaller tree"])
def test_the_gate_arm_of_a_smaller_tree_verifies_trees_of_that_size(models, baseline, arm, largest):
    """``tree_sizes``: arm 6 (max depth 5, one smaller size) grows the policy's trees and verifies
    their best 4 tokens (3 drafts) per request; arm 5 the engine's full trees. Greedy outputs stay
    those of no speculation."""
    target, checkpoint = models
    requests, expected = baseline[:2]
    llm = _tree_engine(target, checkpoint, {"skip_drafting": "auto", "tree_sizes": [4]}, max_num_seqs=16)
    try:
        llm.collective_rpc(lambda worker: _cap_gate(worker, arm))
        _assert_same(expected, _generate(llm, requests), f"tree mode, every round on gate arm {arm}")
        stats = _tree_stats(llm)
        lengths = llm.collective_rpc(lambda worker: worker.model_runner.drafter.proposed_lengths)[0]
    finally:
        shutdown_engine(llm)
    assert stats["trees"] > 20 and len(lengths) > 50
    assert max(lengths) == largest  # (the policy stops some requests' trees before they fill)


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


def _recorded_drafts(target, checkpoint, radar, requests) -> tuple[list[list[int]], list[list[list[int]]]]:
    llm = _engine(target, max_num_seqs=4, speculative_config={"method": "radar", "model": str(checkpoint),
                                                             "radar": radar})
    try:
        rounds = llm.collective_rpc(lambda worker: install_recorder(worker.model_runner.drafter))[0]
        outputs = _generate(llm, requests, batch_size=4)
    finally:
        shutdown_engine(llm)
    return outputs, [[row["target_tokens"] for row in tree.to_lists()] for tree in rounds]


def test_frontier_passes_reproduce_stock_draft_passes(models, baseline):
    """With top_k = 1 a frontier tree is a chain: the frontier passes (platform kernel over the
    cached context plus the round's private K/V history) must propose exactly what vLLM's own
    chain passes propose (chain mode, same depth, no policy)."""
    target, checkpoint = models
    requests = baseline[0][:8]
    tree_outputs, tree_drafts = _recorded_drafts(
        target, checkpoint, {"mode": "tree", "top_k": 1, "max_depth": 4, "total_tokens": 5, "fixed_depth": 4}, requests)
    chain_outputs, chain_drafts = _recorded_drafts(
        target, checkpoint, {"mode": "chain", "max_depth": 4, "total_tokens": 5, "fixed_depth": 4}, requests)
    assert tree_outputs == chain_outputs == baseline[1][:8]
    assert sum(len(drafts) for drafts in tree_drafts) > 50  # request-rounds
    assert tree_drafts == chain_drafts


def test_frontier_passes_in_one_kernel_call_draft_what_per_slot_calls_draft(models, baseline):
    """A frontier pass over scratch blocks (every row a one-token request, its path in private
    block copies) must draft exactly what the per-slot passes in the requests' own lookahead slots
    draft (``"scratch_blocks": 0``), with the default pool (one call per pass) and with a pool
    too small for one call (several calls per pass)."""
    target, checkpoint = models
    requests = baseline[0][:8]
    fixed = {**TREE, "fixed_depth": 4}
    runs = {}
    for name, scratch in (("one call", None), ("small pool", 8), ("per slot", 0)):
        radar = fixed if scratch is None else {**fixed, "scratch_blocks": scratch}
        llm = _engine(target, max_num_seqs=4, speculative_config={"method": "radar", "model": str(checkpoint),
                                                                 "radar": radar})
        try:
            llm.collective_rpc(lambda worker: _count_frontier_calls(worker.model_runner.drafter))
            rounds = llm.collective_rpc(lambda worker: install_recorder(worker.model_runner.drafter))[0]
            outputs = _generate(llm, requests, batch_size=4)
            calls = llm.collective_rpc(lambda worker: dict(worker.model_runner.drafter._frontier_calls))[0]
        finally:
            shutdown_engine(llm)
        runs[name] = (outputs, [[row["target_tokens"] for row in tree.to_lists()] for tree in rounds], calls)
    for outputs, _, _ in runs.values():
        assert outputs == baseline[1][:8]
    drafts = runs["per slot"][1]
    assert sum(len(d) for d in drafts) > 50 and any(len(row) > 4 for d in drafts for row in d)  # trees, not chains
    assert runs["one call"][1] == drafts and runs["small pool"][1] == drafts
    one, small, per_slot = runs["one call"][2], runs["small pool"][2], runs["per slot"][2]
    assert one["passes"] > 0 and one["kernel_calls"] == one["passes"], one  # one call per pass
    assert small["kernel_calls"] > small["passes"], small  # the short pool split passes
    assert per_slot["kernel_calls"] == 3 * per_slot["passes"], per_slot  # one call per frontier slot (top_k 3)


def _count_frontier_calls(drafter) -> None:
    """Count the drafter's frontier passes and the kernel calls (rounds) their plans hold (the
    class is patched once per process; each drafter counts its own)."""
    from radar_vllm.vllm import proposer as module

    drafter._frontier_calls = {"passes": 0, "kernel_calls": 0}
    if getattr(module._FrontierState.run, "counting", False):
        return
    run = module._FrontierState.run

    def counting_run(self, *args, **kwargs):
        output = run(self, *args, **kwargs)
        counts = getattr(self.proposer, "_frontier_calls", None)
        if counts is not None:
            counts["passes"] += 1
            counts["kernel_calls"] += len(self.plan.rounds)
        return output
    counting_run.counting = True
    module._FrontierState.run = counting_run
