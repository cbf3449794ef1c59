"""``radar-vllm bench``: RADAR against stock EAGLE-3 and no speculation, on the same prompts.

Without model options it runs on the shipped assets: the SmolLM2 target (converted on first use)
and the shipped RADAR checkpoint. ``--quick`` is a few-minute smoke run; ``--preset report`` is
the committed SmolLM2 report (about an hour on 2 CPU cores, resumable); ``--preset sampling`` the
acceptance table at T = 0, 0.6 and 1; ``--tiny`` uses tiny random models (tests). Library:
:mod:`radar_vllm.bench`.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
from typing import Any, Callable

logger = logging.getLogger(__name__)

NONE_WORDS = ("", "none", "off")
# radar_vllm.bench.settings.PRESETS (not imported here)
PRESET_NAMES = ("quick", "report", "sampling", "gpu-reference")


def _list(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        if text.strip().lower() in NONE_WORDS:
            return ()
        try:
            return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r} ({error})") from error

    return parse


def _optional_float(text: str) -> float | None:
    if text.strip().lower() in NONE_WORDS:
        return None
    return float(text)


def _engine_arg(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--engine-arg takes KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


def default_assets() -> tuple[str, str]:
    """(SmolLM2 folder, shipped RADAR checkpoint): what the benchmark runs without model options."""
    from radar_vllm.offline.assets import ensure_smollm2, shipped_checkpoints
    from radar_vllm.core.config import radar_section, read_head_config

    target = str(ensure_smollm2())
    for path in shipped_checkpoints().values():
        if radar_section(read_head_config(path)) is not None:
            return target, path
    raise FileNotFoundError(
        "no shipped RADAR checkpoint found under radar_vllm/checkpoints/; pass --radar-checkpoint DIR "
        "(build one with `radar-vllm pack`), or use --tiny"
    )


def preset_of(args: argparse.Namespace) -> str | None:
    """The preset asked for: ``--preset NAME``, ``--quick`` (= ``--preset quick``) or None."""
    from radar_vllm.bench.settings import PRESET_QUICK

    if args.quick and args.preset not in (None, PRESET_QUICK):
        raise ValueError(f"--quick is --preset {PRESET_QUICK}; it cannot be combined with --preset {args.preset}")
    return PRESET_QUICK if args.quick else args.preset


def settings_from_args(args: argparse.Namespace) -> Any:
    from radar_vllm.bench.harness import cuda_available, resolve_backend
    from radar_vllm.bench.settings import (
        BACKEND_REFERENCE,
        PRESET_GPU_REFERENCE,
        PRESET_QUICK,
        PRESET_REPORT,
        PRESET_SAMPLING,
        PRESETS,
        SAMPLING_TAG,
        BenchSettings,
        apply_preset,
    )

    explicit: dict[str, Any] = {
        "target": args.target,
        "radar_checkpoint": args.radar_checkpoint,
        "head": args.head,
        "tiny": args.tiny or None,
        "backend": args.backend,
        "k_list": args.k,
        "uncorrected_k": args.uncorrected_k,
        "radar_fixed_depths": args.radar_fixed_depth,
        "include_tree": False if args.no_tree else None,
        "include_static_tree": False if args.no_static_tree else None,
        "only_configs": args.configs,
        "workloads": args.workloads,
        "num_prompts": args.num_prompts,
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_tokens": args.max_prompt_tokens,
        "temperatures": args.temperatures,
        "sampled_workloads": args.sampled_workloads,
        "batch1_prompts": args.batch1_prompts,
        "offline_modes": args.modes,
        "repeats": args.repeats,
        "tree_modes": args.tree_modes,
        "tree_repeats": args.tree_repeats,
        "online_concurrency": args.online_concurrency,
        "online_configs": args.online_configs,
        "online_requests": args.online_requests,
        "online_max_new_tokens": args.online_max_new_tokens,
        "online_temperature": args.online_temperature,
        "online_repeats": args.online_repeats,
        "online_timeout_s": args.online_timeout,
        "dtype": args.dtype,
        "seed": args.seed,
        "kv_cache_gb": args.kv_cache_gb,
        "engine_inline": args.engine_inline,
        "enforce_eager": args.enforce_eager,
        "engine_args": dict(args.engine_arg) if args.engine_arg else None,
        "config_timeout_s": args.config_timeout,
        "time_budget_s": args.time_budget,
        "device": args.device,
        "torch_threads": args.torch_threads,
        "output_dir": args.output_dir,
        "work_dir": args.work_dir,
        "plots": False if args.no_plots else None,
        "resume": False if args.no_resume else None,
    }
    if args.no_confidence:
        explicit["confidence_threshold"] = None
    elif args.confidence_threshold is not None:
        explicit["confidence_threshold"] = args.confidence_threshold
    backend, _ = resolve_backend(args.backend or "auto")
    preset_name = preset_of(args)
    if preset_name is None and backend == BACKEND_REFERENCE and cuda_available():
        preset_name = PRESET_GPU_REFERENCE
    merged = apply_preset(explicit, PRESETS[preset_name] if preset_name else {})
    if args.no_confidence:
        merged["confidence_threshold"] = None
    if merged.get("tiny"):
        merged.setdefault("dtype", "float32")
        merged.setdefault("torch_threads", 1)
    elif not merged.get("target"):
        merged["target"], default_checkpoint = default_assets()
        merged.setdefault("radar_checkpoint", default_checkpoint)
    named = [preset_name] if preset_name in (PRESET_QUICK, PRESET_REPORT, PRESET_SAMPLING) else []
    # the sampling preset on the shipped SmolLM2 assets: sampling_smollm2[-reference]
    smollm2 = preset_name == PRESET_SAMPLING and not merged.get("tiny") and not args.target
    tag = args.tag or "-".join(
        ([SAMPLING_TAG] if smollm2 else ["bench"] + named + (["tiny"] if merged.get("tiny") else []))
        + (["reference"] if backend == BACKEND_REFERENCE else []))
    merged["tag"] = tag
    return BenchSettings(**merged)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    from radar_vllm.bench.harness import run_benchmark

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings_from_args(args)
    if args.estimate:
        from radar_vllm.bench.estimate import estimate_run

        print(estimate_run(settings).summary())
        return 0
    previous = signal.signal(signal.SIGTERM, _interrupt)  # engines and servers are stopped on the way out
    try:
        outputs = run_benchmark(settings)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(outputs.markdown_path.read_text(encoding="utf-8"))
    print(f"results: {outputs.json_path}\ntable:   {outputs.markdown_path}")
    for path in outputs.plot_paths:
        print(f"plot:    {path}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark RADAR against stock EAGLE-3 (best K) and no speculation",
        description="Measure no speculation, stock EAGLE-3 at each K, RADAR (chain, tree), a static "
        "full-depth tree and a confidence-threshold stop on the same prompts: offline (batch 1 and "
        "batched, greedy and T=1) and online (server on loopback). Writes JSON, markdown and plots.",
    )
    models = parser.add_argument_group("models (default: SmolLM2 + the shipped RADAR checkpoint)")
    models.add_argument("--target", help="target model folder (HF format)")
    models.add_argument("--radar-checkpoint", help="RADAR checkpoint (EAGLE-3 head with a radar section)")
    models.add_argument("--head", help="plain EAGLE-3 head for the stock rows (default: the RADAR checkpoint's)")
    models.add_argument("--tiny", action="store_true", help="tiny random models (tests, smoke runs)")
    parser.add_argument("--preset", choices=tuple(PRESET_NAMES), default=None,
                        help="quick: a few minutes on 2 CPU cores (same as --quick); report: the committed "
                        "SmolLM2 report, about an hour on 2 CPU cores (see --estimate); sampling: draft "
                        "acceptance and the sampling check at T = 0, 0.6, 1 (MT-Bench, 16 prompts batched, "
                        "float32; written as sampling_smollm2.json/.md); gpu-reference: the "
                        "reference decoder on a GPU in under 8 minutes (default where vLLM is missing and a GPU "
                        "is present). Options given explicitly override the preset")
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes on 2 CPU cores: MT-Bench turns 1-2, 2 prompts, 32 tokens, K in {1,3}, "
                        "RADAR chain and tree, offline only, in-process engine")
    parser.add_argument("--estimate", action="store_true",
                        help="print the cost-model run time of these settings (2-core CPU, SmolLM2) and exit")
    parser.add_argument("--backend", choices=("auto", "vllm", "reference"), default=None,
                        help="auto: vLLM when installed, else the reference decoder (GPU when present)")
    rows = parser.add_argument_group("configuration rows")
    rows.add_argument("--k", type=_list(int), default=None, help="stock EAGLE-3 K values (default 1..7)")
    rows.add_argument("--uncorrected-k", type=_list(int), default=None,
                      help="stock EAGLE-3 K values also run as shipped, without the radar_vllm plugin "
                      "(VLLM_PLUGINS='', no CPU sampling correction), at T > 0 only: rows eagle3-kK-uncorrected "
                      "(default none; 1 with --preset report; 'none' to leave out)")
    rows.add_argument("--radar-fixed-depth", type=_list(int), default=None, metavar="D[,D...]",
                      help="RADAR chain rows without the stop policy, drafting exactly D tokens every round: "
                      "rows radar-chain-dD (default none; 1 with --preset sampling; 'none' to leave out)")
    rows.add_argument("--configs", type=_list(str), default=None,
                      help="run only these rows (e.g. eagle3-k3,radar-chain); no-spec always runs")
    rows.add_argument("--no-tree", action="store_true", help="leave out the radar-tree row")
    rows.add_argument("--no-static-tree", action="store_true", help="leave out the static-tree row")
    rows.add_argument("--confidence-threshold", type=float, default=None,
                      help="confidence stop: continue while the draft's cumulative probability >= this (default 0.4)")
    rows.add_argument("--no-confidence", action="store_true", help="leave out the confidence-stop row")
    load = parser.add_argument_group("workloads and sampling")
    load.add_argument("--workloads", type=_list(str), default=None,
                      help="mtbench, mtbench-turn2, humaneval, sharegpt (default: all)")
    load.add_argument("--num-prompts", type=int, default=None, help="prompts per workload (default 16)")
    load.add_argument("--max-new-tokens", type=int, default=None, help="default 256")
    load.add_argument("--max-prompt-tokens", type=int, default=None, help="longer prompts are left out (default 1024)")
    load.add_argument("--temperatures", type=_list(float), default=None, help="default 0,1")
    load.add_argument("--sampled-workloads", type=_list(str), default=None,
                      help="workloads also run at T > 0 (default: every workload)")
    load.add_argument("--modes", type=_list(str), default=None, help="batch1,batched (default both)")
    load.add_argument("--batch1-prompts", type=int, default=None,
                      help="batch 1 times the first N prompts of each workload (default: all)")
    load.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 3)")
    load.add_argument("--tree-modes", type=_list(str), default=None,
                      help="offline modes of the tree rows (default: --modes)")
    load.add_argument("--tree-repeats", type=int, default=None, help="repeats of the tree rows (default: --repeats)")
    online = parser.add_argument_group("online serving")
    online.add_argument("--online-concurrency", type=_list(int), default=None,
                        help="concurrency levels (default 1,4,16,64; 'none' to skip)")
    online.add_argument("--online-configs", type=_list(str), default=None,
                        help="rows to serve online (default: no-spec, best EAGLE-3 K, RADAR rows)")
    online.add_argument("--online-requests", type=int, default=None,
                        help="requests per level (default max(2 x concurrency, num prompts))")
    online.add_argument("--online-max-new-tokens", type=int, default=None)
    online.add_argument("--online-temperature", type=float, default=None)
    online.add_argument("--online-repeats", type=int, default=None)
    online.add_argument("--online-timeout", type=float, default=None, help="seconds per level (default 900)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --tiny and --preset sampling)")
    engine.add_argument("--seed", type=int, default=None)
    engine.add_argument("--kv-cache-gb", type=int, default=None, help="VLLM_CPU_KVCACHE_SPACE (default 4)")
    engine.add_argument("--engine-inline", action=argparse.BooleanOptionalAction, default=None,
                        help="engine core in the row's process (faster start, slower steps; default off, on with --quick)")
    engine.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None)
    engine.add_argument("--engine-arg", type=_engine_arg, action="append", default=None, metavar="KEY=VALUE",
                        help="extra vLLM engine argument for every row (JSON value), repeatable")
    engine.add_argument("--config-timeout", type=float, default=None, help="seconds per row (default 3600)")
    engine.add_argument("--time-budget", type=_optional_float, default=None,
                        help="reference backend: stop starting runs after this many seconds")
    engine.add_argument("--device", default=None, help="reference backend device (default: cuda when present)")
    engine.add_argument("--torch-threads", type=int, default=None,
                        help="reference backend: torch threads (default: torch's; 1 with --tiny)")
    out = parser.add_argument_group("outputs")
    out.add_argument("--output-dir", default=None, help="default benchmarks/results")
    out.add_argument("--tag", default=None, help="file name stem (default bench[-quick][-tiny][-reference])")
    out.add_argument("--work-dir", default=None, help="jobs, logs and derived checkpoints (default OUTPUT_DIR/.work-TAG)")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--no-resume", action="store_true",
                     help="run every row again (default: reuse rows and servers the work dir holds finished "
                     "with the same job, so an interrupted run continues where it stopped)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.set_defaults(func=run)
