"""Bad RADAR configurations fail while vLLM builds its config, before any engine process starts.

Each case goes through ``EngineArgs.create_engine_config`` (what ``LLM(...)`` and the server do
first) with the plugin loaded from its entry point, and checks the message says what to change.
"""
from __future__ import annotations

import json
import shutil
import time

import pytest
from safetensors.torch import load_file, save_file

from tiny_models import make_random_policy, make_tiny_eagle3_head, make_tiny_llama, make_tiny_radar_checkpoint

vllm = pytest.importorskip("vllm")
from vllm.engine.arg_utils import EngineArgs  # noqa: E402

MAX_DEPTH = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("radar_errors")
    target = make_tiny_llama(root / "target")
    checkpoint = make_tiny_radar_checkpoint(root / "ckpt", target, max_depth=MAX_DEPTH)
    return root, target, checkpoint


def engine_plan(config):
    from radar_vllm.vllm.engine_plan import engine_plan as read_plan

    return read_plan(config)


def _engine_config(target, speculative_config):
    args = EngineArgs(model=str(target), dtype="float32", max_model_len=512, enforce_eager=True,
                      speculative_config=speculative_config)
    return args.create_engine_config()


def _spec(checkpoint, **extra):
    return {"method": "eagle3", "model": str(checkpoint), "num_speculative_tokens": MAX_DEPTH, **extra}


def _copy(checkpoint, destination):
    shutil.copytree(checkpoint, destination)
    return destination


def _edit_radar_section(checkpoint, **changes):
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    config["radar"].update(changes)
    path.write_text(json.dumps(config))


def test_good_config_selects_radar_worker_and_scheduler(tiny):
    _, target, checkpoint = tiny
    config = _engine_config(target, _spec(checkpoint))
    assert config.parallel_config.worker_cls == "radar_vllm.vllm.worker.RadarCPUWorker"
    assert config.scheduler_config.scheduler_cls == "radar_vllm.vllm.scheduler.RadarScheduler"
    assert config.use_v2_model_runner is False
    plan = engine_plan(config)  # what every process of the engine reads
    assert plan.worker_cls == config.parallel_config.worker_cls and plan.radar_scheduler and not plan.tree
    assert plan.radar.config.max_depth == MAX_DEPTH and plan.radar.policy_path.is_absolute()


def test_method_radar_defaults_depth_and_takes_overrides(tiny, monkeypatch):
    _, target, checkpoint = tiny
    monkeypatch.setenv("RADAR_OVERRIDES", '{"threshold": 0.4}')
    config = _engine_config(target, {"method": "radar", "model": str(checkpoint), "radar": {"top_k": 4}})
    speculative = config.speculative_config
    assert speculative.method == "eagle3"
    assert speculative.num_speculative_tokens == MAX_DEPTH
    assert engine_plan(config).radar.config.threshold == 0.4
    assert engine_plan(config).radar.config.top_k == 4


def test_plain_eagle3_head_is_untouched(tiny):
    root, target, _ = tiny
    head = root / "ckpt" / "head"
    config = _engine_config(target, _spec(head))
    assert config.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"
    assert config.scheduler_config.scheduler_cls is None
    with pytest.raises(ValueError, match='no "radar" section'):
        _engine_config(target, {"method": "radar", "model": str(head), "num_speculative_tokens": 2})


def test_missing_policy_file(tiny, tmp_path):
    _, target, checkpoint = tiny
    broken = _copy(checkpoint, tmp_path / "ck")
    (broken / "policy" / "policy.safetensors").unlink()
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"RADAR stop policy not found.*policy\.safetensors"):
        _engine_config(target, _spec(broken))
    assert time.monotonic() - start < 60  # no engine was started


def test_wrong_policy_shape(tiny, tmp_path):
    _, target, checkpoint = tiny
    broken = _copy(checkpoint, tmp_path / "ck")
    shutil.rmtree(broken / "policy")
    make_random_policy(broken / "policy", top_k=3)
    with pytest.raises(ValueError, match=r"takes states of size 3 but radar.top_k=4"):
        _engine_config(target, _spec(broken))
    weights = broken / "policy" / "policy.safetensors"
    tensors = load_file(str(weights))
    tensors["lstm.weight_hh_l0"] = tensors["lstm.weight_hh_l0"][:-4].contiguous()
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"lstm.weight_hh_l0"):
        _engine_config(target, _spec(broken))


def test_head_target_hidden_size_mismatch(tiny, tmp_path):
    root, target, checkpoint = tiny
    mismatched = _copy(checkpoint, tmp_path / "ck")
    wide = make_tiny_eagle3_head(tmp_path / "wide_head", target, target_hidden_size=256)
    for name in ("model.safetensors",):
        shutil.copy(wide / name, mismatched / name)
    config = json.loads((wide / "config.json").read_text())
    config["radar"] = json.loads((checkpoint / "config.json").read_text())["radar"]
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"hidden size 256 .*target model has hidden size 128"):
        _engine_config(target, _spec(mismatched))


def test_out_of_range_option(tiny, tmp_path, monkeypatch):
    _, target, checkpoint = tiny
    broken = _copy(checkpoint, tmp_path / "ck")
    _edit_radar_section(broken, threshold=1.5)
    with pytest.raises(ValueError, match=r"radar.threshold must be a number in \[0, 1\], got 1.5"):
        _engine_config(target, _spec(broken))
    monkeypatch.setenv("RADAR_OVERRIDES", '{"max_depth": 0}')
    with pytest.raises(ValueError, match=r"RADAR_OVERRIDES: radar.max_depth must be >= 1"):
        _engine_config(target, _spec(checkpoint))


def test_inconsistent_num_speculative_tokens(tiny):
    _, target, checkpoint = tiny
    with pytest.raises(ValueError, match=r"num_speculative_tokens=3 but the RADAR checkpoint's max_depth=4.*Set num_speculative_tokens to 4"):
        _engine_config(target, {"method": "eagle3", "model": str(checkpoint), "num_speculative_tokens": 3})


def test_engine_plan_records_tree_options_and_refuses_a_custom_worker(tiny):
    _, target, checkpoint = tiny
    spec = {"method": "radar", "model": str(checkpoint), "radar": {"mode": "tree", "total_tokens": 6}}
    args = EngineArgs(model=str(target), dtype="float32", max_model_len=512, enforce_eager=True,
                      speculative_config=spec, worker_cls="my.Worker")
    with pytest.raises(ValueError, match="remove --worker-cls"):
        args.create_engine_config()
    plan = engine_plan(_engine_config(target, dict(spec, radar=dict(spec["radar"], scratch_blocks=16))))
    assert plan.tree and plan.scratch_blocks == 16 and plan.radar.config.total_tokens == 6
