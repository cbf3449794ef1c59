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
