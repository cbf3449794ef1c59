"""train-head without vLLM: answers from transformers (gen_engine="hf"), batched target features,
features held in device memory, and a wall-clock training budget (the accelerator path, run here
on the CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiny_models import make_tiny_llama
from radar_vllm.offline.head.pipeline import HeadTrainingConfig, run_pipeline


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("target") / "t", num_layers=4)


def _prompts(count: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (count,), generator=generator)
    return [torch.randint(3, 500, (int(n),), generator=generator).tolist() for n in lengths]


@torch.no_grad()
def _greedy_without_cache(model, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    sequence, answer = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
        answer.append(token)
        sequence.append(token)
        if token in eos:
            break
    return answer


def test_hf_greedy_answers_match_plain_greedy_decoding(target: Path) -> None:
    """Left-padded, batched, cached greedy answers equal a one-sequence loop that recomputes
    everything, and each answer stops after its end-of-sequence token (kept)."""
    from radar_vllm.offline.head.data import HFAnswerer

    answerer = HFAnswerer(str(target), dtype="float32", batch_size=5, seed=0)
    prompts = _prompts(9)
    # Declare as end-of-sequence a token that some greedy answers produce early and others never,
    # so that answers of different lengths share a batch.
    answerer.eos_ids = [-5]
    free = answerer.answer(prompts, 12, 0.0)
    counts = torch.bincount(torch.tensor([a[i] for a in free for i in range(2, 8)]))
    eos = next(int(t) for t in counts.argsort(descending=True) if 0 < sum(int(t) in a for a in free) < len(free))
    answerer.eos_ids = [eos]
    batched = answerer.answer(prompts, 12, 0.0)
    reference = [_greedy_without_cache(answerer.model, p, 12, {eos}) for p in prompts]
    assert batched == reference
    lengths = {len(a) for a in batched}
    assert len(lengths) > 1, "the check needs answers that end at different steps"
    for answer in batched:
        assert eos not in answer[:-1]
        assert len(answer) == 12 or answer[-1] == eos


def test_hf_sampling_follows_the_target_distribution(target: Path) -> None:
    """The first sampled token of many answers to one prompt is distributed as softmax(logits / T)."""
    from radar_vllm.offline.head.data import HFAnswerer

    answerer = HFAnswerer(str(target), dtype="float32", batch_size=4000, seed=3)
    prompt = _prompts(1, seed=7)[0]
    temperature = 3.0  # the tiny target is peaked; this temperature spreads it over ~20 tokens
    with torch.no_grad():
        logits = answerer.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    expected = torch.softmax(logits / temperature, -1)
    first = torch.tensor([a[0] for a in answerer.answer([prompt] * 4000, 1, temperature)])
    observed = torch.bincount(first, minlength=expected.numel()).float() / first.numel()
    def distance(probs: torch.Tensor) -> float:
        return 0.5 * float((observed - probs).abs().sum())

    # 4,000 draws: sampling noise keeps the total variation near 0.02 here; the distributions at
    # temperatures 2 and 4.5, or greedy picking, are 0.15 or more away.
    assert distance(expected) < 0.06, distance(expected)
    for wrong in (torch.softmax(logits / 2.0, -1), torch.softmax(logits / 4.5, -1), torch.nn.functional.one_hot(
            logits.argmax(), logits.numel()).float()):
        assert distance(wrong) > 0.1, distance(wrong)
    again = HFAnswerer(str(target), dtype="float32", batch_size=4000, seed=3)
    assert again.answer([prompt] * 50, 3, temperature) == HFAnswerer(
        str(target), dtype="float32", batch_size=4000, seed=3).answer([prompt] * 50, 3, temperature)


def test_batched_features_equal_one_sequence_at_a_time(target: Path) -> None:
    from radar_vllm.offline.head.feature_cache import AuxHiddenCapture, load_target, target_topk_features_batch

    model = load_target(str(target))
    capture = AuxHiddenCapture(model, [1, 2, 3])
    sequences = _prompts(5, seed=4)
    batched = target_topk_features_batch(model, capture, sequences, 4)
    for sequence, (aux, labels, top_ids, top_logprobs) in zip(sequences, batched):
        aux_1, labels_1, top_ids_1, top_logprobs_1 = target_topk_features_batch(model, capture, [sequence], 4)[0]
        assert aux.shape == (len(sequence), 3 * model.config.hidden_size)
        assert torch.allclose(aux, aux_1, atol=1e-4) and torch.equal(labels, labels_1)
        assert torch.equal(top_ids, top_ids_1) and torch.allclose(top_logprobs, top_logprobs_1, atol=2e-4)
    capture.remove()


def _pipeline_config(target: Path, root: Path, **overrides) -> HeadTrainingConfig:
    values = dict(target=str(target), work_dir=str(root / "w"), num_prompts=8, max_new_tokens=10, shard_size=4,
                  gen_batch=3, aux_layers=[1, 2, 3], sampled_answers=1, gen_dtype="float32", topk_logprobs=4,
                  gen_engine="hf", draft_vocab_size=64, ttt_steps=2, soft_label_weight=1.0, batch_tokens=64,
                  warmup_steps=1, max_seq_len=64, checkpoint_every=1000)
    values.update(overrides)
    return HeadTrainingConfig(**values)


def _save_prompts(work: Path, count: int) -> None:
    from radar_vllm.offline.head.data import PromptRecord, save_prompts

    work.mkdir(parents=True, exist_ok=True)
    save_prompts(work, [PromptRecord(f"p{i}", p) for i, p in enumerate(_prompts(count))])


def test_hf_engine_pipeline_and_wall_budget(tmp_path: Path, target: Path) -> None:
    """generate (hf) -> features -> train on a wall-clock budget -> export, with no vLLM involved;
    the budget holds over a resume, and the engine is a data setting of the work directory."""
    from radar_vllm.offline.head.data import iter_answer_shards
    from radar_vllm.offline.head.trainer import load_head

    _save_prompts(tmp_path / "w", 8)
    config = _pipeline_config(target, tmp_path, output=str(tmp_path / "head"), budget_wall_s=1.5)
    summary = run_pipeline(config)
    shards = list(iter_answer_shards(tmp_path / "w"))
    assert len(shards) == 2 and all(len(r["sampled_output_ids"]) == 1 for _, rs in shards for r in rs)
    assert summary["train"]["steps"] > 0 and summary["train"]["wall_time_s"] >= 1.5
    assert summary["train"]["config"]["gen_engine"] == "hf"
    assert load_head(tmp_path / "head").config.draft_vocab_size == 64
    again = run_pipeline(_pipeline_config(target, tmp_path, budget_wall_s=1.5), ["train"])
    assert again["train"]["steps"] == summary["train"]["steps"]  # the budget is spent
    with pytest.raises(ValueError, match="gen_engine='vllm' differs"):
        run_pipeline(_pipeline_config(target, tmp_path, gen_engine="vllm"), ["generate"])
    with pytest.raises(ValueError, match="both set"):
        run_pipeline(_pipeline_config(target, tmp_path, budget_wall_s=1.0, budget_cpu_s=1.0), ["train"])


def test_unknown_engine_is_refused(tmp_path: Path, target: Path) -> None:
    _save_prompts(tmp_path / "w", 4)
    with pytest.raises(ValueError, match="gen_engine='sglang'"):
        run_pipeline(_pipeline_config(target, tmp_path, num_prompts=4, gen_engine="sglang"), ["generate"])


def test_features_held_in_memory_train_like_the_memory_mapped_ones(tmp_path: Path, target: Path) -> None:
    """The accelerator path gathers batches from tensors held in memory; on the same data and seed
    it takes exactly the optimisation steps of the memory-mapped path."""
    from radar_vllm.offline.head import trainer

    _save_prompts(tmp_path / "w", 4)
    run_pipeline(_pipeline_config(target, tmp_path, num_prompts=4), ["generate", "features"])
    config = _pipeline_config(target, tmp_path, num_prompts=4, max_steps=3)
    mapped = trainer.train(tmp_path / "w", config, tmp_path / "mapped")
    original = trainer.FeatureStore.move_to
    trainer.FeatureStore.move_to = lambda self, device: self.load_resident(device)
    try:
        resident = trainer.train(tmp_path / "w", config, tmp_path / "resident")
    finally:
        trainer.FeatureStore.move_to = original
    assert [round(p["loss"], 6) for p in mapped["loss_curve"]] == [round(p["loss"], 6) for p in resident["loss_curve"]]
    weights = [json.loads((tmp_path / d / "head" / "config.json").read_text()) for d in ("mapped", "resident")]
    assert weights[0] == weights[1]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "mapped" / "head" / "model.safetensors"))
    b = load_file(str(tmp_path / "resident" / "head" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
