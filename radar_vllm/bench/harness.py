"""One benchmark run, end to end: models -> workloads -> rows -> measurements -> results files.

vLLM backend: each configuration row runs in its own subprocess (:mod:`radar_vllm.bench.engine_process`)
with a fresh engine, one after the other (no-speculation first: its greedy outputs are the match
reference and its MT-Bench answers make the turn-2 prompts). Then the online part starts the
server for no speculation, the best stock EAGLE-3 K (chosen on the first offline cell) and the
RADAR rows. Results are rewritten after every row, so an interrupted run keeps what it measured,
and each row's job and result stay in the work dir: a rerun of the same command reuses every row
and served row that finished with the same job (``resume``) and measures only the rest. One
engine per row serves all its workloads, temperatures and modes.

After each row (its engine gone, nothing timed), this process scores the row's sampled (T > 0)
outputs of the first repeat with the target (:mod:`radar_vllm.bench.sample_quality`), so that the
report flags rows whose outputs are not distributed like no speculation's. Rows with
``plugin_disabled`` (``eagle3-kK-uncorrected``) run with ``VLLM_PLUGINS=""``: vLLM as shipped.

Reference backend (vLLM not importable): everything in this process on the plain PyTorch decoder.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from radar_vllm.bench.configs import (
    EAGLE3_DYNAMIC,
    KIND_EAGLE3,
    KIND_NONE,
    NO_SPEC,
    BenchConfig,
    build_configs,
    tune_dynamic_schedule,
)
from radar_vllm.core.config import HEAD_CONFIG_FILENAME, MODE_TREE, RADAR_SECTION, read_head_config
from radar_vllm.bench.settings import (
    BACKEND_AUTO,
    BACKEND_REFERENCE,
    BACKEND_VLLM,
    GREEDY,
    MODE_BATCH1,
    MODE_BATCHED,
    ONLINE_BEST_EAGLE3,
    BenchSettings,
    temperatures_for,
)
from radar_vllm.bench.workloads import (
    MTBENCH,
    MTBENCH_TURN2,
    Workload,
    load_tokenizer,
    load_workload,
)

logger = logging.getLogger(__name__)

WORKER_MODULE = "radar_vllm.bench.engine_process"
JOB_FILE = "job.json"
RESULT_FILE = "result.json"
SCORES_FILE = "sample_scores.json"  # per row: the target's scores of its sampled outputs
PROGRESS_KEY = "progress_file"  # the job's only key that is not part of what the row measures
ONLINE_FILE_SUFFIX = ".json"
POLL_S = 1.0
EXIT_GRACE_S = 60.0
IOMP_LIBRARY = "libiomp5.so"


# ------------------------------------------------------------------------------ setup
def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def preload_intel_openmp(env: dict[str, str]) -> dict[str, str]:
    """Put the CPU build's recommended OpenMP runtime (Intel's, installed beside the interpreter)
    in front of ``env``'s LD_PRELOAD, once; ``env`` unchanged when it is not installed."""
    iomp = Path(sys.prefix) / "lib" / IOMP_LIBRARY
    if iomp.is_file() and IOMP_LIBRARY not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(filter(None, [str(iomp), env.get("LD_PRELOAD")]))
    return env


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(requested: str) -> tuple[str, str | None]:
    """(backend, note). ``auto``: vLLM when importable, else the reference decoder."""
    if requested == BACKEND_VLLM:
        if not vllm_installed():
            raise RuntimeError("backend 'vllm' requested but vLLM is not installed; use --backend reference")
        return BACKEND_VLLM, None
    if requested == BACKEND_REFERENCE:
        return BACKEND_REFERENCE, "reference decoder requested (--backend reference)"
    if requested != BACKEND_AUTO:
        raise ValueError(f"backend must be auto, vllm or reference, got {requested!r}")
    if vllm_installed():
        return BACKEND_VLLM, None
    where = "GPU" if cuda_available() else "CPU"
    return BACKEND_REFERENCE, (f"vLLM is not installed: the RADAR and fixed-depth rows run on the plain "
                               f"PyTorch reference decoder ({where}, batch 1, offline only)")


@dataclasses.dataclass
class BenchModels:
    target: str
    head: str | None
    radar_checkpoint: str | None
    confidence_checkpoint: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plain_head_view(radar_checkpoint: str | Path, out_dir: str | Path) -> Path:
    """The RADAR checkpoint seen as a plain EAGLE-3 head, for the stock EAGLE-3 rows (with the plugin
    installed, a directory with a radar section always runs as RADAR): ``out_dir`` holds links to
    the checkpoint's top-level files and its config.json without the radar section."""
    radar_checkpoint, out_dir = Path(radar_checkpoint).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = read_head_config(radar_checkpoint)
    config.pop(RADAR_SECTION, None)
    for item in radar_checkpoint.iterdir():
        if item.is_file() and item.name != HEAD_CONFIG_FILENAME:
            link = out_dir / item.name
            link.unlink(missing_ok=True)
            os.symlink(item, link)
    (out_dir / HEAD_CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def prepare_models(settings: BenchSettings, work_dir: Path) -> BenchModels:
    from radar_vllm.bench.confidence import build_confidence_checkpoint

    target = str(Path(settings.target).resolve())
    radar = str(Path(settings.radar_checkpoint).resolve()) if settings.radar_checkpoint else None
    if settings.head:
        head = str(Path(settings.head).resolve())
    else:
        head = str(plain_head_view(radar, work_dir / "plain-head").resolve()) if radar else None
    confidence = None
    if settings.confidence_threshold is not None and radar is not None and settings.include_radar:
        confidence = str(build_confidence_checkpoint(radar, work_dir / "confidence-checkpoint",
                                                     settings.confidence_threshold).resolve())
    return BenchModels(target=target, head=head, radar_checkpoint=radar, confidence_checkpoint=confidence)


def prepare_workloads(settings: BenchSettings, tokenizer: Any) -> list[Workload]:
    """Base workloads (turn 2 is derived later), in the order given."""
    return [
        load_workload(name, tokenizer, settings.num_prompts, settings.max_prompt_tokens)
        for name in settings.workloads
        if name != MTBENCH_TURN2
    ]


def wants_turn2(settings: BenchSettings) -> bool:
    return MTBENCH_TURN2 in settings.workloads and MTBENCH in settings.workloads and GREEDY in settings.temperatures


ENGINE_START_FAILURE = "Engine core initialization failed"  # vLLM's message; such a row is started once more


def subprocess_env(settings: BenchSettings) -> dict[str, str]:
    """Environment of engine processes: KV cache size, Intel OpenMP on CPU, in-process engine."""
    env = dict(os.environ)
    # Triton's interpreter (set for kernel tests) must not reach the engines: they run as users run them.
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gb))
    if not cuda_available():
        preload_intel_openmp(env)
    if settings.engine_inline:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not cuda_available():
        # vllm-cpu 0.32 cannot load the compiled graphs it caches ("Compiling model again due to a load
        # failure") and the recompilation after that failed load sometimes overflows the stack.
        env.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
    return env


def row_env(env: dict[str, str], config: BenchConfig) -> dict[str, str]:
    """The environment of one row's engine: without any vLLM plugin for a ``plugin_disabled`` row."""
    return dict(env, VLLM_PLUGINS="") if config.plugin_disabled else env


def engine_spec(settings: BenchSettings, models: BenchModels, max_num_seqs: int) -> dict[str, Any]:
    return {
        "model": models.target,
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len(),
        "max_num_seqs": max_num_seqs,
        "seed": settings.seed,
        "inline": settings.engine_inline,
        "enforce_eager": settings.enforce_eager,
        "engine_args": ({"block_size": settings.kv_block_size} if settings.kv_block_size else {})
        | dict(settings.engine_args),
    }


# ------------------------------------------------------------------------------ subprocess rows
def _count_lines(path: Path) -> int:
    try:
        with open(path, encoding="utf-8") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=EXIT_GRACE_S)


def _as_json(data: Any) -> Any:
    """``data`` as it reads back from JSON (tuples become lists), for comparisons with stored files."""
    return json.loads(json.dumps(data))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finished_result(row_dir: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    """The stored result of ``job`` in ``row_dir`` when that exact job finished without error, else None."""
    stored_job = _read_json(row_dir / JOB_FILE)
    result = _read_json(row_dir / RESULT_FILE)
    if not isinstance(result, dict) or result.get("error") or not isinstance(stored_job, dict):
        return None
    stored_job.pop(PROGRESS_KEY, None)
    wanted = _as_json({key: value for key, value in job.items() if key != PROGRESS_KEY})
    return result if stored_job == wanted else None


def merge_engine_starts(first: dict[str, Any], later: dict[str, Any], start: int) -> dict[str, Any]:
    """A row's result after another engine start (``start``, from 1) ran its job again: the later
    start's runs join the row's (marked with their ``engine_start``); greedy outputs must be the
    same in every start (else the row's ``outputs_consistent`` turns false for that cell). A start
    that failed fails the row (its error, the runs so far kept)."""
    merged = dict(first)
    if later.get("error"):
        merged["error"] = f"engine start {start + 1}: {later['error']}"
        merged["log_tail"] = later.get("log_tail")
        return merged
    merged["runs"] = ([dict(run, engine_start=run.get("engine_start", 0)) for run in first.get("runs", [])]
                      + [dict(run, engine_start=start) for run in later.get("runs", [])])
    consistent = dict(first.get("outputs_consistent") or {})
    for key, ids in (later.get("outputs") or {}).items():
        if key in consistent:
            consistent[key] = consistent[key] and bool((later.get("outputs_consistent") or {}).get(key, True)) \
                and ids == (first.get("outputs") or {}).get(key)
    merged["outputs_consistent"] = consistent
    merged["radar_metrics_seen"] = bool(first.get("radar_metrics_seen")) or bool(later.get("radar_metrics_seen"))
    merged["wall_seconds"] = float(first.get("wall_seconds") or 0.0) + float(later.get("wall_seconds") or 0.0)
    merged["engine_start_seconds_all"] = (list(first.get("engine_start_seconds_all")
                                               or [first.get("engine_start_seconds")])
                                          + [later.get("engine_start_seconds")])
    return merged


def run_config_subprocess(job: dict[str, Any], row_dir: Path, env: dict[str, str], timeout_s: float,
                          bar: Any, resume: bool = False, units: int = 0) -> dict[str, Any]:
    """Run one row's job in a worker subprocess; returns its result (``error`` set on failure).

    ``resume``: when ``row_dir`` holds a finished result of the same job, return it (marked
    ``resumed``) and advance ``bar`` by ``units`` instead of running the row again.
    """
    row_dir.mkdir(parents=True, exist_ok=True)
    job_path, result_path = row_dir / JOB_FILE, row_dir / RESULT_FILE
    progress_path, log_path = row_dir / "progress.txt", row_dir / "worker.log"
    if resume:
        previous = finished_result(row_dir, job)
        if previous is not None:
            logger.info("row %s: reusing the finished result in %s", job["config"]["name"], row_dir)
            bar.update(units)
            return dict(previous, resumed=True)
    for stale in (result_path, progress_path):
        stale.unlink(missing_ok=True)
    job = dict(job, **{PROGRESS_KEY: str(progress_path)})
    job_path.write_text(json.dumps(job) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", WORKER_MODULE, "--job", str(job_path), "--result", str(result_path)]
    started = time.perf_counter()
    seen = 0
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    timed_out = False
    finished_at: float | None = None
    try:
        while process.poll() is None:
            done = _count_lines(progress_path)
            if done > seen:
                bar.update(done - seen)
                seen = done
            now = time.perf_counter()
            if result_path.is_file() and finished_at is None:
                finished_at = now
            if finished_at is not None and now - finished_at > EXIT_GRACE_S:
                break  # the result is written; engine processes did not exit in time
            if now - started > timeout_s:
                timed_out = True
                break
            time.sleep(POLL_S)
    finally:
        _kill_group(process)  # also on interruption: no engine outlives its row
    done = _count_lines(progress_path)
    if done > seen:
        bar.update(done - seen)
    if result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
    elif timed_out:
        result = {"error": f"timed out after {timeout_s:.0f} s (log: {log_path})"}
    else:
        result = {"error": f"worker exited with code {process.returncode} without a result (log: {log_path})"}
    if result.get("error"):
        from radar_vllm.bench.online import log_tail

        result["log_tail"] = log_tail(log_path)
        logger.error("row %s failed: %s", job["config"]["name"], result["error"])
    result["wall_seconds"] = time.perf_counter() - started
    return result


def row_temperatures(settings: BenchSettings, sampled_only: bool = False) -> list[float]:
    """Temperatures of a row: T > 0 only for a ``sampled_only`` row."""
    return [t for t in settings.temperatures if t > GREEDY or not sampled_only]


def pass_order(num_rows: int, start: int) -> range:
    """Row indices of engine start ``start`` (0-based): in order, every other pass reversed, so
    that a machine whose speed drifts over a pass (seen on the shared VMs: 10-20% over an hour)
    favours no row across two passes."""
    return range(num_rows) if start % 2 == 0 else range(num_rows - 1, -1, -1)


def units_per_row(settings: BenchSettings, workload_names: list[str], tree: bool = False,
                  sampled_only: bool = False) -> int:
    """Timed runs of one row (``tree``: a tree row, with tree_modes / tree_repeats)."""
    per_workload = len(settings.modes_for(tree)) * settings.repeats_for(tree)
    temperatures = row_temperatures(settings, sampled_only)
    return sum(len(temperatures_for(temperatures, settings.sampled_workloads, name)) * per_workload
               for name in workload_names)


def make_job(settings: BenchSettings, config: BenchConfig, models: BenchModels, workloads: list[Workload],
             build_turn2: bool) -> dict[str, Any]:
    max_num_seqs = max([w.num_prompts for w in workloads] + [1])
    tree = config.mode == MODE_TREE
    job: dict[str, Any] = {
        "config": config.to_dict(),
        "engine": engine_spec(settings, models, max_num_seqs),
        "workloads": [w.to_dict() for w in workloads],
        "temperatures": row_temperatures(settings, config.sampled_only),
        "sampled_workloads": list(settings.sampled_workloads),
        "batch1_prompts": settings.batch1_prompts,
        "modes": list(settings.modes_for(tree)),
        "repeats": settings.repeats_for(tree),
        "max_new_tokens": settings.max_new_tokens,
        "seed": settings.seed,
        "warmup": settings.warmup,
    }
    if build_turn2:
        job["build_turn2"] = {"tokenizer": models.target, "max_prompt_tokens": settings.turn2_max_prompt_tokens}
    return job


# ------------------------------------------------------------------------------ sample quality
def make_scorer(target: str, device: str | None = None) -> Callable[[], Any]:
    """The scoring model of :func:`score_sampled`, loaded on the first call only."""
    from radar_vllm.bench.sample_quality import load_scorer

    @functools.lru_cache(maxsize=None)
    def scorer() -> Any:
        model = load_scorer(target)
        return model.to(device) if device else model

    return scorer


def score_sampled(result: dict[str, Any], row_dir: Path, target: str, workloads: Mapping[str, Workload],
                  scorer: Callable[[], Any]) -> None:
    """Score a row's sampled outputs: adds ``scores`` (per output, the target's mean log-prob per
    token at the cell's temperature; None for an empty output) to every entry of
    ``result["sampled_outputs"]``. Scores stored in ``row_dir`` for the same target and outputs are
    reused; ``scorer()`` gives the scoring model (loaded only when something is left to score)."""
    from radar_vllm.bench.sample_quality import logprob_per_token

    entries = result.get("sampled_outputs") or []
    if result.get("error") or not entries:
        return
    scored = [{key: value for key, value in entry.items() if key != "scores"} for entry in entries]
    digest = hashlib.sha256(json.dumps([target, scored], sort_keys=True).encode()).hexdigest()
    stored = _read_json(row_dir / SCORES_FILE)
    if isinstance(stored, dict) and stored.get("digest") == digest:
        scores = stored["scores"]
    else:
        model = scorer()
        scores = []
        for entry in entries:
            prompts = workloads[entry["workload"]].prompt_ids[:len(entry["outputs"])]
            values = logprob_per_token(model, prompts, entry["outputs"], float(entry["temperature"]))
            scores.append([value if math.isfinite(value) else None for value in values])
        write_json(row_dir / SCORES_FILE, {"digest": digest, "scores": scores})
    for entry, values in zip(entries, scores):
        entry["scores"] = values


def score_rows(results: Mapping[str, dict[str, Any]], work_dir: Path, target: str, workloads: list[Workload],
               scorer: Callable[[], Any], notes: list[str]) -> None:
    """:func:`score_sampled` for each row; a row that cannot be scored is noted (its T > 0 cells
    are reported unchecked) and the run goes on."""
    by_name = {w.name: w for w in workloads}
    for name, result in results.items():
        try:
            score_sampled(result, work_dir / "rows" / name, target, by_name, scorer)
        except Exception as error:
            logger.error("row %s: scoring the sampled outputs failed: %s", name, error)
            notes.append(f"{name}: sampled outputs not scored ({type(error).__name__}: {error})")


def dynamic_sd_row(config: BenchConfig, settings: BenchSettings, document: dict[str, Any],
                   max_batch_size: int) -> BenchConfig:
    """The eagle3-dynamic row with its schedule tuned from the finished no-spec and eagle3-kK cells."""
    sizes = {MODE_BATCH1: 1, MODE_BATCHED: max_batch_size}
    schedule = tune_dynamic_schedule(document.get("cells", []), settings.k_list,
                                     {mode: sizes[mode] for mode in settings.offline_modes}, max_batch_size)
    text = ", ".join(f"{first}-{last}: K={k}" for first, last, k in schedule)
    # num_speculative_tokens caps the schedule and sizes the drafter: set it to the schedule's
    # largest K, as a user tuning Dynamic SD would (vLLM needs at least 1).
    top = max(1, max(k for _, _, k in schedule))
    return dataclasses.replace(config, dynamic_schedule=schedule, num_speculative_tokens=top, max_depth=top,
                               description=f"stock EAGLE-3 + Dynamic SD, batch sizes {text} (tuned from the K sweep)")


# ------------------------------------------------------------------------------ online
def _baseline_cell(cell: Mapping[str, Any]) -> bool:
    """A stock EAGLE-3 cell that may be the best-K baseline: run with the plugin, sampling not flagged."""
    return cell["kind"] == KIND_EAGLE3 and not cell.get("plugin_disabled") and not cell.get("sampling_broken")


def best_eagle3_row(document: dict[str, Any]) -> str | None:
    """The best stock EAGLE-3 row on the first offline cell (first workload, temperature, mode)."""
    cells = document.get("cells", [])
    if not cells:
        return None
    first = cells[0]
    key = (first["workload"], first["temperature"], first["mode"])
    eagles = [c for c in cells if _baseline_cell(c) and (c["workload"], c["temperature"], c["mode"]) == key]
    return max(eagles, key=lambda c: c["tokens_per_s"]["median"])["config"] if eagles else None


def online_rows(configs: list[BenchConfig], document: dict[str, Any], results: dict[str, Any],
                only: tuple[str, ...] = ()) -> list[BenchConfig]:
    """Rows served online: ``only`` when given (``eagle3-best``: the best stock EAGLE-3 K), else no-spec,
    the best stock EAGLE-3 K and the RADAR rows (rows that were skipped or failed offline are left out)."""
    best = best_eagle3_row(document)
    chosen = []
    for config in configs:
        if config.skipped or results.get(config.name, {}).get("error"):
            continue
        wanted = (config.name in only or (ONLINE_BEST_EAGLE3 in only and config.name == best)) if only else (
            config.kind == KIND_NONE or config.name == best or config.uses_radar)
        if wanted:
            chosen.append(config)
    return chosen


def online_request(settings: BenchSettings, config: BenchConfig, models: BenchModels,
                   prompts: list[list[int]]) -> dict[str, Any]:
    """What one served row measures: a stored result counts as finished only for the same request."""
    levels = list(settings.online_concurrency)
    return _as_json({
        "config": config.to_dict(),
        "engine": engine_spec(settings, models, max(levels)),
        "levels": levels,
        "requests": [settings.online_requests_for(level) for level in levels],
        "max_tokens": settings.online_max_new_tokens or settings.max_new_tokens,
        "temperature": settings.online_temperature,
        "repeats": settings.online_repeats,
        "prompts": prompts,
        **settings.online_load_options(),
    })


def finished_online(path: Path, request: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The stored levels of ``request`` (every request completed), else None."""
    stored = _read_json(path)
    if not isinstance(stored, dict) or stored.get("request") != request:
        return None
    return [dict(level, resumed=True) for level in stored.get("levels", [])]


def write_json(path: Path, data: Any, indent: int | None = None) -> None:
    """Write ``data`` as JSON through a temporary file (a killed run leaves no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def run_online(settings: BenchSettings, configs: list[BenchConfig], models: BenchModels,
               prompts: list[list[int]], work_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from radar_vllm.bench.online import free_port, measure_server, server_command, start_server, stop_server

    levels = list(settings.online_concurrency)
    starts = settings.online_server_starts
    total = len(configs) * len(levels) * settings.online_repeats * starts
    entries: list[dict[str, Any]] = []
    load = settings.online_load()
    server_env = {k: v for k, v in env.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with tqdm(total=total, desc="online", unit="level") as bar:
        for start, config in ((start, configs[index]) for start in range(starts)
                              for index in pass_order(len(configs), start)):
            label = config.name if start == 0 else f"{config.name}@{start + 1}"
            stored_path = work_dir / "online" / f"{label}{ONLINE_FILE_SUFFIX}"
            request = online_request(settings, config, models, prompts)
            if settings.resume:
                previous = finished_online(stored_path, request)
                if previous is not None:
                    logger.info("online %s: reusing the finished levels in %s", label, stored_path)
                    entries.extend(previous)
                    bar.update(len(levels) * settings.online_repeats)
                    continue
            stored_path.unlink(missing_ok=True)
            port = free_port()
            command = server_command(engine_spec(settings, models, max(levels)), config.speculative_config(),
                                     port, max(levels))
            server = None
            try:
                server = start_server(command, row_env(server_env, config),
                                      work_dir / "online" / f"{label}.log", port, settings.server_start_timeout_s)
                levels_out = measure_server(server, prompts, levels, settings.online_requests_for, load,
                                            settings.online_repeats, on_level=lambda: bar.update(1))
                measured = [dict(level, config=config.name, server_start=start,
                                 server_start_seconds=server.start_seconds) for level in levels_out]
                entries.extend(measured)
                if not any(level["failed"] for level in measured):
                    write_json(stored_path, {"request": request, "levels": measured})
            except Exception as error:  # one row's server failing must not lose the others
                logger.error("online %s failed: %s", label, error)
                entries.append({"config": config.name, "server_start": start, "error": f"{type(error).__name__}: {error}"})
            finally:
                if server is not None:
                    stop_server(server)
    return entries


# ------------------------------------------------------------------------------ estimate
def announce_estimate(settings: BenchSettings, runnable: list[BenchConfig], configs: list[BenchConfig],
                      work_dir: Path, notes: list[str]) -> None:
    """Print the cost-model estimate of what is left to run (rows finished in ``work_dir`` excluded)."""
    from radar_vllm.bench.estimate import estimate_run, planned_online_rows

    finished = []
    for config in runnable if settings.resume else []:
        result = _read_json(work_dir / "rows" / config.name / RESULT_FILE)
        if isinstance(result, dict) and not result.get("error"):
            finished.append(config.name)
    rows = [c.name for c in runnable if c.name not in finished]
    online = planned_online_rows(settings, [c.name for c in configs if not c.skipped])
    estimate = estimate_run(settings, rows=rows, online_rows=online)
    text = estimate.summary()
    if finished:
        text += f"\n  finished rows found in {work_dir} (reused where the job is unchanged): {', '.join(finished)}"
    print(text, file=sys.stderr, flush=True)
    notes.append(f"cost-model estimate at the start (2-core CPU, SmolLM2 defaults): "
                 f"{estimate.total_s / 60:.0f} min for {len(rows)} offline row(s) and {len(online)} served row(s)")


# ------------------------------------------------------------------------------ main
@dataclasses.dataclass
class BenchOutputs:
    json_path: Path
    markdown_path: Path
    plot_paths: list[Path]
    document: dict[str, Any]


def write_outputs(document: dict[str, Any], settings: BenchSettings, plots: bool) -> BenchOutputs:
    from radar_vllm.bench.plots import write_plots
    from radar_vllm.bench.report import render_markdown

    out_dir = Path(settings.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{settings.tag}.json"
    markdown_path = out_dir / f"{settings.tag}.md"
    plot_paths = write_plots(document, out_dir, settings.tag) if plots else []
    write_json(json_path, document, indent=1)
    markdown_path.write_text(render_markdown(document, [p.name for p in plot_paths]) + "\n", encoding="utf-8")
    return BenchOutputs(json_path, markdown_path, plot_paths, document)


def run_benchmark(settings: BenchSettings) -> BenchOutputs:
    """Run every row and write ``TAG.json``, ``TAG.md`` and the plots into ``settings.output_dir``."""
    from tqdm import tqdm

    from radar_vllm.bench.report import build_document, describe_machine, package_versions

    started = time.perf_counter()
    backend, backend_note = resolve_backend(settings.backend)
    notes = [backend_note] if backend_note else []
    work_dir = settings.resolved_work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    models = prepare_models(settings, work_dir)
    tokenizer = load_tokenizer(models.target)
    workloads = prepare_workloads(settings, tokenizer)
    configs = build_configs(
        head=models.head,
        radar_checkpoint=models.radar_checkpoint if settings.include_radar else None,
        k_list=settings.k_list,
        include_radar=settings.include_radar,
        include_tree=settings.include_tree,
        include_static_tree=settings.include_static_tree,
        confidence_checkpoint=models.confidence_checkpoint,
        tree_supported=True if backend == BACKEND_REFERENCE else None,
        only=settings.only_configs,
        uncorrected_k=settings.uncorrected_rows_k if backend == BACKEND_VLLM else (),
        fixed_depths=settings.radar_fixed_depths,
        dynamic_sd=settings.include_dynamic_sd and backend == BACKEND_VLLM,
    )
    if settings.uncorrected_rows_k and backend != BACKEND_VLLM:
        notes.append("uncorrected stock EAGLE-3 rows left out: they are vLLM without the plugin (vLLM backend only)")
    machine, packages = describe_machine(), package_versions()
    runnable = [c for c in configs if not c.skipped]
    for config in configs:
        if config.skipped:
            logger.info("row %s skipped: %s", config.name, config.skip_reason)

    def document_of(results: dict[str, Any], all_workloads: list[Workload], online: list[dict[str, Any]]) -> dict:
        return build_document(
            settings=settings.to_dict(), backend=backend, configs=configs, results=results,
            workloads=[w.to_dict() for w in all_workloads], online=online, models=models.to_dict(), notes=notes,
            machine=machine, packages=packages, wall_seconds=time.perf_counter() - started,
        )

    if backend == BACKEND_REFERENCE:
        from radar_vllm.bench.reference_backend import run_reference_benchmark

        import torch

        deadline = started + settings.time_budget_s if settings.time_budget_s else None
        if settings.batch1_prompts is not None:  # the reference decoder runs batch 1 only
            workloads = [w.head(settings.batch1_prompts) for w in workloads]
        names = [w.name for w in workloads] + ([MTBENCH_TURN2] if wants_turn2(settings) else [])
        total = len(runnable) * settings.repeats * sum(
            len(temperatures_for(settings.temperatures, settings.sampled_workloads, name)) for name in names)
        threads = torch.get_num_threads()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        try:
            with tqdm(total=total, desc="reference decoder", unit="run") as bar:
                results, all_workloads, more_notes = run_reference_benchmark(
                    configs=runnable, target_dir=models.target, head_dir=str(models.head), workloads=workloads,
                    temperatures=settings.temperatures, sampled_workloads=settings.sampled_workloads,
                    repeats=settings.repeats,
                    max_new_tokens=settings.max_new_tokens, seed=settings.seed, dtype=settings.dtype,
                    device=settings.device, confidence_threshold=settings.confidence_threshold, tokenizer=tokenizer,
                    turn2_max_prompt_tokens=settings.turn2_max_prompt_tokens if wants_turn2(settings) else None,
                    deadline=deadline, progress=lambda: bar.update(1),
                )
            scorer = make_scorer(models.target, settings.device or ("cuda" if cuda_available() else None))
            score_rows(results, work_dir, models.target, all_workloads, scorer, notes)
        finally:
            torch.set_num_threads(threads)
        notes.extend(more_notes)
        return write_outputs(document_of(results, all_workloads, []), settings, settings.plots)

    env = subprocess_env(settings)
    results: dict[str, Any] = {}
    all_workloads = list(workloads)
    turn2 = wants_turn2(settings)
    names = [w.name for w in workloads] + ([MTBENCH_TURN2] if turn2 else [])
    starts = settings.engine_starts
    total = starts * sum(units_per_row(settings, names, config.mode == MODE_TREE, config.sampled_only)
                         for config in runnable)
    scorer = make_scorer(models.target)
    announce_estimate(settings, runnable, configs, work_dir, notes)
    if starts > 1:
        notes.append(f"every row ran in {starts} fresh engine processes, the rows in turn (every other pass in "
                     f"reverse order), {settings.repeats} repeat(s) in each (tree rows {settings.repeats_for(True)}); "
                     f"a cell's median is over all of them")
    with tqdm(total=total, desc="offline", unit="run") as bar:
        for start, index in ((start, index) for start in range(starts) for index in pass_order(len(runnable), start)):
            config = runnable[index]
            if start > 0:  # a later engine start of a row that ran before: its runs join the row's
                units = units_per_row(settings, names, config.mode == MODE_TREE, config.sampled_only)
                if config.name not in results or results[config.name].get("error"):
                    bar.total -= units  # a row that failed is not started again
                    continue
                bar.set_postfix_str(f"{config.name} (engine start {start + 1}/{starts})")
                job = make_job(settings, config, models, all_workloads, build_turn2=False)
                result = run_config_subprocess(job, work_dir / "rows" / f"{config.name}@{start + 1}",
                                               row_env(env, config), settings.config_timeout_s, bar,
                                               resume=settings.resume, units=units)
                results[config.name] = merge_engine_starts(results[config.name], result, start)
                write_outputs(document_of(results, all_workloads, []), settings, plots=False)
                continue
            if config.name == EAGLE3_DYNAMIC:  # tuned from the rows before it (no-spec, eagle3-kK)
                config = runnable[index] = dynamic_sd_row(config, settings, document_of(results, all_workloads, []),
                                                          max([w.num_prompts for w in all_workloads] + [1]))
                configs[configs.index(next(c for c in configs if c.name == EAGLE3_DYNAMIC))] = config
            bar.set_postfix_str(config.name)
            is_reference = config.name == NO_SPEC
            tree = config.mode == MODE_TREE
            job = make_job(settings, config, models, all_workloads, build_turn2=turn2 and is_reference)
            row_dir = work_dir / "rows" / config.name
            units = units_per_row(settings, names, tree, config.sampled_only)
            result = run_config_subprocess(job, row_dir, row_env(env, config), settings.config_timeout_s, bar,
                                           resume=settings.resume, units=units)
            if ENGINE_START_FAILURE in str(result.get("error") or "") and not result.get("runs"):
                notes.append(f"{config.name}: the engine failed to start once (see its worker.log); started again")
                result = run_config_subprocess(job, row_dir, row_env(env, config), settings.config_timeout_s, bar,
                                               resume=False, units=units)
            results[config.name] = result
            loaded = result.get("radar_plugin_loaded")
            if config.plugin_disabled and loaded and not result.get("error"):
                result["error"] = ("the radar_vllm plugin was loaded although VLLM_PLUGINS was empty: "
                                   "not vLLM as shipped")
            elif config.is_speculative and not config.plugin_disabled and loaded is False:
                notes.append(f"{config.name}: ran without the radar_vllm plugin (VLLM_PLUGINS excludes 'radar'?), "
                             f"so its T > 0 cells use vLLM's sampled verification as shipped")
            if is_reference:
                derived = [Workload.from_dict(w) for w in result.get("derived_workloads") or []]
                all_workloads.extend(derived)
                if turn2 and not derived:
                    notes.append("MT-Bench turn 2 left out: the no-speculation run gave no turn-2 prompts")
                    names.remove(MTBENCH_TURN2)
                    bar.total -= starts * sum(units_per_row(settings, [MTBENCH_TURN2], c.mode == MODE_TREE, c.sampled_only)
                                     for c in runnable if c.name != NO_SPEC)
            if config.uses_radar and result.get("radar_metrics_seen") is False and not result.get("error"):
                notes.append(f"{config.name}: no RADAR metrics were seen; is the radar_vllm vLLM plugin active?")
            # after the row: its engine is gone, nothing is timed now
            score_rows({config.name: result}, work_dir, models.target, all_workloads, scorer, notes)
            write_outputs(document_of(results, all_workloads, []), settings, plots=False)
    missing_calls = sorted({c["config"] for c in document_of(results, all_workloads, [])["cells"]
                            if c.get("tree_sizes") and c.get("draft_calls_per_round") is None})
    if missing_calls:
        notes.append(f"{', '.join(missing_calls)}: draft calls per round and stop depths of tree rows reach "
                     f"the metrics only with the engine core in-process (--engine-inline)")
    online: list[dict[str, Any]] = []
    if settings.online_concurrency and all_workloads:
        document = document_of(results, all_workloads, [])
        rows = online_rows(configs, document, results, settings.online_configs)
        online = run_online(settings, rows, models, all_workloads[0].prompt_ids, work_dir, env)
    return write_outputs(document_of(results, all_workloads, online), settings, settings.plots)
