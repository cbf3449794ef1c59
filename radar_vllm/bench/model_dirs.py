"""The model folders a benchmark needs, derived from the inputs without touching the originals.

- :func:`plain_head_view`: the RADAR checkpoint seen as a plain EAGLE-3 head (config.json without
  the radar section, weights linked), for the stock EAGLE-3 rows: with the plugin installed, a
  directory with a radar section always runs as RADAR.
- :func:`tiny_models`: a tiny random target + RADAR checkpoint (tiny_models), for tests and
  smoke runs.
- :func:`random_radar_checkpoint`: a random-weight EAGLE-3 head + random policy for a real target
  (timing smoke runs before a trained head exists; acceptance is near zero by construction).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from radar_vllm.core.config import HEAD_CONFIG_FILENAME, RADAR_SECTION, read_head_config

logger = logging.getLogger(__name__)

TINY_TOP_K = 4
TINY_MAX_DEPTH = 4
RANDOM_DRAFT_VOCAB = 8192
RANDOM_POLICY_TOP_K = 10


def plain_head_view(radar_checkpoint: str | Path, out_dir: str | Path) -> Path:
    """``out_dir`` = the checkpoint's top-level files linked, config.json without the radar section."""
    radar_checkpoint = Path(radar_checkpoint).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = read_head_config(radar_checkpoint)
    config.pop(RADAR_SECTION, None)
    for item in radar_checkpoint.iterdir():
        if not item.is_file() or item.name == HEAD_CONFIG_FILENAME:
            continue
        link = out_dir / item.name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(item, link)
    (out_dir / HEAD_CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def tiny_models(directory: str | Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """(target, plain head, RADAR checkpoint) of tiny random models, built once in ``directory``."""
    from tiny_models import make_tiny_llama, make_tiny_radar_checkpoint

    directory = Path(directory)
    target = directory / "tiny-target"
    checkpoints = directory / "tiny-checkpoints"
    done = directory / "tiny-models.json"
    if not done.is_file():
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(checkpoints, ignore_errors=True)
        make_tiny_llama(target, seed=seed)
        make_tiny_radar_checkpoint(checkpoints, target, top_k=TINY_TOP_K, max_depth=TINY_MAX_DEPTH)
        done.write_text(json.dumps({"seed": seed}) + "\n")
    return target, checkpoints / "head", checkpoints / "radar"


def random_radar_checkpoint(target_dir: str | Path, out_dir: str | Path, seed: int = 0,
                            max_depth: int = 7) -> Path:
    """A RADAR checkpoint with a randomly initialised EAGLE-3 head for ``target_dir`` (smoke runs).

    Aux layers (2, L/2, L-3), the first ``RANDOM_DRAFT_VOCAB`` token ids as draft vocabulary and
    a random policy that continues about 60% of the time. Returns ``out_dir / "radar"``.
    """
    import torch

    from tiny_models import make_random_policy
    from radar_vllm.offline.pack import pack_radar_checkpoint
    from radar_vllm.offline.head.eagle3 import Eagle3Head, Eagle3HeadConfig
    from radar_vllm.offline.head.trainer import export_head

    out_dir = Path(out_dir)
    if (out_dir / "radar" / HEAD_CONFIG_FILENAME).is_file():
        return out_dir / "radar"
    target_config = json.loads((Path(target_dir) / "config.json").read_text(encoding="utf-8"))
    num_layers = int(target_config["num_hidden_layers"])
    aux = sorted({2, num_layers // 2, num_layers - 3})
    draft_vocab = min(RANDOM_DRAFT_VOCAB, int(target_config["vocab_size"]))
    config = Eagle3HeadConfig.for_target(target_config, aux, draft_vocab)
    torch.manual_seed(seed)
    head = Eagle3Head(config)
    head.set_draft_vocab(torch.arange(draft_vocab))
    head_dir = export_head(head, out_dir / "head")
    policy_dir = make_random_policy(out_dir / "policy", top_k=RANDOM_POLICY_TOP_K, seed=seed)
    return pack_radar_checkpoint(head_dir, policy_dir, out_dir / "radar", max_depth=max_depth)
