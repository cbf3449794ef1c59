"""Build a RADAR checkpoint: an EAGLE-3 head directory + a stop policy + the ``"radar"`` section.

Layout written by :func:`pack_radar_checkpoint`::

    OUT_DIR/config.json            the head's config with a "radar" section added
    OUT_DIR/*.safetensors, ...     the head's files, unchanged (stock vLLM runs OUT_DIR as EAGLE-3)
    OUT_DIR/policy/policy.safetensors + policy.json   the stop policy (a sub-directory: vLLM
                                   loads every top-level *.safetensors file as head weights)
    OUT_DIR/policy-tree/...        optional: the policy used in tree mode ("tree_policy")
    OUT_DIR/policy-sampled/...     optional: chain mode's policy for sampled requests ("sampled_policy")
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from radar_vllm.core.config import (
    DEFAULT_POLICY_PATH,
    DEFAULT_SAMPLED_POLICY_PATH,
    DEFAULT_TREE_POLICY_PATH,
    HEAD_CONFIG_FILENAME,
    MODE_CHAIN,
    RADAR_SECTION,
    SKIP_AUTO,
    RadarConfig,
    read_head_config,
    validate_radar_setup,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_DEPTH = 7
DEFAULT_TOTAL_TOKENS = 60


GATE_COSTS_FILENAME = "gate_costs.json"
GATE_COSTS_PATTERN = re.compile(r"gate_costs(_[0-9]+)?\.json")  # the tables pack writes


def default_total_tokens(top_k: int, max_depth: int) -> int:
    """60 (the RADAR default) or the most the tree can hold with this top_k and depth."""
    max_candidates = top_k * (1 + top_k * (max_depth - 1))
    return min(DEFAULT_TOTAL_TOKENS, max_candidates + 1)


def pack_radar_checkpoint(
    head_dir: str | Path,
    policy_path: str | Path,
    out_dir: str | Path,
    *,
    top_k: int | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    total_tokens: int | None = None,
    threshold: float | None = None,
    decision: str | None = None,
    mode: str = MODE_CHAIN,
    tree_policy_path: str | Path | None = None,
    sampled_policy_path: str | Path | None = None,
    skip_drafting: str = SKIP_AUTO,
    gate_costs_paths: Sequence[str | Path] = (),
    tree_sizes: Sequence[int] = (),
) -> Path:
    """Write a RADAR checkpoint into ``out_dir`` (which must not exist or be empty); return it.

    ``top_k`` defaults to the policy's state size; ``threshold``/``decision`` default to the
    policy's own (left out of the section). ``tree_policy_path``: a second policy, trained on
    tree-mode rounds, copied to ``policy-tree/`` and used when the mode is tree.
    ``sampled_policy_path``: a chain policy trained on sampled (T > 0) rounds, copied to
    ``policy-sampled/`` and used for the requests that sample. ``gate_costs_paths``: gate-cost
    tables (``radar-vllm calibrate-gate``, e.g. one per machine) copied to ``gate_costs.json``,
    ``gate_costs_2.json``, ...; the depth gate starts from the one measured on its machine.
    ``tree_sizes``: smaller trees (tokens, root included) the depth gate may verify in tree mode. The
    result is validated (every policy) before it is moved in place.
    """
    from radar_vllm.core.policy import CONFIG_FILENAME, WEIGHTS_FILENAME, load_policy_checkpoint

    head_dir, out_dir = Path(head_dir), Path(out_dir)
    head_config = read_head_config(head_dir)
    policy = load_policy_checkpoint(policy_path)
    if top_k is None:
        top_k = policy.config.state_size
    if total_tokens is None:
        total_tokens = default_total_tokens(top_k, max_depth)
    gate_costs_paths = [Path(path) for path in gate_costs_paths]
    table_names = [GATE_COSTS_FILENAME if index == 0 else f"gate_costs_{index + 1}.json"
                   for index in range(len(gate_costs_paths))]
    radar = RadarConfig(
        policy=DEFAULT_POLICY_PATH,
        mode=mode,
        top_k=top_k,
        max_depth=max_depth,
        total_tokens=total_tokens,
        threshold=threshold,
        decision=decision,
        tree_policy=None if tree_policy_path is None else DEFAULT_TREE_POLICY_PATH,
        sampled_policy=None if sampled_policy_path is None else DEFAULT_SAMPLED_POLICY_PATH,
        skip_drafting=skip_drafting,
        gate_costs=table_names[0] if len(table_names) == 1 else (table_names or None),
        tree_sizes=list(tree_sizes) or None,
    )
    from radar_vllm.core.draft_gate import load_gate_table

    for path in gate_costs_paths:
        load_gate_table(path)  # a gate-cost table at all (its fit is checked at start-up)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"output directory {out_dir} exists and is not empty; choose a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for item in head_dir.iterdir():
            if item.name in (HEAD_CONFIG_FILENAME, DEFAULT_POLICY_PATH, DEFAULT_TREE_POLICY_PATH,
                             DEFAULT_SAMPLED_POLICY_PATH) or GATE_COSTS_PATTERN.fullmatch(item.name):
                continue
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        _copy_policy(policy_path, staging / DEFAULT_POLICY_PATH, WEIGHTS_FILENAME, CONFIG_FILENAME)
        if tree_policy_path is not None:
            _copy_policy(tree_policy_path, staging / DEFAULT_TREE_POLICY_PATH, WEIGHTS_FILENAME, CONFIG_FILENAME)
        if sampled_policy_path is not None:
            _copy_policy(sampled_policy_path, staging / DEFAULT_SAMPLED_POLICY_PATH, WEIGHTS_FILENAME,
                         CONFIG_FILENAME)
        for path, name in zip(gate_costs_paths, table_names):
            shutil.copy2(path, staging / name)
        config: dict[str, Any] = dict(head_config)
        config[RADAR_SECTION] = radar.to_dict()
        (staging / HEAD_CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        validate_radar_setup(radar, staging)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote RADAR checkpoint %s (%s)", out_dir, radar.to_dict())
    return out_dir


TRAINING_RECORD_FILENAME = "training_record.json"


def _copy_policy(source: str | Path, destination: Path, weights_name: str, config_name: str) -> None:
    """Copy a policy checkpoint (directory or ``.safetensors`` file + its ``.json``) into ``destination``."""
    source = Path(source)
    weights = source if source.suffix == ".safetensors" else source / weights_name
    config_file = weights.with_suffix(".json") if source.suffix == ".safetensors" else source / config_name
    destination.mkdir()
    shutil.copy2(weights, destination / weights_name)
    shutil.copy2(config_file, destination / config_name)
    # The policy's training record (written by `radar-vllm train-policy`) travels with it.
    record = weights.parent / TRAINING_RECORD_FILENAME
    if record.is_file():
        shutil.copy2(record, destination / TRAINING_RECORD_FILENAME)
