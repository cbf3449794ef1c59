"""Batched greedy generation with stock vLLM, used to regenerate training answers.

vLLM is imported inside the functions only, so importing this module stays cheap.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

logger = logging.getLogger(__name__)


def make_llm(
    model_dir: str,
    max_model_len: int,
    max_num_seqs: int = 128,
    seed: int = 0,
    dtype: str = "bfloat16",
    **kwargs: Any,
) -> Any:
    """A stock ``vllm.LLM`` for ``model_dir`` (CPU or GPU build, whichever is installed)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM

    return LLM(
        model=model_dir,
        tokenizer=model_dir,
        dtype=dtype,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        seed=seed,
        **kwargs,
    )


def greedy_generate_ids(
    llm: Any,
    prompt_token_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    use_tqdm: bool = True,
) -> list[list[int]]:
    """Greedy answers (token ids, EOS included when produced) for each prompt, in order."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    requests = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
    outputs = llm.generate(requests, params, use_tqdm=use_tqdm)
    return [list(output.outputs[0].token_ids) for output in outputs]


def spec_decode_counters(llm: Any) -> dict[str, float]:
    """Sums of vLLM's speculative-decoding counters (drafts, draft tokens, accepted tokens)."""
    totals = {"num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0}
    per_position: list[float] = []
    for metric in llm.get_metrics():
        name = metric.name
        if not name.startswith("vllm:spec_decode_"):
            continue
        key = name[len("vllm:spec_decode_"):]
        if key in totals:
            totals[key] += float(metric.value)
        elif key == "num_accepted_tokens_per_pos" and hasattr(metric, "values"):
            values = [float(v) for v in metric.values]
            if len(per_position) < len(values):
                per_position.extend([0.0] * (len(values) - len(per_position)))
            for index, value in enumerate(values):
                per_position[index] += value
    result: dict[str, Any] = dict(totals)
    result["accepted_per_position"] = per_position
    return result


def timed_greedy_run(
    llm: Any, prompt_token_ids: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int
) -> dict[str, Any]:
    """Greedy generation in batches of ``batch_size`` requests; outputs, token count, seconds."""
    import time

    outputs: list[list[int]] = []
    started = time.perf_counter()
    for start in range(0, len(prompt_token_ids), batch_size):
        outputs.extend(
            greedy_generate_ids(llm, prompt_token_ids[start : start + batch_size], max_new_tokens, use_tqdm=False)
        )
    seconds = time.perf_counter() - started
    tokens = sum(len(o) for o in outputs)
    return {"outputs": outputs, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
