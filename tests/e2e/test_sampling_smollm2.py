"""Sampled (T > 0) outputs of RADAR on the real model (SmolLM2-135M-Instruct, the shipped RADAR
checkpoint, float32 (bfloat16 matmuls crawl on CPUs without AVX-512), vLLM CPU build) are distributed like no speculation's.

Three engines: no speculation, RADAR chain (``{"method": "radar"}``) and RADAR tree
(``"radar": {"mode": "tree"}``), the RADAR ones with the depth gate off (``skip_drafting:
"never"``: at batch 16 the gate would rarely draft, leaving too few verified rounds to test; depth-0
steps sample as plain steps, tested in test_depth_zero.py). Checks, each at significance 0.001 split over its
comparisons (Bonferroni), so the module fails by chance with probability below about 0.004:

1. Text quality: the target's log-probability per generated token at the sampling temperature
   (:mod:`radar_vllm.bench.sample_quality`) of 32 outputs (16 MT-Bench prompts x 2 seeds, 24
   tokens) has the same mean with speculation as without, at T = 0.6 and T = 1 (Welch z test).
   The broken CPU expand kernel gave -6.1 against -1.0 per token at T = 0.6.
2. First tokens: 4 tokens of 256 seeded requests over 4 prompts at T = 1 have the same
   distribution per position with speculation as without (two-sample chi-square).
3. Acceptance: in chain mode, the number of rounds accepting through each draft position matches
   the exact law computed from the target's logits at that position (one-hot drafts: accept with
   probability p_target); in tree mode the accepted lengths match the tree's exact law.
"""
from __future__ import annotations

from statistics import NormalDist

import pytest

from sampling_stats import (
    chain_law_by_position,
    first_tokens_p_values,
    install_chain_acceptance_recorder,
    tree_law_z,
)

vllm = pytest.importorskip("vllm")

from radar_vllm.offline.assets import ensure_smollm2, shipped_checkpoints  # noqa: E402
from radar_vllm.bench.sample_quality import compare_quality, load_scorer, logprob_per_token  # noqa: E402
from radar_vllm.offline.prompts import load_prompt_set, tokenize_prompts  # noqa: E402
from tiny_models import scoped_environment, shutdown_engine  # noqa: E402

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
TEMPERATURES = (0.6, 1.0)
QUALITY_PROMPTS, QUALITY_SEEDS, QUALITY_TOKENS = 16, 2, 24
CHI2_PROMPTS, CHI2_REQUESTS, CHI2_TOKENS = 4, 256, 4
SPECULATIVE = ("radar-chain", "radar-tree")
ALPHA = 0.001


# every engine here schedules whole prompts (seeded chunked prefill has its own test:
# test_seeded_chunked_prefill.py)


def _speculative_config(name: str) -> dict | None:
    checkpoint = shipped_checkpoints()["smollm2-135m-radar"]
    if name == "radar-chain":
        return {"method": "radar", "model": checkpoint, "radar": {"skip_drafting": "never"}}
    if name == "radar-tree":
        return {"method": "radar", "model": checkpoint, "radar": {"mode": "tree", "skip_drafting": "never"}}
    return None



def _generate(llm, prompts: list[list[int]], temperature: float, max_tokens: int, seed0: int) -> list[list[int]]:
    params = [vllm.SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed0 + i)
              for i in range(len(prompts))]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def runs():
    with scoped_environment(ENV):
        target = ensure_smollm2(progress=False)
        prompts_all = load_prompt_set("mtbench")
        llm = None
        results = {}
        for name in ("no-spec",) + SPECULATIVE:
            llm = vllm.LLM(model=str(target), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                           max_num_seqs=64, max_num_batched_tokens=8192,  # no chunked prefill: see above
                           speculative_config=_speculative_config(name))
            try:
                if name == "no-spec":
                    tokenizer = llm.get_tokenizer()
                    token_ids = tokenize_prompts(tokenizer, prompts_all[:QUALITY_PROMPTS])
                    quality_prompts = [p for p in token_ids for _ in range(QUALITY_SEEDS)]
                    chi2_prompts = [token_ids[i % CHI2_PROMPTS] for i in range(CHI2_REQUESTS)]
                runner_records = None
                if name == "radar-chain":
                    runner_records = llm.collective_rpc(
                        lambda worker: install_chain_acceptance_recorder(worker.model_runner))[0]
                if name == "radar-tree":
                    llm.collective_rpc(lambda worker: setattr(worker.model_runner, "record_acceptance", True))
                # independent seeds per engine: the comparisons are between independent samples
                seed0 = 1_000_000 * (1 + len(results))
                quality = {t: _generate(llm, quality_prompts, t, QUALITY_TOKENS, seed0) for t in TEMPERATURES}
                chi2 = _generate(llm, chi2_prompts, 1.0, CHI2_TOKENS, seed0 + 500_000)
                if name == "radar-chain":
                    records = list(runner_records)
                elif name == "radar-tree":
                    records = llm.collective_rpc(lambda worker: list(worker.model_runner.acceptance_records))[0]
                else:
                    records = None
            finally:
                shutdown_engine(llm)
            results[name] = dict(quality=quality, chi2=chi2, records=records)
        scorer = load_scorer(target)
        for name, result in results.items():
            result["scores"] = {t: logprob_per_token(scorer, quality_prompts, outs, t)
                                for t, outs in result["quality"].items()}
    return results


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", SPECULATIVE)
def test_sampled_text_scores_like_no_speculation(runs, name, temperature):
    comparison = compare_quality(runs["no-spec"]["scores"][temperature], runs[name]["scores"][temperature],
                                 temperature, alpha=ALPHA / (len(SPECULATIVE) * len(TEMPERATURES)))
    # fluent text, not the garbage of a broken verification step
    assert comparison.baseline_mean > -3.0, comparison
    assert not comparison.flagged, comparison


@pytest.mark.parametrize("name", SPECULATIVE)
def test_first_tokens_follow_the_no_speculation_distribution(runs, name):
    p_values = first_tokens_p_values(runs["no-spec"]["chi2"], runs[name]["chi2"], CHI2_TOKENS)
    bound = ALPHA / (len(SPECULATIVE) * CHI2_TOKENS)
    assert min(p_values) > bound, f"{name}: per-position p-values {p_values}"


def test_chain_acceptance_follows_the_exact_law(runs):
    rows = chain_law_by_position(runs["radar-chain"]["records"])
    assert rows and rows[0]["rounds"] > 300, rows
    # the law must have something to say: drafts are sometimes accepted, sometimes not
    assert 0.05 * rows[0]["rounds"] < rows[0]["realized"] < 0.95 * rows[0]["rounds"], rows[0]
    checked = [row for row in rows if row["variance"] >= 5]
    z_bound = NormalDist().inv_cdf(1 - ALPHA / (2 * len(checked)))  # two-sided, Bonferroni over positions
    for row in checked:
        assert abs(row["z"]) < z_bound, row


def test_tree_acceptance_follows_the_exact_law(runs):
    records = runs["radar-tree"]["records"]
    assert len(records) > 200
    expected, realized, z = tree_law_z(records)
    assert realized > 0.1 * len(records), (expected, realized)
    assert abs(z) < 3.29, f"realized {realized} vs expected {expected:.1f} (z={z:.2f})"
