"""A seeded sampled request whose prompt is prefilled in chunks: vLLM discards the token sampled
after each chunk that does not end the prompt and rewinds the request's generator with
``Generator.set_offset``, which CPU generators do not have; without the plugin's correction
(:mod:`radar_vllm.vllm.cpu_sampling_fix`) the engine dies, with or without speculation. The request
must finish, and sample what it samples when its prompt is prefilled in one step (the discarded
samples do not consume its random stream): RADAR chain and tree mode, stock EAGLE-3, no speculation."""
from __future__ import annotations

import random

import pytest

from tiny_models import (make_tiny_eagle3_head, make_tiny_llama, make_tiny_radar_checkpoint, scoped_environment,
                         shutdown_engine)

vllm = pytest.importorskip("vllm")

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
PROMPT = [random.Random(5).randrange(3, 500) for _ in range(150)]
NEW_TOKENS = 16


@pytest.fixture(scope="module", autouse=True)
def engine_environment():
    with scoped_environment(ENV):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded_chunks")
    target = make_tiny_llama(root / "target")
    checkpoint = make_tiny_radar_checkpoint(root / "ckpt", target, top_k=3, max_depth=4, skip_drafting="auto")
    return target, checkpoint, make_tiny_eagle3_head(root / "eagle3", target)


def _speculative_config(models, mode: str) -> dict | None:
    _, checkpoint, eagle3 = models
    if mode == "none":
        return None
    if mode == "eagle3":
        return {"method": "eagle3", "model": str(eagle3), "num_speculative_tokens": 2}
    return {"method": "radar", "model": str(checkpoint), "radar": {"mode": mode}}


def _sample(models, mode: str, budget: int) -> list[list[int]]:
    llm = vllm.LLM(model=str(models[0]), dtype="float32", max_model_len=256, block_size=32, enforce_eager=True, seed=0,
                   max_num_seqs=2, max_num_batched_tokens=budget, enable_chunked_prefill=True,
                   speculative_config=_speculative_config(models, mode))
    try:
        params = [vllm.SamplingParams(temperature=1.0, seed=seed, max_tokens=NEW_TOKENS, ignore_eos=True)
                  for seed in (7, 8)]
        results = llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[:40]}], params,
                               use_tqdm=False)
        return [list(result.outputs[0].token_ids) for result in results]
    finally:
        shutdown_engine(llm)


@pytest.mark.parametrize("mode", ["chain", "tree", "eagle3", "none"])
def test_a_seeded_request_prefilled_in_chunks_samples_as_in_one_step(models, mode):
    chunked = _sample(models, mode, budget=64)  # the 150-token prompt takes 3 steps
    whole = _sample(models, mode, budget=512)
    assert [len(tokens) for tokens in chunked] == [NEW_TOKENS, NEW_TOKENS]
    assert chunked == whole
