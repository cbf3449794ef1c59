"""The configuration rows of a benchmark: what each engine is started with.

=====================  ======================================================================
row                    speculative config (vLLM ``speculative_config``)
=====================  ======================================================================
no-spec                none
eagle3-kK              stock EAGLE-3 chain, plain head (no radar section), K draft tokens
eagle3-dynamic         stock EAGLE-3 + Dynamic SD (``num_speculative_tokens_per_batch_size``): a
                       batch-size schedule of K (0 allowed), tuned by the harness from this
                       run's no-spec and eagle3-kK cells (the best K per measured batch size)
eagle3-kK-uncorrected  the same, vLLM as shipped: ``VLLM_PLUGINS=""`` in its worker, so
                       without radar_vllm's correction of the CPU build's sampled
                       verification; T > 0 only
radar-chain            the RADAR checkpoint as shipped (chain mode, the learned stop)
radar-chain-dD         RADAR's chain path without the stop policy: ``{"mode": "chain",
                       "fixed_depth": D}``, every round drafts exactly D tokens
radar-tree             the RADAR checkpoint with ``{"mode": "tree"}``
static-tree            ``{"mode": "tree", "threshold": 0.0}``: the policy always continues, so
                       every round drafts the full depth (a static full-depth tree; the policy
                       still runs)
confidence-chain       the same head with a hand-built policy that continues while the drafted
                       chain's cumulative probability is >= the threshold (training-free peer)
=====================  ======================================================================

Every row except the ``-uncorrected`` ones runs with the radar_vllm plugin loaded, which corrects
vLLM's CPU ``expand_kernel`` for every engine (:mod:`radar_vllm.vllm.cpu_sampling_fix`); an
``-uncorrected`` row shows stock EAGLE-3 at T > 0 as shipped (greedy-only batches are not affected).

Stock EAGLE-3 rows run with ``"disable_eagle_block_drop": true``, as RADAR engines do by default:
a prefix-cache hit then keeps its last block instead of having the target recompute it, so stock
and RADAR rows prefill the same tokens (vLLM's own default recomputes up to a block per new request,
which on this CPU costs a served engine with arrivals several percent).

Every RADAR-side row is the same head with a different policy or override, so adding a row is
adding an entry here. Rows the installed plugin cannot run (tree mode where it is not supported)
are kept with ``skip_reason`` and reported as skipped.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from radar_vllm.core.config import (
    MODE_CHAIN,
    MODE_TREE,
    SUPPORTED_MODES,
    RadarConfig,
    radar_section,
    read_head_config,
)

KIND_NONE = "none"
KIND_EAGLE3 = "eagle3"
KIND_RADAR = "radar"
KIND_STATIC = "static"
KIND_CONFIDENCE = "confidence"
KINDS = (KIND_NONE, KIND_EAGLE3, KIND_RADAR, KIND_STATIC, KIND_CONFIDENCE)
RADAR_KINDS = (KIND_RADAR, KIND_STATIC, KIND_CONFIDENCE)  # rows served by RadarProposer

NO_SPEC = "no-spec"
RADAR_CHAIN = "radar-chain"
FIXED_DEPTH_PREFIX = RADAR_CHAIN + "-d"
RADAR_TREE = "radar-tree"
STATIC_TREE = "static-tree"
CONFIDENCE_CHAIN = "confidence-chain"
ALWAYS_CONTINUE_THRESHOLD = 0.0  # P(continue) >= 0 holds always: full depth every round
EAGLE3_METHOD = "eagle3"
UNCORRECTED_SUFFIX = "-uncorrected"
EAGLE_BLOCK_DROP_KEY = "disable_eagle_block_drop"
EAGLE3_DYNAMIC = "eagle3-dynamic"


def eagle3_name(k: int) -> str:
    return f"eagle3-k{k}"


def uncorrected_name(k: int) -> str:
    """The stock EAGLE-3 row at K run without the plugin: ``eagle3-k1-uncorrected``."""
    return eagle3_name(k) + UNCORRECTED_SUFFIX


def fixed_depth_name(depth: int) -> str:
    """The RADAR chain row at a fixed depth (no stop policy): ``radar-chain-d1``."""
    return f"{FIXED_DEPTH_PREFIX}{depth}"


def fixed_depth_of(name: str) -> int | None:
    """D of a ``radar-chain-dD`` row name, None for any other name."""
    digits = name.removeprefix(FIXED_DEPTH_PREFIX)
    return int(digits) if name.startswith(FIXED_DEPTH_PREFIX) and digits.isdigit() else None


@dataclass(frozen=True)
class BenchConfig:
    """One row: a name, its kind and the draft model + settings the engine gets."""

    name: str
    kind: str
    mode: str = MODE_CHAIN  # chain | tree (RADAR-side rows)
    num_speculative_tokens: int | None = None  # K for EAGLE-3; draft slots per request for RADAR
    max_depth: int | None = None  # draft calls per round at most
    draft_model: str | None = None  # head / RADAR checkpoint directory
    radar_overrides: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None
    description: str = ""
    plugin_disabled: bool = False  # worker (and server) with VLLM_PLUGINS="": vLLM as shipped
    sampled_only: bool = False  # runs the T > 0 temperatures only
    dynamic_schedule: list[list[int]] | None = None  # Dynamic SD: [[first batch size, last, K], ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != KIND_NONE and (self.draft_model is None or self.num_speculative_tokens is None):
            raise ValueError(f"config {self.name!r}: draft_model and num_speculative_tokens are required")

    @property
    def is_speculative(self) -> bool:
        return self.kind != KIND_NONE

    @property
    def uses_radar(self) -> bool:
        return self.kind in RADAR_KINDS

    @property
    def skipped(self) -> bool:
        return self.skip_reason is not None

    def speculative_config(self) -> dict[str, Any] | None:
        """The ``speculative_config`` for vLLM (None for no speculation)."""
        if not self.is_speculative:
            return None
        spec: dict[str, Any] = {
            "method": EAGLE3_METHOD,
            "model": self.draft_model,
            "num_speculative_tokens": self.num_speculative_tokens,
        }
        if self.radar_overrides:
            spec["radar"] = dict(self.radar_overrides)
        if self.dynamic_schedule is not None:
            spec["num_speculative_tokens_per_batch_size"] = [list(entry) for entry in self.dynamic_schedule]
        if self.kind == KIND_EAGLE3:  # RADAR engines' default: prefix-cache hits keep their last block
            spec[EAGLE_BLOCK_DROP_KEY] = True
        return spec

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), speculative_config=self.speculative_config())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchConfig":
        data = {key: value for key, value in data.items() if key != "speculative_config"}
        return cls(**data)


TREE_UNSUPPORTED_REASON = (
    "tree mode is not supported inside vLLM by this radar_vllm version (radar_vllm.core.config.SUPPORTED_MODES "
    "lacks 'tree')"
)


def radar_config_of(checkpoint: str, overrides: dict[str, Any] | None = None) -> RadarConfig:
    """The checkpoint's RADAR settings with ``overrides`` applied (ValueError without a radar section)."""
    section = radar_section(read_head_config(checkpoint))
    if section is None:
        raise ValueError(f"{checkpoint} is not a RADAR checkpoint: its config.json has no \"radar\" section")
    config = RadarConfig.from_dict(section)
    return config.with_overrides(overrides or {}, "benchmark overrides")


def _radar_row(name: str, kind: str, checkpoint: str, overrides: dict[str, Any], tree_ok: bool,
               description: str) -> BenchConfig:
    config = radar_config_of(checkpoint, overrides)
    skip = TREE_UNSUPPORTED_REASON if config.mode == MODE_TREE and not tree_ok else None
    return BenchConfig(
        name=name,
        kind=kind,
        mode=config.mode,
        num_speculative_tokens=config.num_draft_tokens,
        max_depth=config.max_depth,
        draft_model=checkpoint,
        radar_overrides=dict(overrides),
        skip_reason=skip,
        description=description,
    )


def build_configs(
    *,
    head: str | None,
    radar_checkpoint: str | None,
    k_list: Sequence[int],
    include_radar: bool = True,
    include_tree: bool = True,
    include_static_tree: bool = True,
    confidence_checkpoint: str | None = None,
    tree_supported: bool | None = None,
    only: Sequence[str] = (),
    uncorrected_k: Sequence[int] = (),
    fixed_depths: Sequence[int] = (),
    dynamic_sd: bool = False,
) -> list[BenchConfig]:
    """All rows in run order: no-spec first (the match reference), EAGLE-3 by K, the uncorrected
    stock rows (``uncorrected_k``), then RADAR rows (radar-chain, the fixed-depth chains of
    ``fixed_depths``, the tree rows).

    ``tree_supported`` defaults to what the installed plugin says; the reference decoder passes
    True. ``only`` keeps the named rows (no-spec always stays: every ratio needs it).
    """
    if tree_supported is None:
        tree_supported = MODE_TREE in SUPPORTED_MODES
    configs = [BenchConfig(name=NO_SPEC, kind=KIND_NONE, description="target only")]
    if head is not None:
        for k in sorted(set(k_list)):
            configs.append(BenchConfig(
                name=eagle3_name(k), kind=KIND_EAGLE3, num_speculative_tokens=k, max_depth=k,
                draft_model=head, description=f"stock EAGLE-3 chain, {k} draft tokens",
            ))
        if dynamic_sd and k_list:
            configs.append(BenchConfig(
                name=EAGLE3_DYNAMIC, kind=KIND_EAGLE3, num_speculative_tokens=max(k_list), max_depth=max(k_list),
                draft_model=head, description="stock EAGLE-3 + Dynamic SD (schedule tuned from the K sweep)",
            ))
        for k in sorted(set(uncorrected_k)):
            configs.append(BenchConfig(
                name=uncorrected_name(k), kind=KIND_EAGLE3, num_speculative_tokens=k, max_depth=k,
                draft_model=head, plugin_disabled=True, sampled_only=True,
                description=f"stock EAGLE-3 chain, {k} draft tokens, vLLM as shipped (VLLM_PLUGINS=''), T > 0 only",
            ))
    if include_radar and radar_checkpoint is not None:
        configs.append(_radar_row(RADAR_CHAIN, KIND_RADAR, radar_checkpoint, {"mode": MODE_CHAIN},
                                  tree_supported, "RADAR, chain, learned stop"))
        for depth in sorted(set(fixed_depths)):
            configs.append(_radar_row(fixed_depth_name(depth), KIND_RADAR, radar_checkpoint,
                                      {"mode": MODE_CHAIN, "fixed_depth": depth}, tree_supported,
                                      f"RADAR, chain, no stop policy: {depth} draft token(s) every round"))
        if include_tree:
            configs.append(_radar_row(RADAR_TREE, KIND_RADAR, radar_checkpoint, {"mode": MODE_TREE},
                                      tree_supported, "RADAR, dynamic tree, learned stop"))
        if include_static_tree:
            configs.append(_radar_row(
                STATIC_TREE, KIND_STATIC, radar_checkpoint,
                {"mode": MODE_TREE, "threshold": ALWAYS_CONTINUE_THRESHOLD},
                tree_supported, "static full-depth tree (policy forced to continue)"))
    if confidence_checkpoint is not None:
        configs.append(_radar_row(CONFIDENCE_CHAIN, KIND_CONFIDENCE, confidence_checkpoint,
                                  {"mode": MODE_CHAIN}, tree_supported,
                                  "chain, stop when the draft's cumulative probability falls below a threshold"))
    if only:
        wanted = set(only) | {NO_SPEC}
        unknown = sorted(set(only) - {c.name for c in configs})
        if unknown:
            raise ValueError(f"unknown configuration name(s) {unknown}; available: {[c.name for c in configs]}")
        configs = [c for c in configs if c.name in wanted]
    return configs


def tune_dynamic_schedule(cells: Sequence[dict[str, Any]], k_list: Sequence[int],
                          batch_sizes: dict[str, int], max_batch_size: int) -> list[list[int]]:
    """Dynamic SD's schedule from a K sweep: for each measured batch size (``batch_sizes``: offline
    mode -> requests per batch), the K among 0 (no-spec) and ``k_list`` with the highest median
    tokens/s summed over that mode's cells; batch sizes between two measured ones take the smaller
    one's K, the largest measured one's K runs up to ``max_batch_size``."""
    names = {NO_SPEC: 0, **{eagle3_name(k): k for k in k_list}}
    totals: dict[int, dict[int, float]] = {}
    for cell in cells:
        if cell["config"] in names and cell["mode"] in batch_sizes and not cell.get("sampling_broken"):
            per_k = totals.setdefault(batch_sizes[cell["mode"]], {})
            k = names[cell["config"]]
            per_k[k] = per_k.get(k, 0.0) + float(cell["tokens_per_s"]["median"])
    if not totals:
        raise ValueError("no no-spec or stock EAGLE-3 cells to tune a Dynamic SD schedule from")
    measured = sorted(totals)
    schedule = []
    for index, size in enumerate(measured):
        first = 1 if index == 0 else size
        last = measured[index + 1] - 1 if index + 1 < len(measured) else max(max_batch_size, size)
        best_k = max(totals[size], key=lambda k: (totals[size][k], -k))
        schedule.append([first, last, best_k])
    return schedule
