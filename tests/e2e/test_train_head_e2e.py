"""train-head end to end on a tiny random target: vLLM regenerates the answers (greedy and one
sampled at T = 1 per prompt), the features keep the target's top-4 log-probs, the head trains a
few steps with soft labels, resumes, exports; then stock vLLM loads the head with "method": "eagle3"."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tiny_models import make_tiny_llama
from radar_vllm.offline.head.data import read_jsonl
from radar_vllm.offline.head.pipeline import HeadTrainingConfig, run_pipeline

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
NUM_PROMPTS = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[HeadTrainingConfig, dict]:
    root = tmp_path_factory.mktemp("train_head")
    target = make_tiny_llama(root / "target")
    config = HeadTrainingConfig(
        target=str(target), work_dir=str(root / "work"), output=str(root / "head"),
        num_prompts=NUM_PROMPTS, shard_size=4, max_prompt_tokens=96, max_new_tokens=16, gen_batch=8,
        aux_layers=[1, 2, 3], draft_vocab_size=128, max_steps=4, checkpoint_every=2,
        batch_tokens=512, warmup_steps=2, learning_rate=1e-3,
        sampled_answers=1, topk_logprobs=4, soft_label_weight=0.5,
    )
    summary = run_pipeline(config)
    return config, summary


def test_pipeline_writes_data_checkpoints_and_export(trained) -> None:
    config, summary = trained
    work = Path(config.work_dir)
    assert summary["answer_tokens_made"] > 0 and summary["feature_tokens_made"] > 0
    answers = read_jsonl(work / "answers" / "shard-00000.jsonl") + read_jsonl(work / "answers" / "shard-00001.jsonl")
    assert len(answers) == NUM_PROMPTS and all(r["output_ids"] for r in answers)
    assert all(len(r["sampled_output_ids"]) == 1 for r in answers)
    assert any(r["sampled_output_ids"][0] != r["output_ids"] for r in answers)
    record = summary["train"]
    assert record["steps"] == 4 and [p["step"] for p in record["loss_curve"]] == [2, 4]
    assert record["data"]["sequences"] == 2 * NUM_PROMPTS and record["data"]["topk_logprobs"] == 4
    head = Path(summary["output"])
    assert {p.name for p in head.iterdir()} == {"config.json", "model.safetensors", "training_record.json"}
    assert json.loads((head / "config.json").read_text())["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]


def test_rerun_resumes_without_redoing_data(trained) -> None:
    config, _ = trained
    config.max_steps = 6
    summary = run_pipeline(config, stages=("generate", "features", "train"))
    assert summary["answer_tokens_made"] == 0 and summary["feature_tokens_made"] == 0
    assert summary["train"]["steps"] == 6
    assert len(summary["train"]["command_lines"]) == 2


def test_stock_vllm_generates_with_the_trained_head(trained) -> None:
    from radar_vllm.bench.snapshots import NUM_DRAFT_TOKENS, NUM_DRAFTS, snapshot_from_metrics
    from radar_vllm.offline.generate import greedy_generate_ids, make_llm

    config, summary = trained
    answers = read_jsonl(Path(config.work_dir) / "answers" / "shard-00000.jsonl")
    llm = make_llm(
        config.target, max_model_len=256, max_num_seqs=4, disable_log_stats=False,
        speculative_config={"method": "eagle3", "model": summary["output"], "num_speculative_tokens": 2},
    )
    outputs = greedy_generate_ids(llm, [r["prompt_ids"] for r in answers], config.max_new_tokens, use_tqdm=False)
    # Greedy speculative decoding reproduces the target's own greedy answers.
    assert outputs == [r["output_ids"] for r in answers]
    counters = snapshot_from_metrics(llm.get_metrics())
    assert counters.counter(NUM_DRAFTS) > 0
    assert counters.counter(NUM_DRAFT_TOKENS) == 2 * counters.counter(NUM_DRAFTS)
