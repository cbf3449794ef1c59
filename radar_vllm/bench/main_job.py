"""The main job: RADAR vs stock EAGLE-3 (same head, fixed depth) vs no speculation, offline vLLM.

    python benchmarks/main_job.py --checkpoint DIR        # any RADAR checkpoint for the target
    python benchmarks/main_job.py                         # the shipped SmolLM2 RADAR checkpoint
    python benchmarks/main_job.py --tiny                  # tiny random models, a quick smoke run

(``benchmarks/main_job.py`` is a thin launcher of this module, which lives here because it drives
vLLM.)

Runs ``LLM.generate`` (greedy) on MT-Bench first turns with the chat template, once per method,
each on a fresh engine in this process, and prints one table: output tokens/s, mean acceptance
length (1 + accepted / drafts, from vLLM's metrics), draft calls per round (stock EAGLE-3: its
fixed depth; RADAR: from the plugin's metrics), mean RADAR stop depth, and whether the greedy
outputs equal the no-speculation outputs. CPU by default (whatever vLLM build is installed).
Stock EAGLE-3 runs the checkpoint's head through a view without the "radar" section.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("main_job")

METHOD_NONE = "none"
METHOD_EAGLE3 = "eagle3"
METHOD_RADAR = "radar"
METHOD_RADAR_TREE = "radar-tree"  # the same checkpoint in tree mode (its tree policy when it has one)
METHODS = (METHOD_NONE, METHOD_EAGLE3, METHOD_RADAR, METHOD_RADAR_TREE)
DEFAULT_METHODS = (METHOD_NONE, METHOD_EAGLE3, METHOD_RADAR)


@dataclass
class MethodResult:
    method: str
    seconds: float
    output_tokens: int
    tokens_per_s: float
    mean_acceptance_length: float | None = None
    draft_calls_per_round: float | None = None
    mean_stop_depth: float | None = None
    mean_tree_size: float | None = None  # verified draft nodes per request-round
    outputs_match: str = "-"
    metrics: dict[str, float] = field(default_factory=dict)


def plain_head_view(checkpoint: Path, directory: Path) -> Path:
    """A directory that is ``checkpoint`` without its "radar" section (weights symlinked)."""
    directory.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        if item.name == "config.json":
            config = json.loads(item.read_text())
            config.pop("radar", None)
            (directory / "config.json").write_text(json.dumps(config, indent=2))
        elif item.is_file():
            (directory / item.name).symlink_to(item.resolve())
    return directory


def find_shipped_checkpoint() -> Path:
    from radar_vllm.offline.assets import shipped_checkpoints

    for path in shipped_checkpoints().values():
        if "radar" in json.loads((Path(path) / "config.json").read_text()):
            return Path(path)
    raise SystemExit(
        "no RADAR checkpoint is shipped under radar_vllm/checkpoints/ yet; pass --checkpoint DIR "
        "(make one with `radar-vllm pack HEAD_DIR POLICY OUT_DIR`)"
    )


def load_prompts(target: Path, num_prompts: int, tiny: bool) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target))
    if tiny:
        texts = [f"Question {i}: tell me about " + "the sea and the sky " * (i % 5) for i in range(num_prompts)]
        messages = [[{"role": "user", "content": text}] for text in texts]
    else:
        from radar_vllm.offline.prompts import load_mtbench

        messages = [list(prompt.messages) for prompt in load_mtbench()[:num_prompts]]
    return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]


def _metric_values(llm: Any) -> dict[str, float]:
    values: dict[str, float] = {}
    for metric in llm.get_metrics():
        if metric.name.startswith(("vllm:spec_decode", "vllm:radar")):
            if hasattr(metric, "value"):
                values[metric.name] = values.get(metric.name, 0.0) + float(metric.value)
            elif hasattr(metric, "count"):
                values[metric.name + ":count"] = values.get(metric.name + ":count", 0.0) + metric.count
                values[metric.name + ":sum"] = values.get(metric.name + ":sum", 0.0) + metric.sum
    return values


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def run_method(
    method: str,
    target: Path,
    checkpoint: Path,
    plain_head: Path,
    prompts: list[str],
    args: argparse.Namespace,
    max_depth: int,
) -> tuple[MethodResult, list[list[int]]]:
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(
        model=str(target),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        seed=0,
        disable_log_stats=False,
        enforce_eager=args.enforce_eager,
    )
    if method == METHOD_EAGLE3:
        kwargs["speculative_config"] = {"method": "eagle3", "model": str(plain_head), "num_speculative_tokens": max_depth}
    elif method == METHOD_RADAR:
        kwargs["speculative_config"] = {"method": "eagle3", "model": str(checkpoint), "num_speculative_tokens": max_depth}
    elif method == METHOD_RADAR_TREE:
        kwargs["speculative_config"] = {"method": "radar", "model": str(checkpoint), "radar": {"mode": "tree"}}
    llm = LLM(**kwargs)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up
        before = _metric_values(llm)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        after = _metric_values(llm)
    finally:
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        gc.collect()
    tokens = [list(output.outputs[0].token_ids) for output in outputs]
    num_tokens = sum(len(t) for t in tokens)
    result = MethodResult(method=method, seconds=seconds, output_tokens=num_tokens, tokens_per_s=num_tokens / seconds)
    drafts = _delta(after, before, "vllm:spec_decode_num_drafts")
    if method != METHOD_NONE and drafts > 0:
        accepted = _delta(after, before, "vllm:spec_decode_num_accepted_tokens")
        result.mean_acceptance_length = 1.0 + accepted / drafts
        result.draft_calls_per_round = float(max_depth)
    if method in (METHOD_RADAR, METHOD_RADAR_TREE):
        rounds = _delta(after, before, "vllm:radar_rounds")
        if rounds > 0:
            result.draft_calls_per_round = _delta(after, before, "vllm:radar_draft_calls") / rounds
        requests = _delta(after, before, "vllm:radar_stop_depth:count")
        if requests > 0:
            result.mean_stop_depth = _delta(after, before, "vllm:radar_stop_depth:sum") / requests
        verified = _delta(after, before, "vllm:radar_tree_size:count")
        if verified > 0:
            result.mean_tree_size = _delta(after, before, "vllm:radar_tree_size:sum") / verified
    result.metrics = {name: _delta(after, before, name) for name in after}
    return result, tokens


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: list[MethodResult]) -> str:
    header = ("| method | tokens/s | mean acceptance length | draft calls per round | mean stop depth "
              "| mean tree size | greedy outputs match no-spec |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(
            f"| {r.method} | {r.tokens_per_s:.1f} | {_fmt(r.mean_acceptance_length)} | "
            f"{_fmt(r.draft_calls_per_round)} | {_fmt(r.mean_stop_depth)} | {_fmt(r.mean_tree_size)} | "
            f"{r.outputs_match} |"
        )
    return "\n".join(lines)


def build_tiny(root: Path) -> tuple[Path, Path]:
    from tiny_models import make_tiny_llama, make_tiny_radar_checkpoint

    target = make_tiny_llama(root / "target")
    return target, make_tiny_radar_checkpoint(root / "ckpt", target, max_depth=4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="RADAR checkpoint (default: the shipped one)")
    parser.add_argument("--target", type=Path, default=None, help="target HF folder (default: converted SmolLM2)")
    parser.add_argument("--tiny", action="store_true", help="tiny random target + checkpoint (smoke run)")
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=16, help="engine batch size")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    parser.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {METHODS}")
    workdir = Path(tempfile.mkdtemp(prefix="radar_main_job_"))
    try:
        return _run(args, methods, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, methods: list[str], workdir: Path) -> int:
    if args.tiny:
        target, checkpoint = build_tiny(workdir)
        args.dtype = "float32"
        args.max_model_len = min(args.max_model_len, 512)
        args.max_tokens = min(args.max_tokens, 32)
        args.ignore_eos = True
    else:
        checkpoint = args.checkpoint or find_shipped_checkpoint()
        if args.target is not None:
            target = args.target
        else:
            from radar_vllm.offline.assets import ensure_smollm2

            target = ensure_smollm2()
    from radar_vllm.core.config import RadarConfig, env_overrides, radar_section, read_head_config

    section = radar_section(read_head_config(checkpoint))
    if section is None:
        raise SystemExit(f"{checkpoint} is not a RADAR checkpoint (no \"radar\" section in its config.json)")
    max_depth = RadarConfig.from_dict(section).with_overrides(env_overrides()).max_depth
    plain_head = plain_head_view(checkpoint, workdir / "plain_head")
    prompts = load_prompts(target, args.num_prompts, args.tiny)
    logger.info("target %s, checkpoint %s, depth %d, %d prompts", target, checkpoint, max_depth, len(prompts))

    results: list[MethodResult] = []
    reference: list[list[int]] | None = None
    for method in methods:
        result, tokens = run_method(method, target, checkpoint, plain_head, prompts, args, max_depth)
        if method == METHOD_NONE:
            reference = tokens
        elif reference is not None:
            matched = sum(a == b for a, b in zip(reference, tokens))
            result.outputs_match = f"{'yes' if matched == len(tokens) else 'no'} ({matched}/{len(tokens)})"
        results.append(result)
    table = format_table(results)
    print(f"\nRADAR main job: {len(prompts)} prompts, max_tokens {args.max_tokens}, batch {args.max_num_seqs}, "
          f"depth {max_depth}, target {target}, checkpoint {checkpoint}\n")
    print(table)
    if args.json is not None:
        import vllm

        record = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                        "vllm": vllm.__version__},
            "results": [asdict(r) for r in results],
            "table": table,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
