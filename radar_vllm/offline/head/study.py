"""Recipe study for the EAGLE-3 head: every variant trains on the same features for the same
process-CPU budget, then is scored by the offline chain replay on held-out prompts.

    python -m radar_vllm.offline.head.study train --data-dir DATA --study-dir STUDY --budget-cpu-s 480
    python -m radar_vllm.offline.head.study report --study-dir STUDY --eval-dir EVAL --out benchmarks/results/head_recipe_study

``train`` runs ``radar-vllm train-head --stages train`` once per variant (``--parallel`` at a time,
each niced, one torch thread) into ``STUDY/<variant>/``; a variant whose CPU budget is spent is
skipped, so rerunning continues an interrupted study. ``report`` replays each variant's exported
head on the evaluation features (prepared by ``benchmarks/head_learning_curve.py`` or
:func:`radar_vllm.offline.head.replay.prepare_eval_dir`) and writes ``<out>.json``, ``<out>.md``
and ``<out>.png``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# The original recipe (the shipped head's settings) at float32 on a CPU-second budget.
BASELINE = {
    "draft-vocab-size": 8192, "ttt-steps": 3, "ttt-decay": 0.8, "learning-rate": 6e-4, "warmup-steps": 30,
    "lr-schedule": "cosine", "min-lr-ratio": 0.1, "adam-beta1": 0.9, "adam-beta2": 0.95, "grad-clip": 1.0,
    "batch-tokens": 2048, "soft-label-weight": 0.0, "train-dtype": "float32",
}
VARIANTS: dict[str, dict[str, object]] = {
    "baseline": {},
    "soft-labels": {"soft-label-weight": 1.0},
    "ttt7-decay0.8": {"ttt-steps": 7},
    "vocab32k": {"draft-vocab-size": 32768},
    "optim-published": {"learning-rate": 5e-5, "grad-clip": 0.5, "min-lr-ratio": 0.0},
    "optim-lr1.5e-3-clip0.5": {"learning-rate": 1.5e-3, "grad-clip": 0.5, "min-lr-ratio": 0.0},
    "init-from-target": {"init-from-target": True},
}
DESCRIPTIONS = {
    "baseline": "original recipe: 8k vocab, 3 TTT steps, argmax labels, lr 6e-4 (30 warm-up steps, cosine to 10%), clip 1.0",
    "soft-labels": "+ distillation from the target's top-16 distribution (soft-label weight 1)",
    "ttt7-decay0.8": "+ 7 TTT steps, step weights 0.8^j",
    "vocab32k": "draft vocabulary 32k",
    "optim-published": "lr 5e-5, clip 0.5, cosine to 0 (published optimiser settings)",
    "optim-lr1.5e-3-clip0.5": "lr 1.5e-3, clip 0.5, cosine to 0",
    "init-from-target": "draft layer initialised from the target's last decoder layer",
}


def variant_args(overrides: dict[str, object]) -> list[str]:
    settings = dict(BASELINE)
    settings.update(overrides)
    args: list[str] = []
    for key, value in settings.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not False and value is not None:
            args += [f"--{key}", str(value)]
    return args


def variant_command(name: str, data_dir: Path, study_dir: Path, budget: float, data_args: list[str]) -> list[str]:
    return [
        "nice", "-n", "19", "radar-vllm", "train-head", "--target", "smollm2", "--work-dir", str(data_dir),
        "--train-dir", str(study_dir / name), "--stages", "train", "--threads", "1",
        "--budget-cpu-s", str(budget), "--checkpoint-every", "100000", "--checkpoint-every-s", "300",
        *data_args, *variant_args(VARIANTS[name]),
    ]


def _spent(train_dir: Path) -> float:
    record = train_dir / "training_record.json"
    return json.loads(record.read_text()).get("cpu_time_s", 0.0) if record.is_file() else 0.0


def train_variants(data_dir: Path, study_dir: Path, budget: float, names: list[str], parallel: int,
                   data_args: list[str]) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    todo = [n for n in names if _spent(study_dir / n) < budget]
    running: list[tuple[str, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < parallel:
            name = todo.pop(0)
            command = variant_command(name, data_dir, study_dir, budget, data_args)
            (study_dir / name).mkdir(parents=True, exist_ok=True)
            (study_dir / name / "command.txt").write_text(shlex.join(command) + "\n")
            log = open(study_dir / f"{name}.log", "a")
            logger.info("start %s: %s", name, shlex.join(command))
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(5)
        for name, process in list(running):
            if process.poll() is not None:
                logger.info("%s finished with exit code %s", name, process.returncode)
                running.remove((name, process))


def report(study_dir: Path, eval_dir: Path, out: Path, ks: list[int], extra: dict[str, object]) -> dict:
    import torch

    from radar_vllm.offline.assets import ensure_smollm2
    from radar_vllm.offline.head.replay import load_head_with_target_embeddings, replay_metrics
    from radar_vllm.offline.head.trainer import FeatureStore

    target = str(ensure_smollm2())
    store = FeatureStore(eval_dir, max_seq_len=100_000)
    rows = []
    for name in VARIANTS:
        head_dir = study_dir / name / "head"
        if not (head_dir / "config.json").is_file():
            continue
        record = json.loads((head_dir / "training_record.json").read_text())
        with torch.no_grad():
            metrics = replay_metrics(load_head_with_target_embeddings(str(head_dir), target), store, ks)
        curve = record["loss_curve"]
        rows.append({
            "variant": name,
            "description": DESCRIPTIONS.get(name, ""),
            "cpu_minutes": record["cpu_time_s"] / 60.0,
            "steps": record["steps"],
            "tokens_seen": record["tokens_seen"],
            "epochs": record["epochs_done"],
            "draft_vocab_size": record["draft_vocab_size"],
            "draft_vocab_coverage": record["draft_vocab_coverage"],
            "final_train_top1_accuracy": curve[-1]["top1_accuracy"] if curve else None,
            "command": (study_dir / name / "command.txt").read_text().strip(),
            **metrics,
        })
        logger.info("%s: %s", name, metrics)
    coverage = {}
    for row in rows:
        record = json.loads((study_dir / row["variant"] / "head" / "training_record.json").read_text())
        coverage = record.get("draft_vocab_coverage_by_size") or coverage
    data = json.loads((study_dir / rows[0]["variant"] / "head" / "training_record.json").read_text())["data"] if rows else {}
    num_greedy = sum(not ref.sampled for ref in store.sequences)
    summary = {
        "method": "offline chain replay (radar_vllm.offline.head.replay), float32 head, held-out prompts",
        "eval_dir": str(eval_dir), "eval_prompts": num_greedy, "eval_sampled_answers": len(store.sequences) - num_greedy,
        "training_data": data, "draft_vocab_coverage_by_size": coverage, "rows": rows, **extra,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(rows, out.with_suffix(".png"))
    return summary


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(rows))
    axes[0].bar([i - 0.2 for i in x], [r["first_draft_acceptance_t0"] for r in rows], 0.4, label="T=0")
    if all("first_draft_acceptance_t1" in r for r in rows):
        axes[0].bar([i + 0.2 for i in x], [r["first_draft_acceptance_t1"] for r in rows], 0.4, label="T=1")
    axes[0].set_ylabel("first-draft acceptance")
    axes[1].bar([i - 0.2 for i in x], [r["acceptance_length_t0"]["5"] for r in rows], 0.4, label="T=0")
    if all("acceptance_length_t1" in r for r in rows):
        axes[1].bar([i + 0.2 for i in x], [r["acceptance_length_t1"]["5"] for r in rows], 0.4, label="T=1")
    axes[1].set_ylabel("acceptance length, K=5")
    axes[1].set_ylim(1.0, None)
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    minutes = sorted({round(r["cpu_minutes"]) for r in rows})
    fig.suptitle(f"EAGLE-3 head recipes for SmolLM2 at {minutes} CPU-minutes each (held-out MT-Bench, offline replay)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train")
    run.add_argument("--data-dir", required=True)
    run.add_argument("--study-dir", required=True)
    run.add_argument("--budget-cpu-s", type=float, required=True)
    run.add_argument("--variants", default=",".join(VARIANTS))
    run.add_argument("--parallel", type=int, default=2)
    run.add_argument("--data-args", default="", help="the data settings the data directory was made with")
    rep = sub.add_parser("report")
    rep.add_argument("--study-dir", required=True)
    rep.add_argument("--eval-dir", required=True)
    rep.add_argument("--out", required=True)
    rep.add_argument("--ks", default="1,2,3,5,7")
    rep.add_argument("--extra", default="{}", help="JSON merged into the summary")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "train":
        train_variants(Path(args.data_dir), Path(args.study_dir), args.budget_cpu_s,
                       [v for v in args.variants.split(",") if v], args.parallel, shlex.split(args.data_args))
    else:
        import torch

        torch.set_num_threads(1)
        report(Path(args.study_dir), Path(args.eval_dir), Path(args.out), [int(k) for k in args.ks.split(",")],
               json.loads(args.extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
