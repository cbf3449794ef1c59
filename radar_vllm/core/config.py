"""RADAR settings of a checkpoint: the ``"radar"`` section of an EAGLE-3 head's ``config.json``.

A RADAR checkpoint is an ordinary EAGLE-3 head directory (stock vLLM still runs it as plain
EAGLE-3) whose ``config.json`` carries one extra section, for example::

    "radar": {"policy": "policy", "mode": "chain", "top_k": 10, "max_depth": 7,
              "total_tokens": 60, "threshold": 0.5}

``policy`` is the stop-policy checkpoint (a directory holding ``policy.safetensors`` +
``policy.json``, or the ``.safetensors`` file) relative to the head directory. It must live in a
sub-directory: vLLM loads every top-level ``*.safetensors`` file of the head as weights.

A checkpoint may carry one policy per mode (chain and tree rounds give the policy different
state distributions): the optional ``tree_policy`` (e.g. ``"policy-tree"``) is used when the mode
is tree, ``policy`` otherwise (and in tree mode when ``tree_policy`` is absent). Checkpoints
without ``tree_policy`` keep their meaning. Likewise sampled and greedy requests accept drafts at
different rates: the optional ``sampled_policy`` (e.g. ``"policy-sampled"``) decides, in chain
mode, for the requests of a batch that sample (temperature > 0); ``policy`` for the greedy ones.

Launch-time overrides, without editing the checkpoint (applied in this order, later wins):

1. the environment variable ``RADAR_OVERRIDES``, a JSON object, e.g.
   ``RADAR_OVERRIDES='{"threshold": 0.6}'``;
2. with the plugin installed, a ``"radar"`` object inside vLLM's speculative config, e.g.
   ``--speculative-config '{"method": "radar", "model": DIR, "radar": {"threshold": 0.6}}'``.

Everything is validated at start-up (:func:`validate_radar_setup`), before any engine process
starts, with messages that say what to change. Nothing here imports vLLM.
``TreeConfig`` (at the end) is the shape of the draft tree RADAR grows one level per draft call:
``top_k`` tokens per expanded node and frontier width, ``max_depth`` levels per round, and
``total_tokens`` handed to the verifier per request (root included, so ``total_tokens - 1`` nodes).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

RADAR_SECTION = "radar"
OVERRIDES_ENV = "RADAR_OVERRIDES"
HEAD_CONFIG_FILENAME = "config.json"
DEFAULT_POLICY_PATH = "policy"
DEFAULT_TREE_POLICY_PATH = "policy-tree"
DEFAULT_SAMPLED_POLICY_PATH = "policy-sampled"

MODE_CHAIN = "chain"
MODE_TREE = "tree"
MODES = (MODE_CHAIN, MODE_TREE)
SUPPORTED_MODES = (MODE_CHAIN, MODE_TREE)

SKIP_AUTO = "auto"
SKIP_NEVER = "never"
SKIP_DRAFTING_MODES = (SKIP_AUTO, SKIP_NEVER)

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"radar.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"radar.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class RadarConfig:
    """RADAR options of one checkpoint (after overrides). Validated on construction."""

    policy: str = DEFAULT_POLICY_PATH  # stop-policy checkpoint, relative to the head directory
    mode: str = MODE_CHAIN  # "chain": one draft token per depth, verified by vLLM's sampler
    top_k: int = 10  # width of the policy state (frontier scores per request)
    max_depth: int = 7  # most draft calls per round
    total_tokens: int = 60  # tree mode: nodes verified per request, root included
    threshold: float | None = None  # continue when P(continue) >= threshold; None: the policy's
    decision: str | None = None  # "threshold" | "sampled"; None: the policy's
    tree_policy: str | None = None  # tree mode's policy, relative to the head directory; None: policy
    sampled_policy: str | None = None  # chain mode, requests with temperature > 0; None: policy
    fixed_depth: int | None = None  # diagnostic: no policy, every round makes this many draft calls
    # tree mode: KV blocks reserved for recomputing tree rows in one kernel call per layer (None: sized
    # for a full batch; 0: none, rows recomputed one node per request per call in their own slots)
    scratch_blocks: int | None = None
    skip_drafting: str = SKIP_AUTO  # "auto": depth 0 when drafting does not pay at this load; "never"
    # "auto" only: a gate-cost table (radar-vllm calibrate-gate) the depth gate starts from, or a
    # list of them (one per machine: the first that fits is used), relative to the head directory;
    # None: the gate measures every batch size from scratch
    gate_costs: str | list[str] | None = None
    # a gate-cost table named in the speculative config or RADAR_OVERRIDES that stops short of the
    # engine's max_num_seqs is refused unless this is true (then its largest batch size is carried
    # to the larger ones, with a warning); the checkpoint's own tables are always used so. None: false
    gate_costs_extrapolate: bool | None = None
    # tree mode, "auto" only: smaller trees (tokens per tree, root included, each below
    # total_tokens) the depth gate may choose per batch size instead of total_tokens, each one more
    # arm (the stop policy still decides every request's depth); None: total_tokens only
    tree_sizes: list[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or not self.policy:
            raise ValueError(f"radar.policy must be a non-empty path string, got {self.policy!r}")
        for key in ("tree_policy", "sampled_policy"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"radar.{key} must be a non-empty path string or absent, got {value!r}")
        if self.gate_costs is not None and not (
            (isinstance(self.gate_costs, str) and self.gate_costs)
            or (isinstance(self.gate_costs, (list, tuple)) and self.gate_costs
                and all(isinstance(name, str) and name for name in self.gate_costs))
        ):
            raise ValueError("radar.gate_costs must be a non-empty path string, a non-empty list of them, or absent, "
                             f"got {self.gate_costs!r}")
        if self.gate_costs_extrapolate is not None and not isinstance(self.gate_costs_extrapolate, bool):
            raise ValueError(f"radar.gate_costs_extrapolate must be true or false, got {self.gate_costs_extrapolate!r}")
        if self.mode not in MODES:
            raise ValueError(f"radar.mode must be one of {MODES}, got {self.mode!r}")
        _require_int("top_k", self.top_k, 1)
        _require_int("max_depth", self.max_depth, 1)
        _require_int("total_tokens", self.total_tokens, 2)
        if self.tree_sizes is not None:
            if not isinstance(self.tree_sizes, (list, tuple)):
                raise ValueError(f"radar.tree_sizes must be a list of tree sizes or absent, got {self.tree_sizes!r}")
            for size in self.tree_sizes:
                _require_int("tree_sizes[]", size, 2)
                if size >= self.total_tokens:
                    raise ValueError(f"radar.tree_sizes holds {size}: each must be below radar.total_tokens="
                                     f"{self.total_tokens} (the largest tree, always an arm)")
            if len(set(self.tree_sizes)) != len(self.tree_sizes):
                raise ValueError(f"radar.tree_sizes repeats a size: {list(self.tree_sizes)}")
        if self.threshold is not None:
            if (
                isinstance(self.threshold, bool)
                or not isinstance(self.threshold, (int, float))
                or not math.isfinite(self.threshold)
                or not 0.0 <= self.threshold <= 1.0
            ):
                raise ValueError(f"radar.threshold must be a number in [0, 1], got {self.threshold!r}")
        if self.fixed_depth is not None:
            _require_int("fixed_depth", self.fixed_depth, 1)
            if self.fixed_depth > self.max_depth:
                raise ValueError(f"radar.fixed_depth={self.fixed_depth} exceeds radar.max_depth={self.max_depth}")
        if self.scratch_blocks is not None:
            _require_int("scratch_blocks", self.scratch_blocks, 0)
        if self.skip_drafting not in SKIP_DRAFTING_MODES:
            raise ValueError(f"radar.skip_drafting must be one of {SKIP_DRAFTING_MODES}, got {self.skip_drafting!r}")
        from radar_vllm.core.policy import DECISION_MODES

        if self.decision is not None and self.decision not in DECISION_MODES:
            raise ValueError(f"radar.decision must be one of {DECISION_MODES}, got {self.decision!r}")
        # The tree budget must be reachable with this top_k and depth (checked in chain mode too:
        # the section describes the checkpoint, whichever mode runs it).
        from radar_vllm.core.config import TreeConfig

        try:
            TreeConfig(top_k=self.top_k, max_depth=self.max_depth, total_tokens=self.total_tokens)
        except ValueError as error:
            raise ValueError(f"radar: {error}") from error

    @property
    def num_draft_tokens(self) -> int:
        """Draft tokens handed to the verifier per request at most (chain: one per depth)."""
        return self.max_depth if self.mode == MODE_CHAIN else self.total_tokens - 1

    @property
    def gate_tree_sizes(self) -> list[int]:
        """The smaller tree sizes the depth gate chooses among (tree mode with the gate on; else none)."""
        if self.mode != MODE_TREE or self.skip_drafting != SKIP_AUTO or self.fixed_depth is not None:
            return []
        return list(self.tree_sizes or ())

    @property
    def active_policy(self) -> str:
        """The policy this mode runs: ``tree_policy`` in tree mode when set, else ``policy``."""
        if self.mode == MODE_TREE and self.tree_policy is not None:
            return self.tree_policy
        return self.policy

    @property
    def active_policy_key(self) -> str:
        """The section key naming :attr:`active_policy` (for messages)."""
        return "tree_policy" if self.mode == MODE_TREE and self.tree_policy is not None else "policy"

    def policy_path(self, checkpoint_dir: str | Path) -> Path:
        """The active policy checkpoint's path (:attr:`active_policy`), resolved against the head directory."""
        return _resolve(self.active_policy, checkpoint_dir)

    def gate_cost_paths(self, checkpoint_dir: str | Path) -> list[Path]:
        """The gate-cost tables ``gate_costs`` names (one or a list), resolved against the head
        directory, in order (empty when absent)."""
        if self.gate_costs is None:
            return []
        names = [self.gate_costs] if isinstance(self.gate_costs, str) else self.gate_costs
        return [_resolve(name, checkpoint_dir) for name in names]

    def sampled_policy_path(self, checkpoint_dir: str | Path) -> Path | None:
        """The policy of sampled requests when this mode runs one (chain mode with ``sampled_policy``)."""
        if self.mode != MODE_CHAIN or self.sampled_policy is None:
            return None
        return _resolve(self.sampled_policy, checkpoint_dir)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "radar section") -> "RadarConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"{source} must be a JSON object, got {type(data).__name__}")
        _check_keys(data, source)
        return cls(**dict(data))

    def with_overrides(self, overrides: Mapping[str, Any], source: str = "overrides") -> "RadarConfig":
        """A copy with ``overrides`` applied (unknown keys raise ValueError naming ``source``)."""
        if not overrides:
            return self
        _check_keys(overrides, source)
        try:
            return dataclasses.replace(self, **dict(overrides))
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error


def _resolve(path: str, checkpoint_dir: str | Path) -> Path:
    resolved = Path(path)
    return resolved if resolved.is_absolute() else Path(checkpoint_dir) / resolved


def _check_keys(data: Mapping[str, Any], source: str) -> None:
    allowed = {f.name for f in fields(RadarConfig)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{source}: unknown RADAR option(s) {unknown}; allowed options are {sorted(allowed)}")


def read_head_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The head's ``config.json`` as a dict (FileNotFoundError / ValueError naming the file)."""
    path = Path(checkpoint_dir) / HEAD_CONFIG_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"EAGLE-3 head config not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def radar_section(head_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The raw ``"radar"`` section of a head config, or None for a plain EAGLE-3 head."""
    section = head_config.get(RADAR_SECTION)
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ValueError(f'the "{RADAR_SECTION}" section of the head config must be a JSON object, got {section!r}')
    return dict(section)


def parse_overrides(text: str | None, source: str = OVERRIDES_ENV) -> dict[str, Any]:
    """Parse a JSON object of RADAR overrides (empty or None -> {})."""
    if text is None or not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} must be a JSON object such as '{{\"threshold\": 0.6}}', got {text!r} ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{source} must be a JSON object such as '{{\"threshold\": 0.6}}', got {text!r}")
    _check_keys(data, source)
    return data


def env_overrides() -> dict[str, Any]:
    """Overrides from the ``RADAR_OVERRIDES`` environment variable."""
    return parse_overrides(os.environ.get(OVERRIDES_ENV), OVERRIDES_ENV)


def resolve_radar_config(
    section: Mapping[str, Any],
    *extra_overrides: tuple[str, Mapping[str, Any]],
    use_env: bool = True,
) -> RadarConfig:
    """Checkpoint section + ``RADAR_OVERRIDES`` + each (source name, overrides) pair, in order."""
    config = RadarConfig.from_dict(section, source=f'"{RADAR_SECTION}" section of the head config')
    if use_env:
        config = config.with_overrides(env_overrides(), OVERRIDES_ENV)
    for source, overrides in extra_overrides:
        config = config.with_overrides(overrides, source)
    return config


@dataclass(frozen=True)
class ValidatedRadar:
    """What start-up validation established: the config and the policy file it points to."""

    config: RadarConfig
    checkpoint_dir: Path
    policy_path: Path
    policy_threshold: float
    policy_decision: str
    sampled_policy_path: Path | None = None  # chain mode: the policy of requests that sample
    sampled_policy_threshold: float | None = None
    sampled_policy_decision: str | None = None

    @property
    def threshold(self) -> float:
        return self.config.threshold if self.config.threshold is not None else self.policy_threshold

    @property
    def decision(self) -> str:
        return self.config.decision if self.config.decision is not None else self.policy_decision

    @property
    def sampled_threshold(self) -> float | None:
        return self.config.threshold if self.config.threshold is not None else self.sampled_policy_threshold

    @property
    def sampled_decision(self) -> str | None:
        return self.config.decision if self.config.decision is not None else self.sampled_policy_decision


def validate_radar_setup(
    config: RadarConfig,
    checkpoint_dir: str | Path,
    *,
    head_config: Mapping[str, Any] | None = None,
    target_hidden_size: int | None = None,
    target_vocab_size: int | None = None,
    num_speculative_tokens: int | None = None,
) -> ValidatedRadar:
    """Check a RADAR setup before anything expensive starts; raise with what to change.

    Checks: the mode is implemented; the policy checkpoint exists, loads, and takes states of
    size ``top_k``; the head is an EAGLE-3 head built for a target of this hidden size and
    vocabulary; ``num_speculative_tokens`` matches the depth (chain mode).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if config.mode not in SUPPORTED_MODES:
        raise ValueError(
            f"radar.mode={config.mode!r} is not supported by this version of radar_vllm "
            f"(supported: {SUPPORTED_MODES}); set \"mode\": \"chain\" in the checkpoint or with "
            f"{OVERRIDES_ENV}='{{\"mode\": \"chain\"}}'"
        )
    head = dict(head_config) if head_config is not None else read_head_config(checkpoint_dir)
    architectures = head.get("architectures") or []
    if not any(arch in EAGLE3_ARCHITECTURES for arch in architectures):
        raise ValueError(
            f"{checkpoint_dir}: a RADAR checkpoint must be an EAGLE-3 head "
            f"(architectures {list(EAGLE3_ARCHITECTURES)}), got architectures={architectures}"
        )
    if target_hidden_size is not None:
        head_target_hidden = head.get("target_hidden_size", head.get("hidden_size"))
        if head_target_hidden != target_hidden_size:
            raise ValueError(
                f"the EAGLE-3 head in {checkpoint_dir} was built for a target with hidden size "
                f"{head_target_hidden} (target_hidden_size in its config.json), but the target model "
                f"has hidden size {target_hidden_size}: use a head trained for this target model"
            )
    if target_vocab_size is not None and head.get("vocab_size") not in (None, target_vocab_size):
        raise ValueError(
            f"the EAGLE-3 head in {checkpoint_dir} has vocab_size={head.get('vocab_size')} but the "
            f"target model's vocabulary has {target_vocab_size} tokens: use a head trained for this target"
        )
    draft_vocab_size = head.get("draft_vocab_size") or head.get("vocab_size")
    if isinstance(draft_vocab_size, int) and config.top_k > draft_vocab_size:
        raise ValueError(
            f"radar.top_k={config.top_k} exceeds the head's draft vocabulary ({draft_vocab_size} tokens); "
            f"lower top_k"
        )
    if config.mode == MODE_CHAIN and num_speculative_tokens is not None and num_speculative_tokens != config.max_depth:
        raise ValueError(
            f"num_speculative_tokens={num_speculative_tokens} but the RADAR checkpoint's max_depth="
            f"{config.max_depth}: in chain mode they must be equal. Set num_speculative_tokens to "
            f"{config.max_depth} in the speculative config (or leave it out with \"method\": \"radar\"), "
            f"or override the depth with {OVERRIDES_ENV}='{{\"max_depth\": {num_speculative_tokens}}}'"
        )
    if config.mode == MODE_TREE and num_speculative_tokens is not None and num_speculative_tokens != config.total_tokens - 1:
        raise ValueError(
            f"num_speculative_tokens={num_speculative_tokens} but the RADAR tree has total_tokens="
            f"{config.total_tokens} (root included): in tree mode num_speculative_tokens must be "
            f"total_tokens - 1 = {config.total_tokens - 1} (or leave it out with \"method\": \"radar\"), "
            f"or override the budget with {OVERRIDES_ENV}='{{\"total_tokens\": {num_speculative_tokens + 1}}}'"
        )
    policy_path = config.policy_path(checkpoint_dir)
    checkpoint = _check_policy(config, checkpoint_dir, config.active_policy_key, policy_path)
    # the checkpoint's other policies must be usable too (caught at pack time, not when switching)
    if config.tree_policy is not None and config.mode != MODE_TREE:
        _check_policy(config, checkpoint_dir, "tree_policy", _resolve(config.tree_policy, checkpoint_dir))
    sampled = None
    if config.sampled_policy is not None:
        sampled = _check_policy(config, checkpoint_dir, "sampled_policy",
                                _resolve(config.sampled_policy, checkpoint_dir))
    sampled_path = config.sampled_policy_path(checkpoint_dir)
    return ValidatedRadar(
        config=config,
        checkpoint_dir=checkpoint_dir,
        policy_path=policy_path,
        policy_threshold=checkpoint.config.threshold,
        policy_decision=checkpoint.config.decision,
        sampled_policy_path=sampled_path,
        sampled_policy_threshold=None if sampled_path is None else sampled.config.threshold,
        sampled_policy_decision=None if sampled_path is None else sampled.config.decision,
    )


def _check_policy(config: RadarConfig, checkpoint_dir: Path, key: str, policy_path: Path) -> Any:
    """Load the policy named by ``radar.<key>`` and check its state size against top_k."""
    from radar_vllm.core.policy import load_policy_checkpoint

    try:
        checkpoint = load_policy_checkpoint(policy_path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"RADAR stop policy not found for the checkpoint {checkpoint_dir}: {error}. "
            f"radar.{key}={getattr(config, key)!r} must name a directory with policy.safetensors + "
            f"policy.json (relative to the head directory); `radar-vllm pack` writes one"
        ) from error
    except ValueError as error:
        raise ValueError(f"RADAR stop policy {policy_path} (radar.{key}) is not usable: {error}") from error
    if checkpoint.config.state_size != config.top_k and config.fixed_depth is None:  # fixed depth: policy unused
        raise ValueError(
            f"the stop policy {policy_path} (radar.{key}) takes states of size {checkpoint.config.state_size} "
            f"but radar.top_k={config.top_k}: set \"top_k\": {checkpoint.config.state_size} in the radar "
            f"section (or {OVERRIDES_ENV}) or use a policy trained with top_k={config.top_k}"
        )
    return checkpoint


# ------------------------------------------------------------------------------------------
# the draft tree's shape


def _plain_int(name: str, value: Any) -> int:
    """Return ``value`` if it is a plain integer (bool excluded), else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _check_known_keys(cls_name: str, allowed: set[str], data: Mapping[str, Any]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{cls_name}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the dynamic draft tree.

    Growth: the first draft call gives ``top_k`` depth-1 candidates; each further call expands the
    ``top_k`` frontier nodes into ``top_k * top_k`` scored children, all of which become candidates.
    At the stop, the best ``max_nodes`` candidates form the tree.
    """

    top_k: int = 10
    max_depth: int = 7
    total_tokens: int = 60

    def __post_init__(self) -> None:
        _plain_int("top_k", self.top_k)
        _plain_int("max_depth", self.max_depth)
        _plain_int("total_tokens", self.total_tokens)
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        if self.total_tokens < 2:
            raise ValueError(f"total_tokens must be >= 2 (root plus one draft node), got {self.total_tokens}")
        if self.total_tokens - 1 > self.max_candidates:
            raise ValueError(
                f"total_tokens={self.total_tokens} needs {self.total_tokens - 1} draft nodes, but "
                f"top_k={self.top_k} and max_depth={self.max_depth} produce at most "
                f"{self.max_candidates} candidates (top_k * (1 + top_k * (max_depth - 1)))"
            )

    @property
    def max_nodes(self) -> int:
        """Draft nodes per tree, the root excluded (``total_tokens - 1``)."""
        return self.total_tokens - 1

    @property
    def max_candidates(self) -> int:
        """Candidates collected by a full-depth round: ``top_k`` at depth 1, ``top_k**2`` per later depth."""
        return self.top_k * (1 + self.top_k * (self.max_depth - 1))

    def num_candidates_at_depth(self, depth: int) -> int:
        """Candidates collected after growing to ``depth`` (1-based) levels."""
        _plain_int("depth", depth)
        if not 1 <= depth <= self.max_depth:
            raise ValueError(f"depth must be in [1, {self.max_depth}], got {depth}")
        return self.top_k * (1 + self.top_k * (depth - 1))

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TreeConfig":
        """Build from a mapping (e.g. parsed JSON); unknown keys raise ValueError, missing keys take defaults."""
        if not isinstance(data, Mapping):
            raise ValueError(f"TreeConfig.from_dict expects a mapping, got {type(data).__name__}")
        _check_known_keys("TreeConfig", {f.name for f in fields(cls)}, data)
        return cls(**dict(data))

    @classmethod
    def for_mode(cls, mode: str, max_depth: int, top_k: int, total_tokens: int) -> "TreeConfig":
        """The drafting shape of a mode: ``"chain"`` drafts one token per call (top_k 1, one node
        per depth, so ``top_k``/``total_tokens`` are ignored); ``"tree"`` uses them as given."""
        if mode == "chain":
            return cls(top_k=1, max_depth=max_depth, total_tokens=max_depth + 1)
        if mode == "tree":
            return cls(top_k=top_k, max_depth=max_depth, total_tokens=total_tokens)
        raise ValueError(f"mode must be 'chain' or 'tree', got {mode!r}")
