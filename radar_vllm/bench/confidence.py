"""A training-free confidence stop, written as an ordinary RADAR stop-policy checkpoint.

Rule: continue drafting while ``s0 >= log(threshold)``, where ``s0`` is the first entry of the
policy state, i.e. the best cumulative draft log-prob of the frontier (in chain mode: the
cumulative log-prob of the chain including its next token). So the chain keeps growing while the
draft model believes the whole chain with probability at least ``threshold``.

The rule is exact in the StopPolicy network (no training): the LSTM has zero weights (its output
stays 0: every gate is sigmoid(0) = 0.5 and the cell input tanh(0) = 0), two hidden units compute
``relu(s0 - c)`` and ``relu(c - s0)`` with ``c = log(threshold)``, and the continue logit is
``gain * (relu(s0 - c) - relu(c - s0)) = gain * (s0 - c)`` against a stop logit of 0. With the
decision threshold 0.5, P(continue) = sigmoid(gain * (s0 - c)) >= 0.5 exactly when ``s0 >= c``.

Packed with the same head as the RADAR checkpoint, the row runs through the very same plugin path
(same draft loop, same policy cost), so it isolates what the learned policy adds.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from radar_vllm.core.policy import ACTION_CONTINUE, ACTION_STOP, DECISION_THRESHOLD, PolicyConfig, StopPolicy, save_policy

DECISION_THRESHOLD_P = 0.5  # P(continue) >= 0.5  <=>  continue logit >= stop logit
GAIN = 50.0  # slope of the continue logit; only its sign matters in threshold mode
RULE_UNITS = 2  # hidden units used by the rule


def confidence_log_threshold(threshold: float) -> float:
    """``log(threshold)`` for a probability threshold in (0, 1)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold!r}")
    return math.log(threshold)


def make_confidence_policy(threshold: float, state_size: int) -> StopPolicy:
    """A StopPolicy (eval mode) that continues while the best cumulative draft prob >= ``threshold``."""
    log_threshold = confidence_log_threshold(threshold)
    config = PolicyConfig(state_size=state_size, decision=DECISION_THRESHOLD, threshold=DECISION_THRESHOLD_P)
    if config.mlp_hidden < RULE_UNITS:
        raise ValueError(f"mlp_hidden must be >= {RULE_UNITS}, got {config.mlp_hidden}")
    policy = StopPolicy(config)
    best_score_column = config.lstm_hidden  # joined input = [lstm_out (lstm_hidden), state (state_size)]
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.zero_()
        policy.mlp_in.weight[0, best_score_column] = 1.0
        policy.mlp_in.bias[0] = -log_threshold
        policy.mlp_in.weight[1, best_score_column] = -1.0
        policy.mlp_in.bias[1] = log_threshold
        policy.mlp_out.weight[ACTION_CONTINUE, 0] = GAIN
        policy.mlp_out.weight[ACTION_CONTINUE, 1] = -GAIN
        policy.mlp_out.weight[ACTION_STOP].zero_()
    return policy.eval()


def write_confidence_policy(directory: str | Path, threshold: float, state_size: int) -> Path:
    """Save :func:`make_confidence_policy` as ``policy.safetensors`` + ``policy.json`` in ``directory``."""
    policy = make_confidence_policy(threshold, state_size)
    directory = Path(directory)
    save_policy(policy, policy.config, directory)
    return directory


def build_confidence_checkpoint(radar_checkpoint: str | Path, out_dir: str | Path, threshold: float) -> Path:
    """A RADAR checkpoint with the RADAR checkpoint's head and settings and the confidence policy.

    Reuses ``out_dir`` when it already holds a checkpoint built for the same threshold.
    """
    import json

    from radar_vllm.offline.pack import pack_radar_checkpoint
    from radar_vllm.core.config import RadarConfig, radar_section, read_head_config

    out_dir = Path(out_dir)
    marker = out_dir / "confidence.json"
    if marker.is_file() and json.loads(marker.read_text()).get("threshold") == threshold:
        return out_dir
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    section = radar_section(read_head_config(radar_checkpoint))
    if section is None:
        raise ValueError(f"{radar_checkpoint} is not a RADAR checkpoint (no radar section)")
    radar = RadarConfig.from_dict(section)
    policy_dir = write_confidence_policy(out_dir.parent / f"{out_dir.name}-policy", threshold, radar.top_k)
    pack_radar_checkpoint(
        radar_checkpoint,
        policy_dir,
        out_dir,
        top_k=radar.top_k,
        max_depth=radar.max_depth,
        total_tokens=radar.total_tokens,
        mode=radar.mode,
    )
    marker.write_text(json.dumps({"threshold": threshold}) + "\n")
    return out_dir
