"""Round tables: recorded drafting rounds, the offline simulator the stop policy is trained on.

One row (a *round*) is one drafting round drafted to the maximum depth ``D`` (= ``max_depth``
draft calls) with ``top_k`` = k, after which every possible stop is replayed from the same draft
forwards:

- ``states``       float32 ``[R, D, S]``: the policy state after draft call t + 1, t = 0..D-1
  (decision t is taken after call t + 1; the last row, after call D, is recorded but the round
  is then always stopped). In tree mode S = top_k and the state is the frontier's cumulative
  log-probs sorted descending (-inf allowed where the frontier is short; NaN is not).
- ``accept_probs`` float32 ``[R, D, D + 1]``: column d-1 is the exact law of the number L of
  accepted draft tokens (0..D) of the tree that stopping after d = 1..D calls would have sent to
  verification. Rows sum to 1; at temperature 0 each row is a point mass.
- ``tree_sizes``   int32 ``[R, D]``: draft nodes (root excluded) of that tree, for the verify cost.
- ``prompt_index`` int64 ``[R]``: index of the prompt (in the recorded prompt set/split) the round
  came from, so splits can be made by prompt as well as by round.

Stopping after d calls yields E[L_d] + 1 tokens (accepted drafts + the bonus token). Depth 0 (no
speculation, one target step, no draft call, exactly one token) is not stored: it is the same for
every round and the evaluation adds it as a baseline.

On disk a table is a directory of shards ``shard-NNNNN.safetensors`` (tensors) each with a
``shard-NNNNN.json`` beside it (metadata, see :class:`TableMetadata`, plus the shard's row
count). :func:`load_round_table` concatenates shards and refuses mixtures of rounds recorded
under different conditions (see :data:`COMPATIBILITY_KEYS`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

TABLE_FORMAT = "radar-round-table/1"
SHARD_PREFIX = "shard-"
TENSOR_NAMES = ("states", "accept_probs", "tree_sizes", "prompt_index")
MODES = ("tree", "chain")
# Metadata that must agree between shards that are concatenated (and between a table and the
# conditions it is used under).
COMPATIBILITY_KEYS = (
    "format", "model_id", "model_hash", "head_id", "head_hash", "temperature", "mode", "top_k",
    "max_depth", "total_tokens", "state_size", "prompt_set", "split",
)
PROBABILITY_TOLERANCE = 1e-4


@dataclass
class TableMetadata:
    """Conditions a round table was recorded under."""

    model_id: str
    head_id: str
    temperature: float
    mode: str
    top_k: int
    max_depth: int
    total_tokens: int
    state_size: int
    model_hash: str = ""
    head_hash: str = ""
    prompt_set: str = ""
    split: str = ""
    seed: int = 0
    # Counts: prompts used and rounds recorded (for a loaded table: summed over shards).
    num_prompts: int = 0
    num_rounds: int = 0
    versions: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = TABLE_FORMAT

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("top_k", "max_depth", "total_tokens", "state_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not float(self.temperature) >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.temperature = float(self.temperature)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TableMetadata":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"round table metadata has unknown fields {unknown}")
        return cls(**dict(data))


@dataclass
class RoundTable:
    """Recorded rounds (see the module docstring for the exact meaning of each tensor)."""

    # [R, D, S] float32
    states: torch.Tensor
    # [R, D, D + 1] float32
    accept_probs: torch.Tensor
    # [R, D] int32
    tree_sizes: torch.Tensor
    # [R] int64
    prompt_index: torch.Tensor
    metadata: TableMetadata

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_rounds(self) -> int:
        return int(self.states.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.states.shape[1])

    def validate(self) -> None:
        meta = self.metadata
        num_rounds = self.states.shape[0]
        depth, state_size = meta.max_depth, meta.state_size
        expected = {
            "states": (num_rounds, depth, state_size),
            "accept_probs": (num_rounds, depth, depth + 1),
            "tree_sizes": (num_rounds, depth),
            "prompt_index": (num_rounds,),
        }
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(
                    f"round table tensor {name} has shape {actual}, expected {shape} for "
                    f"max_depth={depth}, state_size={state_size}"
                )
        if self.states.dtype != torch.float32 or self.accept_probs.dtype != torch.float32:
            raise ValueError("round table states and accept_probs must be float32, got "
                             f"{self.states.dtype} and {self.accept_probs.dtype}")
        if self.tree_sizes.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tree_sizes must be an integer tensor, got {self.tree_sizes.dtype}")
        if torch.isnan(self.states).any():
            raise ValueError("round table states contain NaN")
        if num_rounds:
            probs = self.accept_probs
            if (probs < -PROBABILITY_TOLERANCE).any() or not torch.isfinite(probs).all():
                raise ValueError("accept_probs must be finite and non-negative")
            sums = probs.double().sum(-1)
            worst = float((sums - 1.0).abs().max())
            if worst > PROBABILITY_TOLERANCE:
                raise ValueError(
                    f"accept_probs rows must sum to 1 (worst deviation {worst:.3g})"
                )
            # Stopping after d calls cannot accept more than d draft tokens.
            lengths = torch.arange(depth + 1)
            calls = torch.arange(1, depth + 1)
            impossible = lengths[None, :] > calls[:, None]  # [D, D + 1]
            leak = float(probs[:, impossible].abs().max()) if impossible.any() else 0.0
            if leak > PROBABILITY_TOLERANCE:
                raise ValueError(
                    "accept_probs put probability on more accepted tokens than draft calls "
                    f"(max {leak:.3g})"
                )
            if int(self.tree_sizes.min()) < 1:
                raise ValueError(f"tree_sizes must be >= 1, got min {int(self.tree_sizes.min())}")
        self.metadata.num_rounds = int(num_rounds)

    # ------------------------------------------------------------------ derived quantities
    def expected_accepted(self) -> torch.Tensor:
        """E[L_d] for d = 1..D: float64 ``[R, D]``."""
        lengths = torch.arange(self.max_depth + 1, dtype=torch.float64)
        return (self.accept_probs.double() * lengths).sum(-1)

    def select(self, rows: torch.Tensor) -> "RoundTable":
        """A table with only the given rows (index tensor or bool mask)."""
        return RoundTable(
            states=self.states[rows],
            accept_probs=self.accept_probs[rows],
            tree_sizes=self.tree_sizes[rows],
            prompt_index=self.prompt_index[rows],
            metadata=replace(self.metadata),
        )

    def split(self, fraction: float, seed: int = 0) -> tuple["RoundTable", "RoundTable"]:
        """Split by round into (first, second) with ``fraction`` of the rounds in the second."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.num_rounds, generator=generator)
        num_second = max(1, int(round(fraction * self.num_rounds)))
        if num_second >= self.num_rounds:
            raise ValueError(
                f"cannot split {self.num_rounds} rounds with fraction={fraction}: one side empty"
            )
        return self.select(order[num_second:].sort().values), \
            self.select(order[:num_second].sort().values)


def check_compatible(reference: Mapping[str, Any], other: Mapping[str, Any],
                     what: str, keys: Iterable[str] = COMPATIBILITY_KEYS) -> None:
    """Raise ValueError listing every key on which two metadata dicts disagree."""
    diffs = [f"{key}: {reference.get(key)!r} vs {other.get(key)!r}"
             for key in keys if reference.get(key) != other.get(key)]
    if diffs:
        raise ValueError(f"refusing to mix round tables ({what}) recorded under different "
                         "conditions: " + "; ".join(diffs))


def check_table_conditions(metadata: TableMetadata, *, temperature: float | None = None,
                           max_depth: int | None = None, top_k: int | None = None,
                           head_id: str | None = None, model_id: str | None = None,
                           mode: str | None = None) -> None:
    """Refuse a table recorded under other conditions than requested (None = not checked)."""
    requested = {"temperature": None if temperature is None else float(temperature),
                 "max_depth": max_depth, "top_k": top_k, "head_id": head_id,
                 "model_id": model_id, "mode": mode}
    for key, value in requested.items():
        if value is not None and getattr(metadata, key) != value:
            raise ValueError(
                f"round table was recorded with {key}={getattr(metadata, key)!r}, but "
                f"{key}={value!r} was requested"
            )


# ---------------------------------------------------------------------- shards on disk
def _shard_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{SHARD_PREFIX}*.safetensors"))


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}"


def write_shard(table: RoundTable, directory: str | os.PathLike[str], index: int | None = None,
                extra: Mapping[str, Any] | None = None) -> Path:
    """Write one shard (tensors + JSON metadata) into ``directory``; returns the tensor path.

    With ``index`` None the next free shard index is used. The JSON is written last, and a
    shard without its JSON is ignored by the loader, so an interrupted write leaves no partial
    shard behind. ``extra`` is stored in the shard JSON (e.g. resume positions).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if index is None:
        existing = [int(p.stem[len(SHARD_PREFIX):]) for p in _shard_paths(directory)]
        index = max(existing, default=-1) + 1
    name = shard_name(index)
    tensors = {
        "states": table.states.contiguous(),
        "accept_probs": table.accept_probs.contiguous(),
        "tree_sizes": table.tree_sizes.to(torch.int32).contiguous(),
        "prompt_index": table.prompt_index.to(torch.int64).contiguous(),
    }
    tensor_path = directory / f"{name}.safetensors"
    tmp = directory / f"{name}.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, tensor_path)
    record = {"metadata": table.metadata.to_dict(), "num_rounds": table.num_rounds,
              "shard": dict(extra or {})}
    json_tmp = directory / f"{name}.json.tmp"
    json_tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(json_tmp, directory / f"{name}.json")
    return tensor_path


def read_shard_records(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON records of the complete shards of a table directory, in shard order."""
    directory = Path(directory)
    records = []
    for tensor_path in _shard_paths(directory):
        json_path = tensor_path.with_suffix(".json")
        if not json_path.is_file():
            logger.warning("ignoring shard %s without its metadata file", tensor_path)
            continue
        try:
            records.append(json.loads(json_path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as error:
            raise ValueError(f"shard metadata {json_path} is not valid JSON: {error}") from error
    return records


def load_round_table(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
                     ) -> RoundTable:
    """Load and concatenate the shards of one or more table directories (or shard files).

    Refuses shards recorded under different conditions (:data:`COMPATIBILITY_KEYS`).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    shard_files: list[Path] = []
    for entry in paths:
        entry = Path(entry)
        if entry.is_dir():
            found = [p for p in _shard_paths(entry) if p.with_suffix(".json").is_file()]
            if not found:
                raise FileNotFoundError(f"no round-table shards in directory {entry}")
            shard_files.extend(found)
        elif entry.is_file():
            shard_files.append(entry)
        else:
            raise FileNotFoundError(f"round table not found: {entry}")
    parts: list[RoundTable] = []
    reference: dict[str, Any] | None = None
    reference_path: Path | None = None
    num_prompts = 0
    for tensor_path in shard_files:
        json_path = tensor_path.with_suffix(".json")
        if not json_path.is_file():
            raise FileNotFoundError(f"shard metadata not found: {json_path}")
        try:
            record = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"shard metadata {json_path} is not valid JSON: {error}") from error
        meta_dict = record.get("metadata", {})
        if meta_dict.get("format") != TABLE_FORMAT:
            raise ValueError(f"shard {json_path} has format {meta_dict.get('format')!r}, "
                             f"expected {TABLE_FORMAT!r}")
        if reference is None:
            reference, reference_path = meta_dict, tensor_path
        else:
            check_compatible(reference, meta_dict, f"{reference_path} and {tensor_path}")
        tensors = load_file(str(tensor_path))
        missing = sorted(set(TENSOR_NAMES) - set(tensors))
        unexpected = sorted(set(tensors) - set(TENSOR_NAMES))
        if missing or unexpected:
            raise ValueError(f"shard {tensor_path}: missing tensors {missing}, unexpected "
                             f"tensors {unexpected}")
        metadata = TableMetadata.from_dict(meta_dict)
        try:
            part = RoundTable(metadata=metadata, **{name: tensors[name] for name in TENSOR_NAMES})
        except ValueError as error:
            raise ValueError(f"shard {tensor_path}: {error}") from error
        if part.num_rounds != int(record.get("num_rounds", part.num_rounds)):
            raise ValueError(f"shard {tensor_path} holds {part.num_rounds} rounds but its "
                             f"metadata says {record.get('num_rounds')}")
        num_prompts += metadata.num_prompts
        parts.append(part)
    assert reference is not None
    metadata = TableMetadata.from_dict(reference)
    metadata.num_prompts = num_prompts
    return RoundTable(
        states=torch.cat([p.states for p in parts]),
        accept_probs=torch.cat([p.accept_probs for p in parts]),
        tree_sizes=torch.cat([p.tree_sizes.to(torch.int32) for p in parts]),
        prompt_index=torch.cat([p.prompt_index for p in parts]),
        metadata=metadata,
    )


def concat_tables(tables: Sequence[RoundTable]) -> RoundTable:
    """Concatenate in-memory tables (same refusal rules as the loader)."""
    if not tables:
        raise ValueError("tables must not be empty")
    reference = tables[0].metadata.to_dict()
    for index, table in enumerate(tables[1:], start=1):
        check_compatible(reference, table.metadata.to_dict(), f"tables 0 and {index}")
    metadata = replace(tables[0].metadata)
    metadata.num_prompts = sum(t.metadata.num_prompts for t in tables)
    return RoundTable(
        states=torch.cat([t.states for t in tables]),
        accept_probs=torch.cat([t.accept_probs for t in tables]),
        tree_sizes=torch.cat([t.tree_sizes.to(torch.int32) for t in tables]),
        prompt_index=torch.cat([t.prompt_index for t in tables]),
        metadata=metadata,
    )
