"""Frozen configuration dataclasses built once at the entry point and passed down explicitly.

``TreeConfig`` holds the shape of the EAGLE-style dynamic draft tree that RADAR grows one level
per draft-model call (radar-algorithm.md section 1):

- ``top_k``: tokens proposed per expanded node, and the width of the frontier (default 10);
- ``max_depth``: the most draft levels per round, i.e. ``1 + (max_depth - 1)`` draft calls that
  grow the tree (default 7);
- ``total_tokens``: tokens handed to the verifier per request, the root included (default 60),
  so a tree has at most ``total_tokens - 1`` draft nodes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping


def _require_int(name: str, value: Any) -> int:
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
        _require_int("top_k", self.top_k)
        _require_int("max_depth", self.max_depth)
        _require_int("total_tokens", self.total_tokens)
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
        _require_int("depth", depth)
        if not 1 <= depth <= self.max_depth:
            raise ValueError(f"depth must be in [1, {self.max_depth}], got {depth}")
        return self.top_k * (1 + self.top_k * (depth - 1))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

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
