"""RADAR inside stock vLLM (CPU build), offline ``LLM``: exact greedy outputs, varied depths, metrics.

One baseline engine (no speculation) and one RADAR engine, shared by the whole module. The tiny
models come from :mod:`tiny_models`; the random policy stops at depths 1..4.
"""
from __future__ import annotations

import os

import pytest

from tiny_models import make_tiny_llama, make_tiny_radar_checkpoint, shutdown_engine

vllm = pytest.importorskip("vllm")

MAX_DEPTH = 4
NUM_PROMPTS = 24
MAX_TOKENS = 24


def _prompts() -> list[str]:
    """Mixed lengths: from one word to a few hundred characters, some repeated phrases."""
    words = "the sea is calm and the sky is wide while small robots paint the morning light".split()
    prompts = []
    for i in range(NUM_PROMPTS):
        length = 1 + (i * 7) % 45
        prompts.append(f"Q{i}: " + " ".join(words[(i + j) % len(words)] for j in range(length)))
    return prompts



def _engine_kwargs(target) -> dict:
    return dict(
        model=str(target),
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        max_num_seqs=32,
        seed=0,
        disable_log_stats=False,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("radar_offline")
    target = make_tiny_llama(root / "target")
    checkpoint = make_tiny_radar_checkpoint(root / "ckpt", target, max_depth=MAX_DEPTH)
    return target, checkpoint


@pytest.fixture(scope="module")
def baseline_outputs(models):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    target, _ = models
    llm = vllm.LLM(**_engine_kwargs(target))
    params = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = [list(o.outputs[0].token_ids) for o in llm.generate(_prompts(), params)]
    shutdown_engine(llm)
    return outputs


@pytest.fixture(scope="module")
def radar_run(models, baseline_outputs):
    """The RADAR engine, its greedy outputs and its metrics snapshot (created after the baseline
    so that its Prometheus collectors are the registered ones)."""
    target, checkpoint = models
    llm = vllm.LLM(
        **_engine_kwargs(target),
        speculative_config={"method": "eagle3", "model": str(checkpoint), "num_speculative_tokens": MAX_DEPTH},
    )
    params = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = [list(o.outputs[0].token_ids) for o in llm.generate(_prompts(), params)]
    metrics = {(m.name): m for m in llm.get_metrics()}
    yield llm, outputs, metrics
    shutdown_engine(llm)


def test_greedy_outputs_identical_to_no_speculation(baseline_outputs, radar_run):
    _, outputs, _ = radar_run
    assert len(outputs) == NUM_PROMPTS
    assert all(len(tokens) == MAX_TOKENS for tokens in outputs)
    mismatched = [i for i, (a, b) in enumerate(zip(baseline_outputs, outputs)) if a != b]
    assert mismatched == []


def test_stop_depths_varied_and_metrics_consistent(radar_run):
    _, _, metrics = radar_run
    depth = metrics["vllm:radar_stop_depth"]
    # Cumulative buckets "1.0".."4.0": the requests stopping exactly at each depth.
    cumulative = [depth.buckets[f"{d}.0"] for d in range(1, MAX_DEPTH + 1)]
    exact = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]
    assert sum(1 for count in exact if count > 0) >= 3, f"stop depths did not vary: {exact}"
    drafts = metrics["vllm:spec_decode_num_drafts"].value
    draft_tokens = metrics["vllm:spec_decode_num_draft_tokens"].value
    accepted = metrics["vllm:spec_decode_num_accepted_tokens"].value
    # Every verified draft is one request-round of the stop-depth histogram, and with the
    # padding dropped vLLM's draft-token counter is the sum of the stop depths.
    assert depth.count == drafts
    assert depth.sum == pytest.approx(draft_tokens)
    assert draft_tokens < MAX_DEPTH * drafts
    acceptance = metrics["vllm:radar_acceptance_length"]
    assert acceptance.count == drafts
    assert acceptance.sum == pytest.approx(drafts + accepted)
    assert accepted > 0
    calls = metrics["vllm:radar_draft_calls"].value
    rounds = metrics["vllm:radar_rounds"].value
    assert rounds > 0
    assert 1 <= calls / rounds <= MAX_DEPTH


def test_greedy_requests_exact_in_a_batch_with_sampled_ones(baseline_outputs, radar_run):
    """Greedy and sampled (temperature, top-p, top-k) requests in one batch: the greedy ones still
    equal no speculation, the sampled ones run. (Before the CPU expand kernel was corrected,
    the sampled requests' settings reached the greedy rows as garbage and this failed.)"""
    llm, _, _ = radar_run
    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    params = [greedy if i % 2 == 0 else
              vllm.SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=MAX_TOKENS, ignore_eos=True, seed=i)
              for i in range(NUM_PROMPTS)]
    outputs = [list(o.outputs[0].token_ids) for o in llm.generate(_prompts(), params)]
    vocab_size = llm.llm_engine.model_config.get_vocab_size()
    assert all(len(tokens) == MAX_TOKENS and all(0 <= t < vocab_size for t in tokens) for tokens in outputs)
    mismatched = [i for i in range(0, NUM_PROMPTS, 2) if outputs[i] != baseline_outputs[i]]
    assert mismatched == []


def test_fixed_depth_drafts_that_many_tokens_every_round(models, baseline_outputs, radar_run):
    """``"radar": {"fixed_depth": 2}``: RADAR's path without the policy, two drafts per round."""
    target, checkpoint = models
    llm = vllm.LLM(**_engine_kwargs(target), speculative_config={
        "method": "radar", "model": str(checkpoint), "radar": {"fixed_depth": 2}})
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outputs = [list(o.outputs[0].token_ids) for o in llm.generate(_prompts(), params)]
        metrics = {(m.name): m for m in llm.get_metrics()}
    finally:
        shutdown_engine(llm)
    assert outputs == baseline_outputs
    drafts = metrics["vllm:spec_decode_num_drafts"].value
    assert drafts > 0
    assert metrics["vllm:spec_decode_num_draft_tokens"].value == 2 * drafts
    assert metrics["vllm:radar_draft_calls"].value == 2 * metrics["vllm:radar_rounds"].value
