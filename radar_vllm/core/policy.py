"""The RADAR stop policy: after each draft-model call, continue drafting or stop and verify.

State (per request, after each draft call): the ``top_k`` cumulative log-probs of the current
frontier, sorted descending. The network (as in the RADAR paper):

    LSTM(state_size -> lstm_hidden, 1 layer) -> concat(lstm_out, state)
        -> Linear(lstm_hidden + state_size, mlp_hidden) -> ReLU -> Dropout -> Linear(mlp_hidden, 2)

Action ``ACTION_STOP`` (0) = stop and verify, ``ACTION_CONTINUE`` (1) = one more draft call.
The recurrent state is reset at the start of every drafting round.

Decision modes:
  * ``threshold`` (default): continue when P(continue) >= threshold; deterministic, so every
    tensor-parallel rank takes the same decision.
  * ``sampled``: continue with probability P(continue) (the paper's rule), from uniform numbers
    drawn on the device.

Checkpoint: ``policy.safetensors`` (float32 weights) + ``policy.json`` (config and free-form
metadata). Loading checks every tensor name and shape against the config; nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from radar_vllm.kernels.policy_step import PolicyStepWeights, pack_policy_weights, policy_step

logger = logging.getLogger(__name__)

ACTION_STOP = 0
ACTION_CONTINUE = 1
NUM_ACTIONS = 2

DECISION_THRESHOLD = "threshold"
DECISION_SAMPLED = "sampled"
DECISION_MODES = (DECISION_THRESHOLD, DECISION_SAMPLED)

WEIGHTS_FILENAME = "policy.safetensors"
CONFIG_FILENAME = "policy.json"
CHECKPOINT_FORMAT = "radar-stop-policy"
CHECKPOINT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PolicyConfig:
    """Architecture and decision settings of the stop policy."""

    state_size: int = 10  # = the tree's top_k (frontier width)
    lstm_hidden: int = 128
    mlp_hidden: int = 128
    dropout: float = 0.1
    decision: str = DECISION_THRESHOLD  # "threshold" | "sampled"
    threshold: float = 0.5  # continue when P(continue) >= threshold (threshold mode)
    score_floor: float = -30.0  # -inf / NaN / very low frontier scores are clamped to this

    def __post_init__(self) -> None:
        for name in ("state_size", "lstm_hidden", "mlp_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PolicyConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PolicyConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.decision not in DECISION_MODES:
            raise ValueError(f"PolicyConfig.decision must be one of {DECISION_MODES}, got {self.decision!r}")
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"PolicyConfig.threshold must be in [0, 1], got {self.threshold!r}")
        if (
            not isinstance(self.score_floor, (int, float))
            or not math.isfinite(self.score_floor)
            or self.score_floor >= 0.0
        ):
            raise ValueError(f"PolicyConfig.score_floor must be a finite negative number, got {self.score_floor!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PolicyConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"PolicyConfig data must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"PolicyConfig got unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(data))

    def same_architecture(self, other: "PolicyConfig") -> bool:
        """True when both configs describe networks with the same tensors."""
        return (self.state_size, self.lstm_hidden, self.mlp_hidden) == (
            other.state_size,
            other.lstm_hidden,
            other.mlp_hidden,
        )

    def expected_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor of a ``StopPolicy`` with this config."""
        s, h, m = self.state_size, self.lstm_hidden, self.mlp_hidden
        return {
            "lstm.weight_ih_l0": (4 * h, s),
            "lstm.weight_hh_l0": (4 * h, h),
            "lstm.bias_ih_l0": (4 * h,),
            "lstm.bias_hh_l0": (4 * h,),
            "mlp_in.weight": (m, h + s),
            "mlp_in.bias": (m,),
            "mlp_out.weight": (NUM_ACTIONS, m),
            "mlp_out.bias": (NUM_ACTIONS,),
        }


def frontier_features(frontier_scores: torch.Tensor, state_size: int, score_floor: float) -> torch.Tensor:
    """Policy state ``[batch, state_size]`` float32 from frontier scores ``[batch, state_size]``.

    Scores are cumulative log-probs; NaN and -inf become ``score_floor``, values are clamped to
    ``[score_floor, 0]`` and sorted descending.
    """
    if frontier_scores.dim() != 2 or frontier_scores.shape[1] != state_size:
        raise ValueError(f"frontier_scores must have shape [batch, {state_size}], got {tuple(frontier_scores.shape)}")
    scores = torch.nan_to_num(frontier_scores.float(), nan=score_floor, neginf=score_floor, posinf=0.0)
    return torch.sort(scores.clamp(min=score_floor, max=0.0), dim=-1, descending=True).values


def continue_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(continue) from policy logits ``[..., 2]`` (softmax over stop/continue) -> ``[...]``."""
    return torch.softmax(logits.float(), dim=-1)[..., ACTION_CONTINUE]


def decide(
    p_continue: torch.Tensor,  # [batch] float
    mode: str = DECISION_THRESHOLD,
    threshold: float = 0.5,
    uniform: torch.Tensor | None = None,  # [batch] in [0, 1); sampled mode only
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue flags ``[batch]`` (bool) from continue probabilities; no host synchronization.

    Threshold mode: ``p_continue >= threshold``. Sampled mode: ``uniform < p_continue`` (so a
    request continues with probability ``p_continue``); ``uniform`` is drawn with ``generator``
    on ``p_continue``'s device when not given.
    """
    if mode == DECISION_THRESHOLD:
        return p_continue >= threshold
    if mode == DECISION_SAMPLED:
        if uniform is None:
            uniform = torch.rand(p_continue.shape, device=p_continue.device, generator=generator)
        if uniform.shape != p_continue.shape:
            raise ValueError(f"uniform must have shape {tuple(p_continue.shape)}, got {tuple(uniform.shape)}")
        return uniform < p_continue
    raise ValueError(f"mode must be one of {DECISION_MODES}, got {mode!r}")


Hidden = tuple[torch.Tensor, torch.Tensor]  # (h [batch, lstm_hidden], c [batch, lstm_hidden])


class StopPolicy(nn.Module):
    """The stop/continue network; float32 parameters."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else PolicyConfig()
        c = self.config
        self.lstm = nn.LSTM(input_size=c.state_size, hidden_size=c.lstm_hidden, num_layers=1, batch_first=True)
        self.mlp_in = nn.Linear(c.lstm_hidden + c.state_size, c.mlp_hidden)
        self.dropout = nn.Dropout(c.dropout)
        self.mlp_out = nn.Linear(c.mlp_hidden, NUM_ACTIONS)

    def features(self, frontier_scores: torch.Tensor) -> torch.Tensor:
        """Policy state ``[batch, state_size]`` float32 from frontier scores ``[batch, top_k]``
        (see ``frontier_features``)."""
        return frontier_features(frontier_scores, self.config.state_size, self.config.score_floor)

    def init_hidden(self, batch_size: int, device: torch.device | str | None = None) -> Hidden:
        """Zero recurrent state ``(h, c)``, each ``[batch_size, lstm_hidden]`` float32."""
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        device = device if device is not None else self.mlp_out.weight.device
        shape = (batch_size, self.config.lstm_hidden)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    @torch.no_grad()
    def fold_input_scaling(self, mean: torch.Tensor, std: torch.Tensor) -> "StopPolicy":
        """Make this network take raw features ``x`` where it was trained on ``(x - mean) / std``.

        Every layer that reads the state (the LSTM input weights and the state columns of
        ``mlp_in``) is affine in it, so ``W (x - mean) / std + b = (W / std) x + (b - W mean /
        std)`` folds the scaling into the weights: same decisions, same checkpoint format.
        ``mean``/``std`` are ``[state_size]``. Returns ``self``.
        """
        size = self.config.state_size
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() != size or std.numel() != size or not bool((std > 0).all()):
            raise ValueError(f"fold_input_scaling needs mean and positive std of size {size}, got "
                             f"{tuple(mean.shape)} and {tuple(std.shape)}")
        mean, std = mean.to(self.lstm.weight_ih_l0.device), std.to(self.lstm.weight_ih_l0.device)
        for weight, bias in ((self.lstm.weight_ih_l0, self.lstm.bias_ih_l0),
                             (self.mlp_in.weight[:, self.config.lstm_hidden:], self.mlp_in.bias)):
            scaled = weight / std  # [out, size]
            bias -= scaled @ mean
            weight.copy_(scaled)
        return self

    def _head(self, lstm_out: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([lstm_out, state], dim=-1)  # [..., lstm_hidden + state_size]
        return self.mlp_out(self.dropout(torch.relu(self.mlp_in(joined))))

    def step(self, state: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """One decision: ``state [batch, state_size]`` -> ``(logits [batch, 2], new hidden)``."""
        if hidden is None:
            hidden = self.init_hidden(state.shape[0], state.device)
        h, c = hidden
        out, (h_new, c_new) = self.lstm(state.unsqueeze(1), (h.unsqueeze(0), c.unsqueeze(0)))
        logits = self._head(out.squeeze(1), state)
        return logits, (h_new.squeeze(0), c_new.squeeze(0))

    def forward(self, states: torch.Tensor, hidden: Hidden | None = None) -> torch.Tensor:
        """Logits ``[batch, steps, 2]`` for a whole round ``states [batch, steps, state_size]``
        (fresh recurrent state unless ``hidden`` is given); used in training."""
        if states.dim() != 3 or states.shape[2] != self.config.state_size:
            raise ValueError(
                f"states must have shape [batch, steps, {self.config.state_size}], got {tuple(states.shape)}"
            )
        if hidden is None:
            out, _ = self.lstm(states)
        else:
            out, _ = self.lstm(states, (hidden[0].unsqueeze(0), hidden[1].unsqueeze(0)))
        return self._head(out, states)

    def decide(
        self,
        logits: torch.Tensor,  # [batch, 2]
        mode: str | None = None,
        threshold: float | None = None,
        uniform: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue flags ``[batch]`` bool from logits; mode/threshold default to the config's."""
        return decide(
            continue_probability(logits),
            mode=mode if mode is not None else self.config.decision,
            threshold=threshold if threshold is not None else self.config.threshold,
            uniform=uniform,
            generator=generator,
        )

    def packed_weights(self, device: torch.device | str | None = None) -> PolicyStepWeights:
        """The weights in the fused-step layout (see ``radar_vllm.kernels.policy_step``)."""
        return pack_policy_weights(
            self.lstm.weight_ih_l0,
            self.lstm.weight_hh_l0,
            self.lstm.bias_ih_l0,
            self.lstm.bias_hh_l0,
            self.mlp_in.weight,
            self.mlp_in.bias,
            self.mlp_out.weight,
            self.mlp_out.bias,
            device=device,
        )


class PolicyRunner:
    """Batched, device-resident runtime of a trained policy for the draft loop.

    Buffers are allocated once for ``max_batch_size`` requests (stable addresses, so calls can be
    captured in CUDA graphs). Per round: ``begin_round(batch_size)`` zeroes the recurrent state
    and marks every request active; each ``step(frontier_scores)`` runs the fused policy step
    (Triton on CUDA, torch elsewhere) and returns the continue flags ``[batch_size]`` (bool, on
    the device). A request that stopped stays stopped for the rest of the round. Nothing here
    synchronizes with the host.
    """

    def __init__(
        self,
        policy: StopPolicy,
        max_batch_size: int,
        device: torch.device | str | None = None,
        decision: str | None = None,
        threshold: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        config = policy.config
        self.config = dataclasses.replace(
            config,
            decision=decision if decision is not None else config.decision,
            threshold=threshold if threshold is not None else config.threshold,
        )
        self.device = torch.device(device) if device is not None else policy.mlp_out.weight.device
        self.max_batch_size = max_batch_size
        self.generator = generator
        self.weights = policy.packed_weights(self.device)
        shape = (max_batch_size, config.lstm_hidden)
        self.hidden = torch.zeros(shape, device=self.device)  # [max_batch, lstm_hidden]
        self.cell = torch.zeros(shape, device=self.device)  # [max_batch, lstm_hidden]
        self.active = torch.zeros(max_batch_size, dtype=torch.bool, device=self.device)  # [max_batch]
        self.p_continue = torch.zeros(max_batch_size, device=self.device)  # [max_batch]
        self.continue_flags = torch.zeros(max_batch_size, dtype=torch.bool, device=self.device)  # [max_batch]
        self.uniform = torch.zeros(max_batch_size, device=self.device)  # [max_batch]
        self.batch_size = 0

    def begin_round(self, batch_size: int) -> None:
        """Reset the recurrent state and mark the first ``batch_size`` requests active."""
        if not 0 <= batch_size <= self.max_batch_size:
            raise ValueError(f"batch_size must be in [0, {self.max_batch_size}], got {batch_size}")
        self.batch_size = batch_size
        self.hidden.zero_()
        self.cell.zero_()
        self.active.zero_()
        self.active[:batch_size] = True

    def step(self, frontier_scores: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
        """Decide for the current round's batch: ``frontier_scores [batch_size, state_size]`` ->
        continue flags ``[batch_size]`` bool (a view of an internal buffer, valid until the next
        call). In sampled mode ``uniform [batch_size]`` may be given; otherwise it is drawn on
        the device."""
        b = self.batch_size
        if frontier_scores.shape[0] != b:
            raise ValueError(
                f"frontier_scores must have {b} rows (the round's batch size), got {frontier_scores.shape[0]}"
            )
        state = frontier_features(frontier_scores.to(self.device), self.config.state_size, self.config.score_floor)
        sampled_uniform = None
        if self.config.decision == DECISION_SAMPLED:
            if uniform is None:
                torch.rand(b, device=self.device, generator=self.generator, out=self.uniform[:b])
            else:
                self.uniform[:b].copy_(uniform)
            sampled_uniform = self.uniform[:b]
        policy_step(
            state,
            self.hidden[:b],
            self.cell[:b],
            self.weights,
            self.config.threshold,
            sampled_uniform,
            self.p_continue[:b],
            self.continue_flags[:b],
            self.active[:b],
        )
        self.active[:b] = self.continue_flags[:b]
        return self.continue_flags[:b]


# ----------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class PolicyCheckpoint:
    """A loaded checkpoint: the policy (eval mode), its config and the free-form metadata."""

    policy: StopPolicy
    config: PolicyConfig
    metadata: dict[str, Any] = field(default_factory=dict)


def _checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights file, config file) for a directory, a ``.safetensors`` path or a ``.json`` path."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path / WEIGHTS_FILENAME, path / CONFIG_FILENAME


def save_policy(
    policy: StopPolicy,
    config: PolicyConfig | None,
    path: str | Path,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``policy.safetensors`` + ``policy.json`` into directory ``path`` (created if needed),
    or beside each other when ``path`` ends in ``.safetensors`` / ``.json``.

    ``config`` defaults to ``policy.config``; it may change the decision settings but must match
    the network's architecture. ``metadata`` must be JSON-serialisable (e.g. a pointer to the
    training record). Returns (weights path, config path).
    """
    config = config if config is not None else policy.config
    if not config.same_architecture(policy.config):
        raise ValueError(f"config {config} does not match the policy's architecture {policy.config}")
    weights_path, config_path = _checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in policy.state_dict().items()}
    document = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "config": config.to_dict(),
        "metadata": dict(metadata) if metadata is not None else {},
    }
    text = json.dumps(document, indent=2, sort_keys=True)  # fails before any file is written
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    config_path.write_text(text + "\n", encoding="utf-8")
    logger.info("saved stop policy to %s and %s", weights_path, config_path)
    return weights_path, config_path


def _read_config(config_path: Path) -> tuple[PolicyConfig, dict[str, Any]]:
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from error
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{config_path}: not a stop-policy config (expected \"format\": \"{CHECKPOINT_FORMAT}\")")
    version = document.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: unsupported format_version {version!r} (expected {CHECKPOINT_FORMAT_VERSION})"
        )
    if "config" not in document:
        raise ValueError(f"{config_path}: missing key \"config\"")
    try:
        config = PolicyConfig.from_dict(document["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: bad config: {error}") from error
    metadata = document.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{config_path}: \"metadata\" must be an object, got {type(metadata).__name__}")
    return config, metadata


def load_policy_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> PolicyCheckpoint:
    """Load and check a checkpoint written by ``save_policy`` (directory or either file's path).

    Raises FileNotFoundError naming a missing file, and ValueError naming the file and the
    problem for bad JSON, a bad config, a missing/unexpected tensor or a wrong shape.
    """
    weights_path, config_path = _checkpoint_paths(path)
    for required in (config_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(f"stop-policy checkpoint file not found: {required}")
    config, metadata = _read_config(config_path)
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from error
    expected = config.expected_tensor_shapes()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{weights_path}: missing tensor(s) {missing} required by the config in {config_path}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{weights_path}: unexpected tensor(s) {unexpected} not in the config in {config_path}")
    for name, shape in expected.items():
        actual = tuple(tensors[name].shape)
        if actual != shape:
            raise ValueError(
                f"{weights_path}: tensor {name!r} has shape {actual}, expected {shape} from the config in {config_path}"
            )
        if not tensors[name].is_floating_point():
            raise ValueError(
                f"{weights_path}: tensor {name!r} has dtype {tensors[name].dtype}, expected floating point"
            )
    policy = StopPolicy(config)
    policy.load_state_dict({name: t.to(torch.float32) for name, t in tensors.items()}, strict=True)
    policy.to(device).eval()
    return PolicyCheckpoint(policy=policy, config=config, metadata=metadata)


def load_policy(path: str | Path, device: torch.device | str = "cpu") -> StopPolicy:
    """The policy (eval mode) of a checkpoint; see ``load_policy_checkpoint``."""
    return load_policy_checkpoint(path, device).policy
