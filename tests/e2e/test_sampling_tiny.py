"""Lossless sampling inside vLLM (CPU build, tiny bf16 models), RADAR chain and RADAR trees.

1. Distribution: the first generated tokens of many seeded requests over 50 prompts
   (temperature 1, temperature 2, temperature 0.7 with top-p 0.9, and temperature 1 with top-k 20)
   have the same distribution with speculation as without: a two-sample chi-square test per
   position (rare tokens pooled), each at significance 0.001 / number of tests (Bonferroni), so
   each engine's test fails by chance with probability < 0.001.
2. Acceptance law: trees: for every verified tree the runner records the exact law of the accepted
   length under the request's shaped target rows and the realized length; chain: for every
   verified chain the target's probability of each draft token (the acceptance probability of a
   one-hot draft). The realized totals must agree with the laws within 3.29 standard deviations
   (two-sided 0.001; Bonferroni over positions in chain mode).
"""
from __future__ import annotations

import random
from statistics import NormalDist

import pytest

from tiny_models import (
    make_tiny_llama,
    make_tiny_radar_checkpoint,
    scoped_environment,
    shutdown_engine,
)
from sampling_stats import chain_law_by_position, first_tokens_p_values, install_chain_acceptance_recorder, tree_law_z

vllm = pytest.importorskip("vllm")

NUM_REQUESTS = 500
NUM_TOKENS = 4  # tokens compared per request (the first comes from the prefill)
NUM_PROMPTS = 50  # requests cycle through them; both engines see the same list
GROUPS = {"t1": dict(temperature=1.0), "t2": dict(temperature=2.0), "shaped": dict(temperature=0.7, top_p=0.9),
          "topk": dict(temperature=1.0, top_k=20)}
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
NUM_TESTS = len(GROUPS) * NUM_TOKENS
ALPHA = 0.001 / NUM_TESTS
ENGINES = ("chain", "tree")


@pytest.fixture(scope="module", autouse=True)
def engine_environment():
    with scoped_environment(ENV):
        yield


def _engine(target, **kwargs):
    return vllm.LLM(model=str(target), dtype="bfloat16", max_model_len=128, block_size=32, enforce_eager=True,
                    seed=0, max_num_seqs=64, **kwargs)


def _sample(llm, seed_offset: int) -> dict[str, list[list[int]]]:
    samples = {}
    for name, options in GROUPS.items():
        params = [vllm.SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True, seed=seed_offset + i, **options)
                  for i in range(NUM_REQUESTS)]
        prompts = [{"prompt_token_ids": _prompt(i % NUM_PROMPTS)} for i in range(NUM_REQUESTS)]
        samples[name] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    return samples


def _prompt(index: int) -> list[int]:
    rng = random.Random(index)
    return [rng.randrange(3, 500) for _ in range(4 + index % 9)]



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling_tiny")
    target = make_tiny_llama(root / "target")
    llm = _engine(target)
    baseline = _sample(llm, seed_offset=0)
    shutdown_engine(llm)
    results = {}
    # RADAR chain, as a user starts it; vLLM's rejection sampler verifies; sampled requests run the
    # checkpoint's policy for sampled requests
    checkpoint = make_tiny_radar_checkpoint(root / "radar", target, max_depth=4, sampled_policy_seed=11)
    llm = _engine(target, speculative_config={"method": "radar", "model": str(checkpoint)})
    try:
        # the recorder's list is filled in place while sampling
        records = llm.collective_rpc(lambda worker: install_chain_acceptance_recorder(worker.model_runner))[0]
        results["chain"] = dict(samples=_sample(llm, seed_offset=10_000), records=records)  # independent seeds
    finally:
        shutdown_engine(llm)
    # RADAR trees: the tree runner's own acceptance
    tree_checkpoint = make_tiny_radar_checkpoint(root / "radar-tree", target, top_k=3, max_depth=4)
    llm = _engine(target, speculative_config={"method": "radar", "model": str(tree_checkpoint), "radar": {
        "mode": "tree", "total_tokens": 8, "fixed_depth": 4}})  # full-depth 7-node trees
    try:
        llm.collective_rpc(lambda worker: setattr(worker.model_runner, "record_acceptance", True))
        samples = _sample(llm, seed_offset=20_000)
        records = llm.collective_rpc(lambda worker: list(worker.model_runner.acceptance_records))[0]
        stats = llm.collective_rpc(lambda worker: dict(worker.model_runner.tree_stats))[0]
    finally:
        shutdown_engine(llm)
    assert stats["trees"] > 200
    results["tree"] = dict(samples=samples, records=records)
    return baseline, results


@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("engine", ENGINES)
def test_first_tokens_follow_the_no_speculation_distribution(runs, engine, group):
    baseline, results = runs
    p_values = first_tokens_p_values(baseline[group], results[engine]["samples"][group], NUM_TOKENS)
    assert min(p_values) > ALPHA, f"{engine}, {group}: per-position p-values {p_values}"


def test_chain_acceptance_follows_the_exact_law(runs):
    _, results = runs
    rows = chain_law_by_position(results["chain"]["records"])
    assert rows and rows[0]["rounds"] > 200, rows
    assert rows[0]["realized"] > 0.05 * rows[0]["rounds"], rows[0]  # something to test
    checked = [row for row in rows if row["variance"] >= 5]
    bound = NormalDist().inv_cdf(1 - 0.001 / (2 * len(checked)))
    for row in checked:
        assert abs(row["z"]) < bound, row


def test_tree_accepted_lengths_follow_the_exact_law(runs):
    _, results = runs
    records = results["tree"]["records"]
    assert len(records) > 200
    expected, realized, z = tree_law_z(records)
    assert abs(z) < 3.29, f"realized {realized} vs expected {expected:.1f} (z={z:.2f})"
    # a sampled tree must sometimes accept something, or the law test says little
    assert realized > 0.1 * len(records)
