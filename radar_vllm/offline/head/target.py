"""Checks on the target model an EAGLE-3 head is trained for (Llama architecture only)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    path: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    config: dict[str, Any]

    def default_aux_layers(self) -> list[int]:
        """vLLM's default aux layer ids (2, L // 2, L - 3), sorted and de-duplicated."""
        return sorted({2, self.num_layers // 2, self.num_layers - 3} & set(range(self.num_layers)))

    def check_aux_layers(self, layers: Sequence[int]) -> None:
        """ValueError unless ``layers`` are distinct, sorted ids in [1, num_layers)."""
        if not layers:
            raise ValueError("aux_layers=[]; at least one aux layer id is needed")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"aux_layers={list(layers)}; ids must be sorted and distinct")
        for layer in layers:
            if not 0 < layer < self.num_layers:
                raise ValueError(
                    f"aux_layers contains {layer}; the target has {self.num_layers} layers, so ids "
                    f"must lie in [1, {self.num_layers - 1}]"
                )


def check_target(path: str | Path) -> TargetInfo:
    """Read and validate a target HF folder's config.json."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"target={str(path)!r} has no config.json")
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    if not any(arch in SUPPORTED_ARCHITECTURES for arch in architectures):
        raise ValueError(
            f"target={str(path)!r} has architectures {architectures}; supported: {SUPPORTED_ARCHITECTURES}"
        )
    return TargetInfo(
        path=str(path),
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=int(config["hidden_size"]),
        vocab_size=int(config["vocab_size"]),
        config=config,
    )
