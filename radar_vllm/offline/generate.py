"""vLLM engines for the offline tools and the benchmark: make one, generate greedily, stop it.

vLLM is imported inside the functions only, so importing this module stays cheap.
"""
from __future__ import annotations

import gc
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


def shutdown_engine(llm: Any) -> None:
    """Stop a ``vllm.LLM``'s engine core now and free it (for several engines in one process)."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    del llm
    gc.collect()
