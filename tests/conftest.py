"""Shared test helpers: this folder is on sys.path, so tests import ``tiny_models`` (tiny random
models and checkpoints), the helpers below (``from conftest import ...``) and use its fixtures."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

TINY_TOP_K = 4
TINY_MAX_DEPTH = 4
# `radar-vllm bench` on placeholder model paths: settings only, nothing is loaded
BENCH_CLI = ["bench", "--target", "target", "--radar-checkpoint", "radar", "--backend", "reference"]


# ------------------------------------------------------------------------------ torch threads
@pytest.fixture(scope="module")
def one_torch_thread() -> Any:
    """torch on one thread for the test module (restored afterwards): steadier, fair to other jobs."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------ benchmark models
@pytest.fixture(scope="session")
def tiny_bench_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(target, plain EAGLE-3 head, RADAR checkpoint): a tiny random Llama and a RADAR checkpoint
    for it (top_k 4, max depth 4), built once for the session."""
    from tiny_models import make_tiny_llama, make_tiny_radar_checkpoint

    root = tmp_path_factory.mktemp("tiny-bench-models")
    target = make_tiny_llama(root / "target")
    radar = make_tiny_radar_checkpoint(root / "checkpoints", target, top_k=TINY_TOP_K, max_depth=TINY_MAX_DEPTH)
    return target, root / "checkpoints" / "head", radar


def tiny_bench_args(models: tuple[Path, Path, Path]) -> list[str]:
    """`radar-vllm bench` options for the tiny models, as a user passes them (float32, one thread)."""
    target, _, radar = models
    return ["--target", str(target), "--radar-checkpoint", str(radar), "--dtype", "float32", "--torch-threads", "1"]


def bench_settings(preset: str | None = None, **overrides: Any) -> Any:
    """BenchSettings on placeholder model paths (nothing is loaded); with a ``preset``, the
    overrides that are not None are applied on top of it, as the CLI does."""
    from radar_vllm.bench.settings import PRESETS, BenchSettings, apply_preset

    base = {"target": "target", "radar_checkpoint": "radar", **overrides}
    return BenchSettings(**(apply_preset(base, PRESETS[preset]) if preset else base))


def bench_rows(settings: Any, models: tuple[Path, Path, Path]) -> list[Any]:
    """The configuration rows a run of ``settings`` builds from the tiny checkpoints (the RADAR
    checkpoint stands in for the confidence-stop one; tree mode supported)."""
    from radar_vllm.bench.configs import build_configs

    _, head, radar = models
    return build_configs(head=str(head), radar_checkpoint=str(radar), k_list=settings.k_list,
                         include_tree=settings.include_tree, include_static_tree=settings.include_static_tree,
                         confidence_checkpoint=str(radar) if settings.confidence_threshold is not None else None,
                         tree_supported=True, uncorrected_k=settings.uncorrected_rows_k,
                         fixed_depths=settings.radar_fixed_depths, dynamic_sd=settings.include_dynamic_sd)


# ------------------------------------------------------------------------------ a stand-in vLLM engine
@dataclasses.dataclass
class FakeParams:
    """The fields of vLLM's SamplingParams the benchmark sets."""

    temperature: float
    max_tokens: int
    top_p: float = 1.0
    seed: int | None = None


class FakeLLM:
    """A stand-in ``vllm.LLM``: answers each request with ``answer(request, params)`` (default: the
    prompt's last token ``max_tokens`` times), records ``(requests, temperature)`` per generate call
    and reports ``metrics(number of calls)`` from ``get_metrics``."""

    def __init__(self, answer: Callable[[dict, FakeParams], list[int]] | None = None,
                 metrics: Callable[[int], list[Any]] | None = None) -> None:
        self.answer = answer or (lambda request, params: [request["prompt_token_ids"][-1]] * params.max_tokens)
        self.metrics = metrics or (lambda calls: [])
        self.calls: list[tuple[int, float]] = []

    def get_default_sampling_params(self) -> FakeParams:
        return FakeParams(temperature=0.0, max_tokens=16)

    def get_metrics(self) -> list[Any]:
        return self.metrics(len(self.calls))

    def generate(self, requests: list[dict], params: list[FakeParams], use_tqdm: bool = False) -> list[Any]:
        self.calls.append((len(requests), params[0].temperature if params else 0.0))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=self.answer(request, param))])
                for request, param in zip(requests, params)]


# ------------------------------------------------------------------------------ synthetic rounds
def write_synthetic_rounds(directory: Path, num_rounds: int, *, max_depth: int, state_size: int, seed: int,
                           split: str = "train", **table_options: Any) -> Path:
    """A synthetic round table (:mod:`radar_vllm.offline.rl.synthetic`) written as one shard."""
    from radar_vllm.offline.rl.synthetic import make_synthetic_table
    from radar_vllm.offline.rl.table import write_shard

    table = make_synthetic_table(num_rounds, max_depth=max_depth, state_size=state_size, seed=seed,
                                 **table_options)
    table.metadata.split = split
    write_shard(table, directory)
    return directory


def write_synthetic_costs(path: Path) -> Path:
    """The synthetic cost table as a JSON file."""
    from radar_vllm.core.costs import save_cost_table
    from radar_vllm.offline.rl.synthetic import make_synthetic_costs

    return save_cost_table(make_synthetic_costs(), path)
