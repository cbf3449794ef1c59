"""Settings of one benchmark run and the presets (``main``, ``quick``, ``report``, ``sampling``,
``gpu-reference``).

A run measures every configuration row (see :mod:`radar_vllm.bench.configs`) on the same prompts
with the same sampling settings:

- offline: ``LLM.generate`` at batch 1 (one prompt per call) and batched (all prompts at once),
  greedy and T = 1, ``repeats`` times each;
- online: the OpenAI-compatible server on loopback, at each concurrency level, for no
  speculation, the best stock EAGLE-3 K (chosen offline) and the RADAR rows; optionally under a
  realistic load (``online_sampling``, ``online_disconnect_fraction``, ``online_duration_s``).

Every T > 0 cell also scores its sampled outputs (first repeat) with the target and compares
each speculative row with no speculation (:mod:`radar_vllm.bench.sample_quality`);
``uncorrected_k`` adds stock EAGLE-3 rows run without the plugin (vLLM as shipped, T > 0 only);
``radar_fixed_depths`` adds RADAR chain rows without the stop policy (``radar-chain-dD``).

Narrowing knobs keep a full grid affordable: ``sampled_workloads`` (T > 0 only there),
``batch1_prompts`` (batch 1 times the first N prompts) and ``tree_modes`` / ``tree_repeats``
(the slow tree rows measured less). Without a preset the run is the full grid.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from radar_vllm.bench.configs import EAGLE3_DYNAMIC, NO_SPEC, RADAR_CHAIN, RADAR_TREE
from radar_vllm.bench.workloads import MTBENCH, MTBENCH_TURN2

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
ONLINE_SAMPLING_SINGLE = "single"  # every request at online_temperature
ONLINE_SAMPLING_MIXED = "mixed"  # requests cycle through greedy, T = 0.7 and T = 1 with top-p 0.9
ONLINE_SAMPLINGS = (ONLINE_SAMPLING_SINGLE, ONLINE_SAMPLING_MIXED)
# online load options; a served row's stored result names those that differ from their defaults
ONLINE_LOAD_FIELDS = ("online_sampling", "online_disconnect_fraction", "online_duration_s")
# Continue drafting while the chain's (or best frontier node's) cumulative draft probability is at
# least this; the training-free peer of the learned policy.
DEFAULT_CONFIDENCE_THRESHOLD = 0.4
ONLINE_BEST_EAGLE3 = "eagle3-best"  # in online_configs: the best stock EAGLE-3 row of the offline part
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

    # models: a target HF folder + a RADAR checkpoint
    target: str | None = None
    radar_checkpoint: str | None = None
    head: str | None = None  # plain EAGLE-3 head; default: the RADAR checkpoint without its radar section
    backend: str = BACKEND_AUTO
    # configuration rows
    k_list: tuple[int, ...] = DEFAULT_K_LIST
    include_radar: bool = True
    include_tree: bool = True
    include_static_tree: bool = True
    confidence_threshold: float | None = DEFAULT_CONFIDENCE_THRESHOLD
    only_configs: tuple[str, ...] = ()  # run only these rows (names), empty: all
    # stock EAGLE-3 K values also run as shipped (VLLM_PLUGINS="", no CPU sampling correction), at
    # T > 0 only: rows eagle3-kK-uncorrected (vLLM backend only; none without a temperature > 0)
    uncorrected_k: tuple[int, ...] = ()
    # RADAR chain rows at a fixed depth D (no stop policy, D draft tokens every round): radar-chain-dD
    radar_fixed_depths: tuple[int, ...] = ()
    # stock EAGLE-3 + Dynamic SD (row eagle3-dynamic), its schedule tuned from this run's K sweep
    include_dynamic_sd: bool = True
    # workloads and sampling
    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    num_prompts: int = 16
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024
    temperatures: tuple[float, ...] = (GREEDY, 1.0)
    sampled_workloads: tuple[str, ...] = ()  # workloads also run at T > 0; empty: every workload
    batch1_prompts: int | None = None  # batch 1 times the first N prompts of a workload; None: all
    offline_modes: tuple[str, ...] = OFFLINE_MODES
    repeats: int = 3
    # fresh engine processes per row (vLLM backend): the rows run in turn, each start runs every
    # repeat (a speculative engine's step time varies by up to 8% from one process start to the next)
    engine_starts: int = 1
    # tree rows (radar-tree, static-tree): their own modes and repeats (None: as the other rows)
    tree_modes: tuple[str, ...] | None = None
    tree_repeats: int | None = None
    warmup: bool = True
    # online
    online_concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    # rows served online (ONLINE_BEST_EAGLE3 stands for the best stock EAGLE-3 K); empty: no-spec,
    # the best EAGLE-3 K and the RADAR rows
    online_configs: tuple[str, ...] = ()
    online_requests: int | None = None  # per level; None: max(2 * concurrency, num_prompts)
    online_max_new_tokens: int | None = None  # None: max_new_tokens
    online_temperature: float = GREEDY
    online_sampling: str = ONLINE_SAMPLING_SINGLE  # ONLINE_SAMPLINGS
    online_disconnect_fraction: float = 0.0  # requests (seeded) that close their stream after 2-5 chunks
    online_duration_s: float | None = None  # closed-loop levels of this many seconds; None: online_requests
    online_repeats: int = 1
    online_server_starts: int = 1  # servers per row, started in turn (rows alternate), each runs every level
    online_timeout_s: float = 900.0  # per concurrency level (with online_duration_s: per request, beyond it)
    server_start_timeout_s: float = 600.0
    # engine
    dtype: str = "bfloat16"
    seed: int = 0
    kv_cache_gb: int = 4  # VLLM_CPU_KVCACHE_SPACE for CPU engines (GiB)
    # every engine's KV block size, stock rows included (RADAR engines default to 32-token blocks,
    # which alone make large CPU batches faster): one size for all rows, so that no row's lead is
    # its block size; 0: each engine's own default
    kv_block_size: int = 32
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
    resume: bool = True  # reuse rows and online servers the work dir holds finished with the same job
    quick: bool = False
    plots: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for k in self.k_list:
            _positive("k_list entries", k)
        for k in self.uncorrected_k:
            _positive("uncorrected_k entries", k)
        for depth in self.radar_fixed_depths:
            _positive("radar_fixed_depths entries", depth)
        for name in ("num_prompts", "max_new_tokens", "max_prompt_tokens", "repeats", "online_repeats",
                     "online_server_starts", "engine_starts"):
            _positive(name, getattr(self, name))
        if self.tree_repeats is not None:
            _positive("tree_repeats", self.tree_repeats)
        for level in self.online_concurrency:
            _positive("online_concurrency entries", level)
        if self.online_requests is not None:
            _positive("online_requests", self.online_requests)
        if self.batch1_prompts is not None:
            _positive("batch1_prompts", self.batch1_prompts)
        if MTBENCH_TURN2 in self.workloads and (MTBENCH not in self.workloads or GREEDY not in self.temperatures):
            raise ValueError(
                f"workload {MTBENCH_TURN2!r} is built from the greedy no-speculation answers to {MTBENCH!r} "
                f"turn 1: add {MTBENCH!r} to workloads and 0 to temperatures, or leave {MTBENCH_TURN2!r} out "
                f"(workloads {self.workloads}, temperatures {self.temperatures})"
            )
        for name in self.sampled_workloads:
            if name not in self.workloads:
                raise ValueError(f"sampled_workloads entries must be among workloads {self.workloads}, got {name!r}")
        for mode in (*self.offline_modes, *(self.tree_modes or ())):
            if mode not in OFFLINE_MODES:
                raise ValueError(f"offline mode must be one of {OFFLINE_MODES}, got {mode!r}")
        if self.tree_modes is not None and not self.tree_modes:
            raise ValueError("tree_modes must name at least one offline mode (or be None: as offline_modes)")
        for temperature in (*self.temperatures, self.online_temperature):
            if not isinstance(temperature, (int, float)) or temperature < 0:
                raise ValueError(f"temperatures must be numbers >= 0, got {temperature!r}")
        if self.online_sampling not in ONLINE_SAMPLINGS:
            raise ValueError(f"online_sampling must be one of {ONLINE_SAMPLINGS}, got {self.online_sampling!r}")
        fraction = self.online_disconnect_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise ValueError(f"online_disconnect_fraction must be a number in [0, 1), got {fraction!r}")
        duration = self.online_duration_s
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                     or not duration > 0):
            raise ValueError(f"online_duration_s must be a number of seconds > 0 (or None), got {duration!r}")
        if self.confidence_threshold is not None and not 0.0 < self.confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must be in (0, 1), got {self.confidence_threshold!r}")
        if not self.target:
            raise ValueError("target is required (an HF model folder)")
        if not self.radar_checkpoint and self.include_radar:
            raise ValueError(
                "radar_checkpoint is required for the RADAR rows (a head directory with a radar section); "
                "pass one, or leave the RADAR rows out"
            )
        _positive("kv_cache_gb", self.kv_cache_gb)
        if self.kv_block_size < 0:
            raise ValueError(f"kv_block_size must be >= 0 (0: each engine's default), got {self.kv_block_size}")

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

    @property
    def uncorrected_rows_k(self) -> tuple[int, ...]:
        """K values of the uncorrected rows that run: none without a temperature > 0 (greedy
        decoding does not depend on the correction)."""
        return self.uncorrected_k if any(t > GREEDY for t in self.temperatures) else ()

    def modes_for(self, tree: bool) -> tuple[str, ...]:
        """Offline modes of a row (``tree``: a tree row)."""
        return self.tree_modes if tree and self.tree_modes is not None else self.offline_modes

    def repeats_for(self, tree: bool) -> int:
        return self.tree_repeats if tree and self.tree_repeats is not None else self.repeats

    def batch1_prompts_for(self, num_prompts: int) -> int:
        """Prompts timed at batch 1 of a workload with ``num_prompts`` prompts."""
        return num_prompts if self.batch1_prompts is None else min(self.batch1_prompts, num_prompts)

    def online_requests_for(self, concurrency: int) -> int:
        return self.online_requests if self.online_requests is not None else max(2 * concurrency, self.num_prompts)

    def online_load(self) -> Any:
        """How each online level loads the server (a ``radar_vllm.bench.online.Load``)."""
        from radar_vllm.bench.online import Load

        return Load(max_tokens=self.online_max_new_tokens or self.max_new_tokens, temperature=self.online_temperature,
                    seed=self.seed, timeout_s=self.online_timeout_s, sampling=self.online_sampling,
                    disconnect_fraction=self.online_disconnect_fraction, duration_s=self.online_duration_s)

    def online_load_options(self) -> dict[str, Any]:
        """The online load options that differ from their defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {name: getattr(self, name) for name in ONLINE_LOAD_FIELDS if getattr(self, name) != defaults[name]}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def temperatures_for(temperatures: Sequence[float], sampled_workloads: Sequence[str], workload: str
                     ) -> tuple[float, ...]:
    """Temperatures a workload runs at: greedy always, T > 0 only for ``sampled_workloads`` (empty: all)."""
    if not sampled_workloads or workload in sampled_workloads:
        return tuple(temperatures)
    return tuple(t for t in temperatures if t == GREEDY)


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
    "include_dynamic_sd": False,
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


# The committed report for the shipped SmolLM2 checkpoint on a 2-core CPU: every cell of the
# "always on" goal in one run (`radar-vllm bench --preset report`, about two hours, resumable; see
# `--estimate`):
# - MT-Bench, HumanEval and the ShareGPT held-out split, greedy and T = 1 on each, batch 1 (the
#   first 4 prompts, one at a time) and batched (all 16 in one call), up to 128 new tokens;
# - rows: no speculation, stock EAGLE-3 at K = 1..4 (deeper K never led a cell of this CPU: every
#   draft costs a row at batch 16, and at batch 1 K = 2-3 led), stock Dynamic SD tuned from that
#   sweep, RADAR chain and RADAR tree;
# - every row in 2 fresh engine processes, the rows in turn, the second pass in reverse order (a
#   speculative engine's step time varies between process starts, and this VM's speed drifts by
#   10-20% over an hour), one run in each;
# - served: no speculation, stock Dynamic SD and both RADAR rows at 1, 4, 16 and 64 streams,
#   60 s each, mixed greedy / T = 0.7 / T = 1 top-p 0.9, 20% of clients disconnecting.
REPORT_PRESET: dict[str, Any] = {
    "k_list": (1, 2, 3, 4),
    "include_tree": True,
    "include_static_tree": False,
    "confidence_threshold": None,
    "workloads": ("mtbench", "humaneval", "sharegpt"),
    "num_prompts": 16,
    "batch1_prompts": 4,
    "max_new_tokens": 128,
    "temperatures": (GREEDY, 1.0),
    "sampled_workloads": (),  # T = 1 on every workload
    "offline_modes": OFFLINE_MODES,
    "repeats": 1,
    "engine_starts": 2,
    "tree_modes": OFFLINE_MODES,
    "tree_repeats": 1,
    "online_concurrency": DEFAULT_CONCURRENCY,
    "online_configs": (NO_SPEC, EAGLE3_DYNAMIC, RADAR_CHAIN, RADAR_TREE),
    "online_sampling": ONLINE_SAMPLING_MIXED,
    "online_disconnect_fraction": 0.2,
    "online_duration_s": 60.0,
    "online_max_new_tokens": 128,
    "dtype": "float32",
}

# Acceptance at T = 0, 0.6 and 1 for the shipped SmolLM2 checkpoint (`radar-vllm bench --preset
# sampling`): how often drafts are accepted (accepted / drafted tokens, the first draft position,
# mean acceptance length) and whether the sampled outputs are distributed like no speculation's.
# MT-Bench, 16 prompts batched, one repeat, offline only, float32 (bfloat16 matmuls are very slow
# on CPUs without AVX-512). Rows: no-spec, eagle3-k1 (corrected and as shipped, the latter T > 0
# only), radar-chain, radar-chain-d1 (RADAR's path drafting one token, no policy) and radar-tree.
SAMPLING_PRESET: dict[str, Any] = {
    "k_list": (1,),
    "uncorrected_k": (1,),
    "radar_fixed_depths": (1,),
    "include_dynamic_sd": False,  # acceptance, not speed: the K = 1 row is the stock reference
    "include_tree": True,
    "include_static_tree": False,
    "confidence_threshold": None,
    "workloads": (MTBENCH,),
    "num_prompts": 16,
    "max_new_tokens": 96,
    "temperatures": (GREEDY, 0.6, 1.0),
    "sampled_workloads": (),  # every temperature on every workload
    "offline_modes": (MODE_BATCHED,),
    "repeats": 1,
    "online_concurrency": (),
    "dtype": "float32",
    "config_timeout_s": 900.0,
}
# The main job (`bash benchmarks/run_main.sh` = `radar-vllm bench --preset main`): RADAR chain and
# tree against stock EAGLE-3 at its best K (K = 1, 2, 3) and no speculation on the shipped SmolLM2
# checkpoint, greedy, every output compared with no speculation's; 16 MT-Bench first turns of up
# to 128 tokens in one batch, float32, offline only; every row in 3 fresh engine processes (the rows in
# turn, one run each: a speculative engine's step time varies by up to 8% from one process start to
# the next, which repeats inside one engine do not average out). Sized for 25-45 minutes on 2 CPU
# cores; the console shows one summary table at the end.
MAIN_PRESET: dict[str, Any] = {
    "k_list": (1, 2, 3),
    "include_tree": True,
    "include_static_tree": False,
    "confidence_threshold": None,
    "workloads": (MTBENCH,),
    "num_prompts": 16,
    "max_new_tokens": 128,
    "temperatures": (GREEDY,),
    "offline_modes": (MODE_BATCHED,),
    "repeats": 1,
    "engine_starts": 3,
    "online_concurrency": (),
    "dtype": "float32",
    "config_timeout_s": 1200.0,
}

PRESET_MAIN = "main"
PRESET_QUICK = "quick"
PRESET_REPORT = "report"
PRESET_SAMPLING = "sampling"
PRESET_GPU_REFERENCE = "gpu-reference"
PRESETS: dict[str, dict[str, Any]] = {
    PRESET_MAIN: MAIN_PRESET,
    PRESET_QUICK: QUICK_PRESET,
    PRESET_REPORT: REPORT_PRESET,
    PRESET_SAMPLING: SAMPLING_PRESET,
    PRESET_GPU_REFERENCE: GPU_REFERENCE_PRESET,
}
# file name stems of presets run on the shipped SmolLM2 assets (other presets: bench-PRESET)
SMOLLM2_TAGS = {PRESET_MAIN: "main_smollm2", PRESET_SAMPLING: "sampling_smollm2"}


def apply_preset(base: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the preset's values for every key the caller left unset (None)."""
    merged = dict(preset)
    merged.update({key: value for key, value in base.items() if value is not None})
    return merged
