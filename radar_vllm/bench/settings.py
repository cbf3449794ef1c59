"""Settings of one benchmark run and the presets (full, ``--quick``, reference decoder on a GPU).

A run measures every configuration row (see :mod:`radar_vllm.bench.configs`) on the same prompts
with the same sampling settings:

- offline: ``LLM.generate`` at batch 1 (one prompt per call) and batched (all prompts at once),
  greedy and T = 1, ``repeats`` times each;
- online: the OpenAI-compatible server on loopback, at each concurrency level, for no
  speculation, the best stock EAGLE-3 K (chosen offline) and the RADAR rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BACKEND_AUTO = "auto"
BACKEND_VLLM = "vllm"
BACKEND_REFERENCE = "reference"
BACKENDS = (BACKEND_AUTO, BACKEND_VLLM, BACKEND_REFERENCE)

MODE_BATCH1 = "batch1"  # one prompt per LLM.generate call
MODE_BATCHED = "batched"  # all prompts of a workload in one LLM.generate call
OFFLINE_MODES = (MODE_BATCH1, MODE_BATCHED)

GREEDY = 0.0
DEFAULT_K_LIST = (1, 2, 3, 4, 5, 6, 7)
DEFAULT_WORKLOADS = ("mtbench", "mtbench-turn2", "humaneval", "sharegpt")
DEFAULT_CONCURRENCY = (1, 4, 16, 64)
# Continue drafting while the chain's (or best frontier node's) cumulative draft probability is at
# least this; the training-free peer of the learned policy.
DEFAULT_CONFIDENCE_THRESHOLD = 0.4
DEFAULT_OUTPUT_DIR = Path("benchmarks") / "results"
# Reference decoder on a GPU: stop starting new runs after this many seconds (whole run < 8 min).
GPU_REFERENCE_TIME_BUDGET_S = 420.0
DRAFT_SLOT_MARGIN = 128  # context kept free for draft tokens beyond the answer
CONTEXT_ROUNDING = 256


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass
class BenchSettings:
    """Everything one ``radar-vllm bench`` run does; built by the CLI or a preset."""

    # models: a target HF folder + a RADAR checkpoint, or tiny random models (tests, smoke runs)
    target: str | None = None
    radar_checkpoint: str | None = None
    head: str | None = None  # plain EAGLE-3 head; default: the RADAR checkpoint without its radar section
    tiny: bool = False
    backend: str = BACKEND_AUTO
    # configuration rows
    k_list: tuple[int, ...] = DEFAULT_K_LIST
    include_radar: bool = True
    include_tree: bool = True
    include_static_tree: bool = True
    confidence_threshold: float | None = DEFAULT_CONFIDENCE_THRESHOLD
    only_configs: tuple[str, ...] = ()  # run only these rows (names), empty: all
    # workloads and sampling
    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    num_prompts: int = 16
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024
    temperatures: tuple[float, ...] = (GREEDY, 1.0)
    offline_modes: tuple[str, ...] = OFFLINE_MODES
    repeats: int = 3
    warmup: bool = True
    # online
    online_concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    online_configs: tuple[str, ...] = ()  # rows served online; empty: no-spec, best EAGLE-3 K, RADAR rows
    online_requests: int | None = None  # per level; None: max(2 * concurrency, num_prompts)
    online_max_new_tokens: int | None = None  # None: max_new_tokens
    online_temperature: float = GREEDY
    online_repeats: int = 1
    online_timeout_s: float = 900.0  # per concurrency level
    server_start_timeout_s: float = 600.0
    # engine
    dtype: str = "bfloat16"
    seed: int = 0
    kv_cache_gb: int = 4  # VLLM_CPU_KVCACHE_SPACE for CPU engines (GiB)
    engine_inline: bool = False  # engine core and worker in the calling process (faster start, slower steps)
    enforce_eager: bool = False
    engine_args: dict[str, Any] = field(default_factory=dict)  # passed to every engine as is
    config_timeout_s: float = 3600.0
    time_budget_s: float | None = None  # reference backend: stop starting runs after this
    device: str | None = None  # reference backend: "cuda" / "cpu"; None: cuda when available
    torch_threads: int | None = None  # reference backend on CPU: torch threads (1 avoids oversubscription)
    # outputs
    output_dir: str = str(DEFAULT_OUTPUT_DIR)
    tag: str = "bench"
    work_dir: str | None = None  # jobs, logs, derived checkpoints; default: OUTPUT_DIR/.work-TAG
    quick: bool = False
    plots: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for k in self.k_list:
            _positive("k_list entries", k)
        for name in ("num_prompts", "max_new_tokens", "max_prompt_tokens", "repeats", "online_repeats"):
            _positive(name, getattr(self, name))
        for level in self.online_concurrency:
            _positive("online_concurrency entries", level)
        if self.online_requests is not None:
            _positive("online_requests", self.online_requests)
        for mode in self.offline_modes:
            if mode not in OFFLINE_MODES:
                raise ValueError(f"offline mode must be one of {OFFLINE_MODES}, got {mode!r}")
        for temperature in (*self.temperatures, self.online_temperature):
            if not isinstance(temperature, (int, float)) or temperature < 0:
                raise ValueError(f"temperatures must be numbers >= 0, got {temperature!r}")
        if self.confidence_threshold is not None and not 0.0 < self.confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must be in (0, 1), got {self.confidence_threshold!r}")
        if not self.tiny and not self.target:
            raise ValueError("target is required (an HF model folder) unless tiny models are requested")
        if not self.tiny and not self.radar_checkpoint and self.include_radar:
            raise ValueError(
                "radar_checkpoint is required for the RADAR rows (a head directory with a radar section); "
                "pass one, or leave the RADAR rows out"
            )
        _positive("kv_cache_gb", self.kv_cache_gb)

    @property
    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output_dir) / f".work-{self.tag}"

    @property
    def turn2_max_prompt_tokens(self) -> int:
        """MT-Bench turn-2 prompts hold turn 1, its answer and turn 2."""
        return self.max_prompt_tokens + self.max_new_tokens

    def max_model_len(self) -> int:
        """Context for the longest request (a turn-2 prompt + its answer + draft slots), rounded up."""
        answer = max(self.max_new_tokens, self.online_max_new_tokens or 0)
        longest = self.turn2_max_prompt_tokens + answer + DRAFT_SLOT_MARGIN
        return ((longest + CONTEXT_ROUNDING - 1) // CONTEXT_ROUNDING) * CONTEXT_ROUNDING

    def online_requests_for(self, concurrency: int) -> int:
        return self.online_requests if self.online_requests is not None else max(2 * concurrency, self.num_prompts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Preset overrides. The CLI applies a preset first, then the options given explicitly.
QUICK_PRESET: dict[str, Any] = {
    "quick": True,
    "k_list": (1, 3),
    "workloads": ("mtbench", "mtbench-turn2"),
    "num_prompts": 2,
    "max_new_tokens": 32,
    "max_prompt_tokens": 256,
    "temperatures": (GREEDY, 1.0),
    "repeats": 3,
    "online_concurrency": (),
    "include_static_tree": False,
    "confidence_threshold": None,
    "engine_inline": True,
    "enforce_eager": True,
    "kv_cache_gb": 1,
    "config_timeout_s": 900.0,
    "include_tree": True,  # rows are listed, and skipped with the reason where unsupported
}

# Reference decoder on a GPU (vLLM not installed there): batch 1 only, sized for < 8 minutes.
GPU_REFERENCE_PRESET: dict[str, Any] = {
    "k_list": DEFAULT_K_LIST,
    "workloads": ("mtbench", "mtbench-turn2", "humaneval", "sharegpt"),
    "num_prompts": 4,
    "max_new_tokens": 128,
    "temperatures": (GREEDY, 1.0),
    "offline_modes": (MODE_BATCH1,),
    "repeats": 3,
    "online_concurrency": (),
    "time_budget_s": GPU_REFERENCE_TIME_BUDGET_S,
}


def apply_preset(base: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the preset's values for every key the caller left unset (None)."""
    merged = dict(preset)
    merged.update({key: value for key, value in base.items() if value is not None})
    return merged
