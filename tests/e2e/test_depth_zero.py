"""Depth 0 in vLLM: rounds that do not draft, the drafter's catch-up, the plain decode path.

- Skipped rounds never change greedy outputs (chain mode, batch 1 and 4, with chunked prefill).
- Catch-up: with a fixed draft/skip pattern, every draft made from a context that an
  always-drafting run also drafted from is the same, token for token; without the catch-up some
  differ (the check can fail).
- A batch that skips every round runs vLLM's plain decode path: no draft forward (except call 1
  of rounds that carry a prefill chunk, for the drafter's KV), no rejection sampling.
- The measuring gate (``"skip_drafting": "auto"``) measures every depth cap (0 to the
  checkpoint's depth) and then runs the fastest one, the others only as probes.
"""
from __future__ import annotations

import random

import pytest

from oracle_drafter import count_calls, install_draft_log, install_gate
from tiny_models import make_tiny_llama, make_tiny_radar_checkpoint, scoped_environment, shutdown_engine

vllm = pytest.importorskip("vllm")

MAX_MODEL_LEN = 256
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
PATTERN = [True, False, False, True, False, True, True, False, False, False]  # True: draft


@pytest.fixture(scope="module", autouse=True)
def engine_environment():
    with scoped_environment(ENV):
        yield


def _requests(count: int = 8) -> list[tuple[list[int], int]]:
    rng = random.Random(11)
    return [([rng.randrange(3, 500) for _ in range(5 + (i * 17) % 60)], 24 + (i * 7) % 20) for i in range(count)]


def _engine(target, speculative_config=None, **kwargs):
    return vllm.LLM(model=str(target), dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=32,
                    enforce_eager=True, seed=0, max_num_seqs=4, speculative_config=speculative_config, **kwargs)


def _generate(llm, requests, batch_size: int) -> list[list[int]]:
    outputs: list[list[int]] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        params = [vllm.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in chunk]
        results = llm.generate([{"prompt_token_ids": ids} for ids, _ in chunk], params, use_tqdm=False)
        outputs += [list(result.outputs[0].token_ids) for result in results]
    return outputs


def _drafter_call(llm, function):
    return llm.collective_rpc(lambda worker: function(worker.model_runner.drafter))[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth_zero")
    target = make_tiny_llama(root / "target")
    checkpoint = make_tiny_radar_checkpoint(root / "ckpt", target, top_k=3, max_depth=4)
    auto = make_tiny_radar_checkpoint(root / "ckpt-auto", target, top_k=3, max_depth=4, skip_drafting="auto")
    return target, checkpoint, auto


@pytest.fixture(scope="module")
def baseline(models):
    llm = _engine(models[0])
    requests = _requests()
    outputs = _generate(llm, requests, batch_size=4)
    shutdown_engine(llm)
    return requests, outputs


def _radar_run(target, checkpoint, requests, batch_size, pattern=None, catch_up=True, **kwargs):
    """Outputs, the draft log and the drafter's round counters of one RADAR chain run."""
    llm = _engine(target, {"method": "radar", "model": str(checkpoint), "radar": {"fixed_depth": 3}}, **kwargs)
    try:
        if pattern is not None:
            _drafter_call(llm, lambda drafter: install_gate(drafter, pattern))
        if not catch_up:
            def no_catch_up(drafter):
                drafter.skipped.splice = lambda req_ids, num_tokens, indices, cad, *buffers: (num_tokens, indices, cad)
            _drafter_call(llm, no_catch_up)
        log = _drafter_call(llm, install_draft_log)
        outputs = _generate(llm, requests, batch_size)
        counters = _drafter_call(llm, lambda drafter: {
            "drafted": drafter.round_counts["draft"],
            "skipped": drafter.round_counts["skip"] + drafter.round_counts["catch_up"],
            "caught_up": drafter.skipped.rows_caught_up, "log": dict(log),
            "kept_through_catch_up": drafter.skipped.rounds_kept_through_catch_up,
            "catch_up_rounds": drafter.round_counts["catch_up"], "kv_writer": drafter.kv_writer is not None})
        if not kwargs.get("disable_log_stats", True):
            counters["metrics"] = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    finally:
        shutdown_engine(llm)
    return outputs, counters


def _mismatches(reference: dict, other: dict) -> tuple[int, int, float]:
    """(contexts both runs drafted from, drafts that differ there, largest call-1 logit difference)."""
    common = [key for key in other if key in reference]
    differing = sum(1 for key in common if reference[key][0] != other[key][0])
    largest = max((_difference(reference[key][1], other[key][1]) for key in common), default=0.0)
    return len(common), differing, largest


def _difference(a, b) -> float:
    finite = a.isfinite()
    if not bool((finite == b.isfinite()).all()) or not bool((a[~finite] == b[~finite]).all()):
        return float("inf")
    return float((a[finite] - b[finite]).abs().max())


def test_skipped_rounds_keep_greedy_outputs_and_catch_up_reproduces_the_drafts(models, baseline):
    target, checkpoint, _ = models
    requests, expected = baseline
    always, always_counts = _radar_run(target, checkpoint, requests, batch_size=4)
    assert always == expected
    assert always_counts["skipped"] == 0
    noise = 0.0  # call-1 logit differences left with the catch-up (float32, other row counts)
    for batch_size in (1, 8):  # 8 requests on 4 sequences: each later one arrives as one finishes
        outputs, counts = _radar_run(target, checkpoint, requests, batch_size, pattern=PATTERN,
                                     enable_chunked_prefill=True, max_num_batched_tokens=32,
                                     disable_log_stats=False)
        assert outputs == expected, f"batch {batch_size}: skipped rounds changed greedy outputs"
        assert counts["skipped"] > counts["drafted"] > 0
        # vllm:radar_skipped_rounds counts request x step rounds without drafts (those after the
        # last drafting step of a run are still pending); skipped engine steps carry 1-4 requests
        skipped_metric = counts["metrics"]["vllm:radar_skipped_rounds"]
        assert 0.5 * counts["skipped"] < skipped_metric <= batch_size * counts["skipped"], (skipped_metric, counts)
        assert counts["caught_up"] > 0
        # the rounds with prefill chunks wrote the drafter's K/V without its forward (DrafterKVWriter)
        assert counts["kv_writer"] and counts["catch_up_rounds"] > 0, counts["catch_up_rounds"]
        if batch_size > 1:  # arrivals while others skip: their kept rows wait for a drafting round
            assert counts["kept_through_catch_up"] > 0, {k: v for k, v in counts.items() if k != "log"}
        compared, differing, largest = _mismatches(always_counts["log"], counts["log"])
        assert compared >= 20, f"batch {batch_size}: only {compared} drafts from contexts both runs drafted from"
        assert differing == 0, f"batch {batch_size}: {differing} of {compared} drafts differ after catch-up"
        assert largest < 1e-3, f"batch {batch_size}: call-1 logits differ by up to {largest} after catch-up"
        noise = max(noise, largest)
    # The same pattern without the catch-up: the drafter reads holes in its KV cache and its logits
    # move clearly more than float noise (the tiny random head attends almost uniformly, so not by
    # much); outputs do not change: verification does not trust the drafter.
    outputs, counts = _radar_run(target, checkpoint, requests, 4, pattern=PATTERN, catch_up=False)
    assert outputs == expected
    compared, _, largest = _mismatches(always_counts["log"], counts["log"])
    assert compared >= 20 and largest > 2 * noise, (compared, largest, noise)


def test_a_batch_that_skips_every_round_runs_the_plain_decode_path(models, baseline):
    target, checkpoint, _ = models
    requests, expected = baseline
    llm = _engine(target, {"method": "radar", "model": str(checkpoint)}, disable_log_stats=False)
    try:
        _drafter_call(llm, lambda drafter: install_gate(drafter, [False]))
        draft_forwards = _drafter_call(llm, lambda drafter: count_calls(drafter.model))
        rejections = llm.collective_rpc(lambda worker: count_calls(worker.model_runner.rejection_sampler))[0]
        prepared = _drafter_call(llm, lambda drafter: count_calls(drafter, "prepare_next_token_ids_padded"))
        logits = _drafter_call(llm, lambda drafter: count_calls(drafter.model, "compute_logits"))
        outputs = _generate(llm, requests, batch_size=4)
        counts = _drafter_call(llm, lambda drafter: (dict(drafter.round_counts), list(draft_forwards),
                                                      list(rejections), list(prepared), list(logits)))
        metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    finally:
        shutdown_engine(llm)
    assert outputs == expected
    # vllm:radar_skipped_rounds counts every decode round (request x step) without drafts as it
    # runs, though no step ever verifies drafts: each request's tokens after the first
    assert metrics["vllm:radar_skipped_rounds"] == sum(n - 1 for _, n in requests), metrics
    rounds, forwards, rejection_calls, preparations, logits_calls = counts
    assert logits_calls == [0], "a round without drafts computed the drafter's logits"
    # vLLM prepares the drafter's inputs only for rounds that run call 1; a skipped decode round
    # is opened before that and keeps the target's outputs as they are
    assert preparations == [rounds["catch_up"]], (preparations, rounds)
    assert rounds["draft"] == 0
    assert rounds["skip"] >= sum(n for _, n in requests) // 4 - len(requests)  # every decode step
    # a round with a prefill chunk writes the drafter's KV (and drafts nothing) without a draft
    # forward (the K/V projections only); skipped rounds run none either
    assert rounds["catch_up"] > 0 and forwards == [0], (forwards, rounds)
    assert rejection_calls == [0], "a step without drafts ran rejection sampling"


def _install_step_costs(drafter, cost_of_cap):
    """Make the gate's clock advance by ``cost_of_cap(cap)`` per engine step, the cap being the one
    the step that just ended ran with: the gate then measures known costs, not this machine's noise."""
    now = [0.0]

    def clock():
        if drafter._last_round is not None:
            now[0] += cost_of_cap(drafter._last_round[3])
        return now[0]
    drafter.clock = clock


@pytest.mark.parametrize("cheapest", ["depth 1", "depth 0"])
def test_measuring_gate_follows_the_fastest_depth_cap(models, baseline, cheapest):
    target, _, auto = models
    requests, expected = baseline
    long_requests = [(ids, 96) for ids, _ in requests[:4]]
    # step costs by cap: one draft costs nothing extra (drafting wins by its acceptance), or costs
    # three decode steps (depth 0 wins); every level past the first costs half a decode step more
    first_draft = 0.0 if cheapest == "depth 1" else 2.0
    cost = lambda cap: 1.0 + (first_draft + 0.5 * (cap - 1) if cap else 0.0)  # noqa: E731
    llm = _engine(target, {"method": "radar", "model": str(auto)})
    try:
        _drafter_call(llm, lambda drafter: _install_step_costs(drafter, cost))
        _generate(llm, requests, batch_size=4)
        assert _generate(llm, requests, batch_size=4) == expected
        before = _drafter_call(llm, lambda drafter: drafter.gate.summary())
        _generate(llm, long_requests, batch_size=4)
        after = _drafter_call(llm, lambda drafter: (drafter.gate.summary(), drafter.gate.preferred(4),
                                                    drafter.gate.draft_margin))
    finally:
        shutdown_engine(llm)
    summary, preferred, margin = after
    bucket, earlier = summary["4"], before["4"]
    caps = (0, 1, 2, 3, 4)  # depth 0 to the checkpoint's depth (4)
    # depth 0 and one draft are always measured; deeper caps only while the one before did not lose
    assert bucket["steps_d0"] >= 1 and bucket["steps_d1"] >= 1, summary
    used = {cap: bucket[f"steps_d{cap}"] - earlier[f"steps_d{cap}"] for cap in caps}
    rates = {cap: bucket[f"rate_d{cap}"] for cap in caps}
    # the rates are the known costs' (tokens per step over the step's cost)
    assert rates[0] == pytest.approx(1.0) and rates[1] == pytest.approx(bucket["tokens_d1"] / cost(1)), summary
    assert preferred == (1 if cheapest == "depth 1" else 0), summary
    # the choice is the best rate, a drafting arm's counted by the draft margin (batch 4)
    assert preferred == max(caps, key=lambda cap: rates[cap] / (1 + margin if cap else 1)), summary
    # the long batch ran mostly at that arm, the others only as probes
    assert used[preferred] > 0.8 * sum(used.values()), f"rounds per cap {used}, gate {summary}"


def test_a_gate_cost_table_starts_the_gate_and_a_wrong_one_is_refused(models, baseline, tmp_path):
    from radar_vllm.core.draft_gate import load_gate_table, save_gate_table
    from radar_vllm.offline.gate_calibration import calibrate_gate

    target, checkpoint, auto = models
    requests, expected = baseline
    table = calibrate_gate(auto, target, [ids for ids, _ in requests], [1, 4], tokens=24, passes=2,
                           dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True, progress=lambda _: None)
    section = table["modes"]["chain"]
    assert section["arms"] == [0, 1, 2, 3, 4] and table["target"] == target.name
    for size in ("1", "4"):  # every cap measured at both sizes
        assert set(section["buckets"][size]["arms"]) == {"0", "1", "2", "3", "4"}, section["buckets"]
    path = save_gate_table(table, tmp_path / "gate.json")
    llm = _engine(target, {"method": "radar", "model": str(auto), "radar": {"gate_costs": str(path)}})
    try:
        seeded = _drafter_call(llm, lambda drafter: drafter.gate.summary())
        _generate(llm, [(ids, 10) for ids, _ in requests[:4]], batch_size=4)  # ~9 decode rounds at batch 4
        early = _drafter_call(llm, lambda drafter: drafter.gate.summary())
        assert _generate(llm, requests, batch_size=4) == expected  # greedy output unchanged
    finally:
        shutdown_engine(llm)
    # the engine's gate started from the table: both sizes known before any step, nothing measured
    for size in ("1", "4"):
        assert all(seeded[size][f"steps_d{cap}"] == 0 and seeded[size][f"rate_d{cap}"] > 0 for cap in range(5))
    # and it did not sweep: a sweep measures every cap twice in its first 10 rounds; a seeded gate
    # runs its choice (and, where the first measurements overturn it, the next best), no probe yet
    used = [cap for cap in range(5) if early["4"][f"steps_d{cap}"] > 0]
    assert 1 <= len(used) <= 2, (early["4"], seeded["4"])
    # a table named by the user but measured for another head (or mode, dtype, target, machine) is
    # refused at start-up, naming what to re-measure
    wrong = dict(load_gate_table(path), checkpoint_id="radar@ffffffffffff")
    save_gate_table(wrong, tmp_path / "wrong.json")
    with pytest.raises(Exception, match="checkpoint_id.*calibrate-gate"):
        _engine(target, {"method": "radar", "model": str(auto), "radar": {"gate_costs": str(tmp_path / "wrong.json")}})


def test_prefix_cache_hits_keep_their_last_block_in_radar_engines(models):
    """A RADAR engine reuses every full block of a cached prompt, as an engine without speculation
    does (vLLM's EAGLE default recomputes the last one), with the same greedy outputs; a speculative
    config that sets ``disable_eagle_block_drop`` false gets vLLM's behaviour back."""
    target, checkpoint, auto = models
    prompt = [random.Random(5).randrange(3, 500) for _ in range(100)]  # 3 full 32-token blocks + 4
    shared = [prompt, prompt[:96] + [7, 8, 9, 10, 11]]  # the same prompt, then the same 3 blocks

    def cached_tokens(speculative_config):
        llm = _engine(target, speculative_config)
        try:
            params = vllm.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
            results = [llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0] for ids in
                       [prompt, *shared]]
        finally:
            shutdown_engine(llm)
        return [r.num_cached_tokens for r in results[1:]], [list(r.outputs[0].token_ids) for r in results]

    plain_cached, expected = cached_tokens(None)
    assert plain_cached == [96, 96]
    for spec in ({"method": "radar", "model": str(checkpoint)}, {"method": "radar", "model": str(auto)}):
        cached, outputs = cached_tokens(spec)
        assert cached == [96, 96], f"{spec}: a RADAR engine recomputed cached blocks ({cached})"
        assert outputs == expected
    cached, outputs = cached_tokens({"method": "radar", "model": str(checkpoint), "disable_eagle_block_drop": False})
    assert cached == [64, 64]  # vLLM's EAGLE default: the last block of the hit is recomputed
    assert outputs == expected
