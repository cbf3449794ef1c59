"""Greedy equality of the shipped checkpoint against no speculation, per dtype.

    python benchmarks/greedy_equality.py {none|eagle3|radar} [--dtype bfloat16|float32] [--out DIR]

Runs 4 MT-Bench-style questions as chat and as plain completions (8 outputs) at batch 1 on the
converted SmolLM2 target with one configuration, and writes the token ids to OUT/<config>-<dtype>.json;
compare the files of two configurations to check equality (see
benchmarks/results/greedy_equality_smollm2.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

QUESTIONS = ("What is the capital of France?", "Write a haiku about the sea.",
             "Explain recursion to a child.", "List three prime numbers and explain why.")
CHECKPOINT = Path(__file__).resolve().parents[1] / "radar_vllm/checkpoints/smollm2-135m-radar"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", choices=("none", "eagle3", "radar"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("greedy_equality"))
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from radar_vllm.offline.assets import ensure_smollm2
    from radar_vllm.bench.main_job import plain_head_view

    spec = None
    if args.config == "eagle3":
        head = plain_head_view(CHECKPOINT, args.out / "plain_head")
        spec = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 7}
    elif args.config == "radar":
        spec = {"method": "radar", "model": str(CHECKPOINT)}
    llm = LLM(model=str(ensure_smollm2(progress=False)), max_model_len=2048, max_num_seqs=1,
              enforce_eager=True, dtype=args.dtype, speculative_config=spec)
    tokenizer = llm.get_tokenizer()
    outputs = []
    for question in QUESTIONS:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
        for prompt, max_tokens in ((chat, 64), (question, 48)):
            result = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))
            outputs.append(list(result[0].outputs[0].token_ids))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.config}-{args.dtype}.json").write_text(json.dumps(outputs))


if __name__ == "__main__":
    main()
