"""train-head refuses bad inputs before doing any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_models import make_tiny_llama
from radar_vllm.offline.head.pipeline import HeadTrainingConfig, run_pipeline


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("target") / "t", num_layers=4)


def test_wrong_architecture(tmp_path: Path, target: Path) -> None:
    other = tmp_path / "gpt2"
    other.mkdir()
    config = json.loads((target / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        run_pipeline(HeadTrainingConfig(target=str(other), work_dir=str(tmp_path / "w")), stages=())
    assert not (tmp_path / "w").exists()


def test_aux_layer_outside_target(tmp_path: Path, target: Path) -> None:
    with pytest.raises(ValueError, match="aux_layers contains 4"):
        run_pipeline(HeadTrainingConfig(target=str(target), work_dir=str(tmp_path / "w"), aux_layers=[1, 2, 4]), stages=())
    with pytest.raises(ValueError, match="sorted and distinct"):
        run_pipeline(HeadTrainingConfig(target=str(target), work_dir=str(tmp_path / "w"), aux_layers=[2, 1]), stages=())
    assert not (tmp_path / "w").exists()


def test_output_with_other_content(tmp_path: Path, target: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="other content"):
        run_pipeline(HeadTrainingConfig(target=str(target), work_dir=str(tmp_path / "w"), output=str(out)), stages=())
    assert (out / "weights.bin").read_bytes() == b"x"
    assert not (tmp_path / "w").exists()


def test_changed_data_settings_need_a_fresh_work_dir(tmp_path: Path, target: Path) -> None:
    work = tmp_path / "w"
    run_pipeline(HeadTrainingConfig(target=str(target), work_dir=str(work), num_prompts=4, aux_layers=[1, 2, 3]), stages=())
    assert len((work / "prompts.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="max_new_tokens=99"):
        run_pipeline(HeadTrainingConfig(target=str(target), work_dir=str(work), num_prompts=4,
                                        aux_layers=[1, 2, 3], max_new_tokens=99), stages=())


def test_unknown_stage(tmp_path: Path, target: Path) -> None:
    with pytest.raises(ValueError, match="stage='fly'"):
        run_pipeline(HeadTrainingConfig(target=str(target), work_dir=str(tmp_path / "w")), stages=("fly",))


# ----------------------------------------------------------------------------- recipe options


def _write_features(work: Path, target: Path, topk: int, sequences: int = 6, length: int = 24) -> None:
    """A synthetic feature shard (random aux, labels inside a small token subset)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((target / "config.json").read_text())
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    generator = torch.Generator().manual_seed(0)
    total = sequences * length
    subset = torch.arange(10, 10 + 40)
    labels = subset[torch.randint(0, 40, (total,), generator=generator)]
    tensors = {
        "input_ids": torch.randint(0, vocab, (total,), generator=generator).to(torch.int32),
        "labels": labels.to(torch.int32),
        "aux": torch.randn(total, 3 * hidden, generator=generator).to(torch.bfloat16),
        "offsets": torch.arange(0, total + 1, length, dtype=torch.long),
        "prompt_lens": torch.full((sequences,), 4, dtype=torch.int32),
        "answer_kinds": torch.tensor([0, 1] * (sequences // 2), dtype=torch.int8),
    }
    if topk:
        ids = torch.stack([labels] + [subset[torch.randint(0, 40, (total,), generator=generator)] for _ in range(topk - 1)], -1)
        tensors["topk_ids"] = ids.to(torch.int32)
        tensors["topk_logprobs"] = torch.log_softmax(torch.randn(total, topk, generator=generator), -1).sort(-1, descending=True).values
    (work / "features").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(work / "features" / "shard-00000.safetensors"))


def _config(target: Path, work: Path, **overrides) -> HeadTrainingConfig:
    values = dict(target=str(target), work_dir=str(work), aux_layers=[1, 2, 3], draft_vocab_size=64,
                  batch_tokens=48, warmup_steps=1, checkpoint_every=2, max_seq_len=64, threads=1)
    values.update(overrides)
    return HeadTrainingConfig(**values)


def test_soft_labels_need_topk_features(tmp_path: Path, target: Path) -> None:
    from radar_vllm.offline.head.trainer import train

    _write_features(tmp_path / "w", target, topk=0)
    with pytest.raises(ValueError, match="soft_label_weight=0.5 needs top-K"):
        train(tmp_path / "w", _config(target, tmp_path / "w", soft_label_weight=0.5, max_steps=1))


def test_recipe_options_train_resume_and_snapshot(tmp_path: Path, target: Path) -> None:
    import torch

    from radar_vllm.offline.head.replay import replay_metrics
    from radar_vllm.offline.head.trainer import FeatureStore, load_head, train

    work = tmp_path / "w"
    _write_features(work, target, topk=4)
    config = _config(target, work, train_dir=str(tmp_path / "t"), soft_label_weight=0.5, ttt_steps=4, ttt_decay=0.8,
                     grad_clip=0.5, adam_beta2=0.99, lr_schedule="cosine", min_lr_ratio=0.0,
                     init_from_target=True, max_steps=4, snapshot_every=2, stop_after_s=1e-9)
    record = train(work, config, Path(config.train_dir))
    assert record["steps"] == 0  # stop_after_s: left at once, with a checkpoint
    assert (tmp_path / "t" / "checkpoints" / "latest.json").is_file()
    config.stop_after_s = None
    record = train(work, config, Path(config.train_dir))
    assert record["steps"] == 4 and len(record["command_lines"]) == 2
    assert record["data"]["topk_logprobs"] == 4 and record["ttt_steps"] == 4
    assert len(record["loss_curve"][-1]["top1_accuracy"]) == 4
    assert record["draft_vocab_coverage"] == 1.0 and record["draft_vocab_coverage_by_size"] == {}
    assert record["cpu_time_s"] > 0
    assert not (work / "checkpoints").exists()  # everything went to the training directory
    snapshots = sorted(p.name for p in (tmp_path / "t" / "snapshots").iterdir())
    assert snapshots == ["step-0000002", "step-0000004"]
    head = load_head(tmp_path / "t" / "head")
    head.embed_tokens.weight.data.normal_()
    store = FeatureStore(work, 64)
    assert sum(ref.sampled for ref in store.sequences) == 3
    metrics = replay_metrics(head, store, [1, 2])
    assert set(metrics) == {"acceptance_length_t0", "acceptance_length_t1", "first_draft_acceptance_t0",
                            "first_draft_acceptance_t1"}
    assert 0.0 <= metrics["first_draft_acceptance_t0"] <= 1.0
    assert torch.all(head.lm_head.weight.isfinite())


def test_cpu_budget_stops_training(tmp_path: Path, target: Path) -> None:
    from radar_vllm.offline.head.trainer import train

    work = tmp_path / "w"
    _write_features(work, target, topk=0)
    record = train(work, _config(target, work, budget_cpu_s=0.3, checkpoint_every=1000))
    assert 0 < record["steps"] < 10_000 and record["cpu_time_s"] >= 0.3
    again = train(work, _config(target, work, budget_cpu_s=0.3, checkpoint_every=1000))
    assert again["steps"] == record["steps"]  # the budget is spent over all resumes


def test_init_from_target_last_layer(tmp_path: Path, target: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from radar_vllm.offline.head.trainer import _head_config, initial_head

    config = _config(target, tmp_path, init_from_target=True)
    head_config, _ = _head_config(config)
    draft = torch.arange(head_config.draft_vocab_size)
    head = initial_head(config, head_config, draft)
    weights = load_file(str(target / "model.safetensors"))
    hidden = head_config.hidden_size
    q = weights["model.layers.3.self_attn.q_proj.weight"]
    assert torch.equal(head.midlayer.self_attn.q_proj.weight[:, hidden:], q.float())
    assert torch.equal(head.midlayer.mlp.down_proj.weight, weights["model.layers.3.mlp.down_proj.weight"].float())
    assert torch.equal(head.midlayer.hidden_norm.weight, weights["model.layers.3.input_layernorm.weight"].float())
    plain = initial_head(_config(target, tmp_path), head_config, draft)
    assert not torch.equal(plain.midlayer.self_attn.q_proj.weight[:, hidden:], q.float())
    # The token-embedding half is the same seeded initialisation either way.
    assert torch.equal(plain.midlayer.self_attn.q_proj.weight[:, :hidden], head.midlayer.self_attn.q_proj.weight[:, :hidden])


def test_topk_features_are_the_target_distribution(target: Path) -> None:
    import torch

    from radar_vllm.offline.head.feature_cache import AuxHiddenCapture, load_target, target_features, target_topk_features

    model = load_target(str(target))
    capture = AuxHiddenCapture(model, [1, 2, 3])
    sequence = list(range(5, 25))
    aux, labels, top_ids, top_logprobs = target_topk_features(model, capture, sequence, 5)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([sequence])).logits[0].float(), -1)
    assert torch.equal(labels, logprobs.argmax(-1))
    assert torch.allclose(top_logprobs, logprobs.topk(5, -1).values, atol=1e-5)
    assert torch.equal(top_ids[:, 0], labels) and top_ids.shape == (20, 5)
    aux_plain, plain_labels = target_features(model, capture, sequence, prompt_len=20)  # all prompt positions
    assert torch.equal(aux, aux_plain) and torch.equal(plain_labels, labels)
    capture.remove()


def test_init_from_exported_head(tmp_path: Path, target: Path) -> None:
    """A run started from an exported head begins at its weights with its draft vocabulary
    (whatever the new data's token counts), and a head of another vocabulary size is refused."""
    import torch

    from radar_vllm.offline.head.trainer import FeatureStore, _head_config, build_draft_vocab, initial_head, load_head, train

    work = tmp_path / "w"
    _write_features(work, target, topk=0)
    train(work, _config(target, work, max_steps=3), tmp_path / "first")
    exported = load_head(tmp_path / "first" / "head")
    # A different seed and draft vocabulary file would give other weights; the export wins.
    config = _config(target, work, train_dir=str(tmp_path / "second"), seed=7, init_from_head=str(tmp_path / "first" / "head"))
    head_config, _ = _head_config(config)
    store = FeatureStore(work, 64)
    (tmp_path / "second").mkdir()
    ids = build_draft_vocab(tmp_path / "second", store, head_config.vocab_size, 64, config.init_from_head)
    assert torch.equal(ids, exported.draft_to_target_ids(torch.arange(64)))
    head = initial_head(config, head_config, ids)
    for name, tensor in exported.state_dict().items():
        if not name.startswith("embed_tokens"):
            assert torch.equal(head.state_dict()[name], tensor), name
    record = train(work, dataclasses_replace(config, max_steps=2), Path(config.train_dir))
    assert record["steps"] == 2
    with pytest.raises(ValueError, match="draft vocabulary of 64"):
        build_draft_vocab(tmp_path / "third", store, head_config.vocab_size, 32, config.init_from_head)


def dataclasses_replace(config: HeadTrainingConfig, **changes) -> HeadTrainingConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)
