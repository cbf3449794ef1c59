"""``radar-vllm bench``: RADAR against stock EAGLE-3 and no speculation, on the same prompts.

Without model options it runs on the shipped assets: the SmolLM2 target (converted on first use)
and the shipped RADAR checkpoint. Presets (``--preset NAME``, see :data:`radar_vllm.bench.settings.PRESETS`):
``main`` (the main job: one summary table), ``quick`` (a smoke run, also ``--quick``), ``report``
(the committed SmolLM2 report, resumable), ``sampling`` (acceptance at T = 0, 0.6 and 1) and
``gpu-reference``. Options given explicitly override the preset; their ``dest`` is the
:class:`~radar_vllm.bench.settings.BenchSettings` field they set. Library: :mod:`radar_vllm.bench`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
from typing import Any, Callable

logger = logging.getLogger(__name__)

NONE_WORDS = ("", "none", "off")
# radar_vllm.bench.settings.PRESETS (not imported here)
PRESET_MAIN = "main"  # the main job: its console output is one summary table
PRESET_NAMES = (PRESET_MAIN, "quick", "report", "sampling", "gpu-reference")
ONLINE_SAMPLINGS = ("single", "mixed")  # radar_vllm.bench.settings.ONLINE_SAMPLINGS
NOT_SETTINGS = ("quick", "tag")  # BenchSettings fields the preset or the CLI derives


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
        "no shipped RADAR checkpoint found under radar_vllm/checkpoints/; pass --target DIR and "
        "--radar-checkpoint DIR (build one with `radar-vllm pack`)"
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
        PRESETS,
        SMOLLM2_TAGS,
        BenchSettings,
        apply_preset,
    )

    explicit: dict[str, Any] = {field.name: getattr(args, field.name) for field in dataclasses.fields(BenchSettings)
                                if field.name not in NOT_SETTINGS and hasattr(args, field.name)}
    explicit["engine_args"] = dict(args.engine_args) if args.engine_args else None
    backend, _ = resolve_backend(args.backend or "auto")
    preset_name = preset_of(args)
    if preset_name is None and backend == BACKEND_REFERENCE and cuda_available():
        preset_name = PRESET_GPU_REFERENCE
    merged = apply_preset(explicit, PRESETS[preset_name] if preset_name else {})
    if args.no_confidence:
        merged["confidence_threshold"] = None
    if not merged.get("target"):
        merged["target"], default_checkpoint = default_assets()
        merged.setdefault("radar_checkpoint", default_checkpoint)
    if preset_name in SMOLLM2_TAGS and not args.target:  # a preset on the shipped SmolLM2 assets
        stem = [SMOLLM2_TAGS[preset_name]]
    else:
        stem = ["bench"] + ([preset_name] if preset_name and preset_name != PRESET_GPU_REFERENCE else [])
    merged["tag"] = args.tag or "-".join(stem + (["reference"] if backend == BACKEND_REFERENCE else []))
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
    if preset_of(args) == PRESET_MAIN:
        from radar_vllm.bench.report import render_summary

        print(render_summary(outputs.document))
    else:
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
    parser.add_argument("--preset", choices=tuple(PRESET_NAMES), default=None,
                        help="main: the main job, RADAR chain and tree vs stock EAGLE-3 at its best K (1-3) vs no "
                        "speculation, greedy, 16 MT-Bench prompts in one batch, float32, one summary table "
                        "(main_smollm2.json/.md; 25-45 min on 2 CPU cores); quick: a few minutes on 2 CPU cores "
                        "(same as --quick); report: the committed SmolLM2 report, about an hour on 2 CPU cores "
                        "(see --estimate); sampling: draft acceptance and the sampling check at T = 0, 0.6, 1 "
                        "(MT-Bench, 16 prompts batched, float32; sampling_smollm2.json/.md); gpu-reference: the "
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
    rows.add_argument("--k", dest="k_list", type=_list(int), default=None, help="stock EAGLE-3 K values (default 1..7)")
    rows.add_argument("--uncorrected-k", type=_list(int), default=None,
                      help="stock EAGLE-3 K values also run as shipped, without the radar_vllm plugin "
                      "(VLLM_PLUGINS='', no CPU sampling correction), at T > 0 only: rows eagle3-kK-uncorrected "
                      "(default none; 1 with --preset report; 'none' to leave out)")
    rows.add_argument("--radar-fixed-depth", dest="radar_fixed_depths", type=_list(int), default=None,
                      metavar="D[,D...]", help="RADAR chain rows without the stop policy, drafting exactly D tokens "
                      "every round: rows radar-chain-dD (default none; 1 with --preset sampling; 'none' to leave out)")
    rows.add_argument("--configs", dest="only_configs", type=_list(str), default=None,
                      help="run only these rows (e.g. eagle3-k3,radar-chain); no-spec always runs")
    rows.add_argument("--no-tree", dest="include_tree", action="store_const", const=False, default=None,
                      help="leave out the radar-tree row")
    rows.add_argument("--no-dynamic-sd", dest="include_dynamic_sd", action="store_const", const=False,
                      default=None, help="leave out the eagle3-dynamic row (stock Dynamic SD tuned from the K sweep)")
    rows.add_argument("--no-static-tree", dest="include_static_tree", action="store_const", const=False,
                      default=None, help="leave out the static-tree row")
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
    load.add_argument("--modes", dest="offline_modes", type=_list(str), default=None,
                      help="batch1,batched (default both)")
    load.add_argument("--batch1-prompts", type=int, default=None,
                      help="batch 1 times the first N prompts of each workload (default: all)")
    load.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 3)")
    load.add_argument("--engine-starts", type=int, default=None,
                      help="fresh engine processes per row, rows in turn (every other pass reversed), "
                           "--repeats in each (default 1)")
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
    online.add_argument("--online-temperature", type=float, default=None,
                        help="temperature of every request with --online-sampling single (default 0)")
    online.add_argument("--online-sampling", choices=ONLINE_SAMPLINGS, default=None,
                        help="single: every request at --online-temperature (default); mixed: requests cycle "
                        "through greedy, T=0.7 and T=1 with top-p 0.9, each with its own seed")
    online.add_argument("--online-disconnect-fraction", type=float, default=None, metavar="F",
                        help="fraction in [0, 1) of the requests (chosen from --seed) that close their stream "
                        "after 2-5 streamed chunks, counted as disconnected (default 0)")
    online.add_argument("--online-duration", "--online-duration-s", dest="online_duration_s",
                        type=_optional_float, default=None, metavar="SECONDS",
                        help="closed-loop levels: the level's c clients each send their next request when the "
                        "previous one ends, for this many seconds; requests in flight then finish and count "
                        "(default: --online-requests requests per level)")
    online.add_argument("--online-repeats", type=int, default=None)
    online.add_argument("--online-server-starts", type=int, default=None, metavar="N",
                        help="start every online row's server N times, the rows in turn (every other pass "
                        "reversed), each running every level (a speculative engine's step time varies between "
                        "process starts); the report gives each level's median and spread over them (default 1)")
    online.add_argument("--online-timeout", dest="online_timeout_s", type=float, default=None,
                        help="seconds per level (default 900); with --online-duration: per request, and per "
                        "level beyond the duration")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--dtype", default=None,
                        help="default bfloat16 (float32 with --preset main and --preset sampling)")
    engine.add_argument("--seed", type=int, default=None)
    engine.add_argument("--kv-cache-gb", type=int, default=None, help="VLLM_CPU_KVCACHE_SPACE (default 4)")
    engine.add_argument("--kv-block-size", type=int, default=None,
                        help="KV block size of every engine, stock rows included (default 32, RADAR's own "
                             "default: the comparison then does not credit speculation with the block size; "
                             "0: each engine's default)")
    engine.add_argument("--engine-inline", action=argparse.BooleanOptionalAction, default=None,
                        help="engine core in the row's process (faster start, slower steps; default off, on with --quick)")
    engine.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None)
    engine.add_argument("--engine-arg", dest="engine_args", type=_engine_arg, action="append", default=None,
                        metavar="KEY=VALUE", help="extra vLLM engine argument for every row (JSON value), repeatable")
    engine.add_argument("--config-timeout", dest="config_timeout_s", type=float, default=None,
                        help="seconds per row (default 3600)")
    engine.add_argument("--time-budget", dest="time_budget_s", type=_optional_float, default=None,
                        help="reference backend: stop starting runs after this many seconds")
    engine.add_argument("--device", default=None, help="reference backend device (default: cuda when present)")
    engine.add_argument("--torch-threads", type=int, default=None,
                        help="reference backend: torch threads (default: torch's)")
    out = parser.add_argument_group("outputs")
    out.add_argument("--output-dir", default=None, help="default benchmarks/results")
    out.add_argument("--tag", default=None,
                     help="file name stem (default bench[-PRESET][-reference]; main_smollm2 and sampling_smollm2 "
                     "for those presets on the shipped assets)")
    out.add_argument("--work-dir", default=None, help="jobs, logs and derived checkpoints (default OUTPUT_DIR/.work-TAG)")
    out.add_argument("--no-plots", dest="plots", action="store_const", const=False, default=None)
    out.add_argument("--no-resume", dest="resume", action="store_const", const=False, default=None,
                     help="run every row again (default: reuse rows and servers the work dir holds finished "
                     "with the same job, so an interrupted run continues where it stopped)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.set_defaults(func=run)
