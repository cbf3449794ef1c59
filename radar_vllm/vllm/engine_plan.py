"""The engine plan: how a RADAR engine runs, decided once at configuration time.

RADAR is on when the speculative method is ``eagle3`` and the draft model's config carries a
``"radar"`` section (vLLM keeps unknown config.json keys in ``hf_config``). In the front-end,
:func:`resolve_and_validate` (from ``EngineArgs.create_speculative_config``) resolves the section
(checkpoint + overrides, validated) and :func:`plan_engine` (from ``create_engine_config``)
decides the rest: worker class, scheduler, mode, scratch-block pool. Both are written into the
draft ``hf_config`` as plain JSON, which reaches the engine-core and worker processes with the
config; every component reads the frozen :class:`EnginePlan` back with :func:`engine_plan`.

Duck-typed on vLLM's config objects: importing this module does not import vLLM.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radar_vllm.core.config import (
    MODE_TREE,
    RADAR_SECTION,
    SKIP_AUTO,
    RadarConfig,
    ValidatedRadar,
    read_head_config,
    resolve_radar_config,
    validate_radar_setup,
)

logger = logging.getLogger(__name__)

RADAR_METHOD = "radar"  # accepted in the speculative config, rewritten to "eagle3"
EAGLE3_METHOD = "eagle3"
RESOLVED_KEY = "radar_resolved"  # hf_config attribute: the validated settings (JSON)
PLAN_KEY = "radar_engine_plan"  # hf_config attribute: the engine plan (JSON)
STOCK_TO_RADAR_WORKER = {
    "vllm.v1.worker.cpu_worker.CPUWorker": "radar_vllm.vllm.worker.RadarCPUWorker",
    "vllm.v1.worker.gpu_worker.Worker": "radar_vllm.vllm.worker.RadarGPUWorker",
}
RADAR_SCHEDULER = "radar_vllm.vllm.scheduler.RadarScheduler"
# Never reserve more than 1 / MAX_SCRATCH_FRACTION of the KV cache as scratch blocks.
MAX_SCRATCH_FRACTION = 8
# RADAR engines' KV block size where the user chose none (tree mode's scratch copies are a block
# each; on the CPU, decoding with them is as fast as with the platform's 128 at batch 1 and 16 and
# faster at batch 64).
RADAR_BLOCK_SIZE = 32


@dataclass(frozen=True)
class EnginePlan:
    """Everything a RADAR engine's components need to agree on."""

    radar: ValidatedRadar  # the checkpoint's settings after overrides, validated
    worker_cls: str  # RADAR's worker (CPU or CUDA)
    radar_scheduler: bool  # RADAR's scheduler runs (synchronous scheduling, no custom scheduler)
    # KV blocks (manager block size) hidden from vLLM's pool for tree-row recomputation; 0: none
    scratch_blocks: int
    # the depth gate's starting estimates (a checked gate-cost table's buckets); None: measure all
    gate_table: dict[str, Any] | None = None

    @property
    def mode(self) -> str:
        return self.radar.config.mode

    @property
    def tree(self) -> bool:
        return self.radar.config.mode == MODE_TREE

    def to_dict(self) -> dict[str, Any]:
        return {"radar": _radar_to_dict(self.radar), "worker_cls": self.worker_cls,
                "radar_scheduler": self.radar_scheduler, "scratch_blocks": self.scratch_blocks,
                "gate_table": self.gate_table}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EnginePlan":
        return cls(radar=_radar_from_dict(data["radar"]), worker_cls=data["worker_cls"],
                   radar_scheduler=data["radar_scheduler"], scratch_blocks=data["scratch_blocks"],
                   gate_table=data.get("gate_table"))


def _radar_to_dict(radar: ValidatedRadar) -> dict[str, Any]:
    sampled = radar.sampled_policy_path
    return {"config": radar.config.to_dict(), "checkpoint_dir": str(radar.checkpoint_dir),
            "policy_path": str(radar.policy_path), "policy_threshold": radar.policy_threshold,
            "policy_decision": radar.policy_decision,
            "sampled_policy_path": None if sampled is None else str(sampled),
            "sampled_policy_threshold": radar.sampled_policy_threshold,
            "sampled_policy_decision": radar.sampled_policy_decision}


def _radar_from_dict(data: dict[str, Any]) -> ValidatedRadar:
    sampled = data.get("sampled_policy_path")
    return ValidatedRadar(config=RadarConfig.from_dict(data["config"]), checkpoint_dir=Path(data["checkpoint_dir"]),
                          policy_path=Path(data["policy_path"]), policy_threshold=data["policy_threshold"],
                          policy_decision=data["policy_decision"],
                          sampled_policy_path=None if sampled is None else Path(sampled),
                          sampled_policy_threshold=data.get("sampled_policy_threshold"),
                          sampled_policy_decision=data.get("sampled_policy_decision"))


# --------------------------------------------------------------------------------------------
# is RADAR requested, and with which settings


def draft_hf_config(speculative_config: Any) -> Any | None:
    return getattr(getattr(speculative_config, "draft_model_config", None), "hf_config", None)


def raw_radar_section(speculative_config: Any) -> dict[str, Any] | None:
    """The ``"radar"`` section of the draft config, or None."""
    if speculative_config is None:
        return None
    section = getattr(draft_hf_config(speculative_config), RADAR_SECTION, None)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ValueError(f'the "{RADAR_SECTION}" section of the draft model config must be a JSON object, got {section!r}')
    return section


def is_radar(vllm_config: Any) -> bool:
    """True when ``vllm_config`` asks for RADAR (eagle3 method + a radar section)."""
    speculative_config = getattr(vllm_config, "speculative_config", None)
    if speculative_config is None or getattr(speculative_config, "method", None) != EAGLE3_METHOD:
        return False
    return raw_radar_section(speculative_config) is not None


def checkpoint_dir(speculative_config: Any) -> Path:
    """Local directory of the draft checkpoint (downloaded from the hub when it is a repo id)."""
    model = speculative_config.model or speculative_config.draft_model_config.model
    if os.path.isdir(model):
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model, revision=speculative_config.revision))
    except Exception as error:  # any hub failure: say what RADAR needs
        raise FileNotFoundError(
            f"RADAR needs the checkpoint's files (the stop policy) locally, but {model!r} is not a "
            f"directory and could not be fetched from the hub ({error}); pass a local directory"
        ) from error


def resolve_and_validate(speculative_config: Any, overrides: dict[str, Any] | None = None) -> ValidatedRadar:
    """Front-end: checkpoint section + ``RADAR_OVERRIDES`` + ``overrides`` (the speculative
    config's own ``"radar"`` object), validated against the target and ``num_speculative_tokens``,
    then written back into the draft ``hf_config`` (so later calls and other processes read it)."""
    hf_config = draft_hf_config(speculative_config)
    resolved = getattr(hf_config, RESOLVED_KEY, None)
    if resolved is not None and not overrides:
        return _radar_from_dict(resolved)
    section = raw_radar_section(speculative_config)
    if section is None:
        raise ValueError("the draft model config has no RADAR section")
    directory = checkpoint_dir(speculative_config)
    extra = [("the speculative config's \"radar\" object", overrides)] if overrides else []
    config = resolve_radar_config(section, *extra)
    target = getattr(speculative_config, "target_model_config", None)
    validated = validate_radar_setup(
        config, directory, head_config=read_head_config(directory),
        target_hidden_size=target.get_hidden_size() if target is not None else None,
        target_vocab_size=target.get_vocab_size() if target is not None else None,
        num_speculative_tokens=speculative_config.num_speculative_tokens,
    )
    validated = dataclasses.replace(validated, policy_path=validated.policy_path.resolve())
    setattr(hf_config, RESOLVED_KEY, _radar_to_dict(validated))
    return validated


# --------------------------------------------------------------------------------------------
# the plan


def plan_engine(vllm_config: Any) -> EnginePlan:
    """Front-end, once per engine config: choose RADAR's worker and scheduler, record the plan."""
    radar = resolve_and_validate(vllm_config.speculative_config)
    parallel_config = vllm_config.parallel_config
    worker_cls = parallel_config.worker_cls
    if worker_cls in STOCK_TO_RADAR_WORKER:
        worker_cls = STOCK_TO_RADAR_WORKER[worker_cls]
    elif worker_cls not in STOCK_TO_RADAR_WORKER.values():
        raise ValueError(
            f"RADAR installs its own worker class on top of vLLM's CPU or CUDA worker, but worker_cls="
            f"{worker_cls!r} is set; remove --worker-cls (supported: {sorted(STOCK_TO_RADAR_WORKER)})"
        )
    if radar.config.mode == MODE_TREE and worker_cls != STOCK_TO_RADAR_WORKER["vllm.v1.worker.cpu_worker.CPUWorker"]:
        raise ValueError(
            "RADAR tree mode is implemented for vLLM's CPU platform only in this version (the CUDA verify "
            "path is not wired yet); run \"mode\": \"chain\" on GPU, e.g. --speculative-config "
            "'{\"method\": \"radar\", \"model\": DIR, \"radar\": {\"mode\": \"chain\"}}'"
        )
    scheduler_config = vllm_config.scheduler_config
    radar_scheduler = False
    if scheduler_config.async_scheduling:
        if radar.config.mode == MODE_TREE:
            raise ValueError("RADAR tree verification needs synchronous scheduling; pass --no-async-scheduling")
        logger.warning(
            "RADAR with async scheduling: drafts stay on the device, so padding after each request's "
            "stop is verified (and always rejected) and the RADAR stop-depth metrics are not available; "
            "use --no-async-scheduling for them"
        )
    elif scheduler_config.scheduler_cls in (None, RADAR_SCHEDULER):
        radar_scheduler = True
    else:
        logger.warning("RADAR: a custom scheduler_cls=%r is set, so padded draft slots are verified and the "
                       "RADAR stop-depth metrics count them", scheduler_config.scheduler_cls)
    use_radar_block_size(vllm_config.cache_config)
    scratch = 0
    if radar.config.mode == MODE_TREE:
        scratch = radar.config.scratch_blocks
        if scratch is None and radar_scheduler:
            scratch = auto_scratch_blocks(vllm_config)
        elif scratch is None:
            scratch = 0
        elif scratch and not radar_scheduler:
            logger.warning("RADAR: radar.scratch_blocks=%d needs RADAR's scheduler (which hides the blocks from "
                           "vLLM's pool); recomputing tree rows in the requests' own slots instead", scratch)
            scratch = 0
    plan = EnginePlan(radar=radar, worker_cls=worker_cls, radar_scheduler=radar_scheduler, scratch_blocks=scratch,
                      gate_table=gate_table(radar, vllm_config, scratch))
    parallel_config.worker_cls = worker_cls
    if radar_scheduler:
        scheduler_config.scheduler_cls = RADAR_SCHEDULER
    setattr(draft_hf_config(vllm_config.speculative_config), PLAN_KEY, plan.to_dict())
    return plan


def tree_verify(mode: str, scratch_blocks: int, block_size: int) -> str | None:
    """How a tree engine verifies trees, for gate-cost tables (their tree step costs depend on it):
    ``"scratch-B"`` (paths over scratch blocks, one kernel call per layer) or ``"path-B"`` (one node
    per request per call), B the KV block size; None for chain mode."""
    if mode != MODE_TREE:
        return None
    return f"{'scratch' if scratch_blocks else 'path'}-{int(block_size)}"


def gate_table(radar: ValidatedRadar, vllm_config: Any, scratch: int) -> dict[str, Any] | None:
    """The gate-cost table the depth gate starts from, checked against this engine (None: none):
    the first of ``radar.gate_costs`` (one file or a list, e.g. one per machine) that fits it.
    Tables the user named (the speculative config or RADAR_OVERRIDES) must include one that fits,
    its batch sizes up to ``max_num_seqs`` unless ``radar.gate_costs_extrapolate``; the checkpoint's
    own are skipped with a warning where none does (see ``check_gate_tables``)."""
    config = radar.config
    if config.gate_costs is None:
        return None
    if config.skip_drafting != SKIP_AUTO or config.fixed_depth is not None:
        return None  # no depth gate runs
    from radar_vllm.core.costs import describe_machine, machine_key
    from radar_vllm.core.draft_gate import check_gate_tables, gate_arms, load_gate_table, weights_id

    section = raw_radar_section(vllm_config.speculative_config) or {}
    strict = section.get("gate_costs") != config.gate_costs
    paths = config.gate_cost_paths(radar.checkpoint_dir)
    model_config = vllm_config.model_config
    caps, own_arms = gate_arms(config.max_depth, config.gate_tree_sizes)
    return check_gate_tables(
        [(path, load_gate_table(path)) for path in paths], strict=strict,
        verify=tree_verify(config.mode, scratch, vllm_config.cache_config.block_size),
        checkpoint_id=weights_id(radar.checkpoint_dir), mode=config.mode,
        dtype=str(model_config.dtype).removeprefix("torch."), target=Path(str(model_config.model)).name,
        caps=caps, own_arms=own_arms, tree_sizes=config.gate_tree_sizes, max_depth=config.max_depth,
        max_batch_size=int(vllm_config.scheduler_config.max_num_seqs), machine=machine_key(describe_machine()),
        extrapolate=bool(config.gate_costs_extrapolate))


def engine_plan(vllm_config: Any) -> EnginePlan:
    """The plan :func:`plan_engine` recorded for this config (any process; components read it once)."""
    data = getattr(draft_hf_config(vllm_config.speculative_config), PLAN_KEY, None)
    if data is None:
        raise RuntimeError("this RADAR engine config has no engine plan: it was not built through "
                           "vLLM's EngineArgs with the radar_vllm plugin loaded")
    return EnginePlan.from_dict(data)


# --------------------------------------------------------------------------------------------
# scratch blocks: reserved by the scheduler, used by the tree runner


def use_radar_block_size(cache_config: Any) -> None:
    """RADAR engines run :data:`RADAR_BLOCK_SIZE`-token KV blocks where the user chose no block
    size: a recomputed tree path's private blocks start with a copy of its request's last partial
    block, so small blocks make the copies cheap (the CPU kernel's smallest); and on the CPU plain
    decoding with them is as fast as with the platform's 128, faster in large batches (chain mode
    takes them for that). The benchmark runs every engine, stock ones included, at one block size."""
    if not getattr(cache_config, "user_specified_block_size", True) and cache_config.block_size > RADAR_BLOCK_SIZE:
        logger.info("RADAR: KV cache blocks of %d tokens (the platform default is %d; set --block-size to "
                    "choose)", RADAR_BLOCK_SIZE, cache_config.block_size)
        cache_config.block_size = RADAR_BLOCK_SIZE
        cache_config.user_specified_block_size = True  # the workers' backend check keeps it


def auto_scratch_blocks(vllm_config: Any) -> int:
    """Tree mode's default pool: every path of a full batch in one kernel call per layer. The
    scheduler caps the pool at 1/MAX_SCRATCH_FRACTION of the cache (:func:`scratch_block_count`);
    a batch whose paths need more runs several calls per layer."""
    from radar_vllm.vllm.attention import max_scratch_blocks_per_job

    nodes = max(int(vllm_config.speculative_config.num_speculative_tokens or 1), 1)
    per_path = max_scratch_blocks_per_job(nodes, int(vllm_config.cache_config.block_size))
    return int(vllm_config.scheduler_config.max_num_seqs) * nodes * per_path


def min_scratch_blocks(max_path_len: int, block_size: int) -> int:
    """Fewest manager blocks a pool needs so that one recomputed path of at most ``max_path_len``
    nodes always fits, whatever kernel block size divides the manager ``block_size``."""
    return -(-max(max_path_len - 2, 0) // block_size) + 2


def scratch_block_count(vllm_config: Any, num_blocks: int, num_kv_cache_groups: int = 1) -> int:
    """Blocks reserved at the end of a ``num_blocks`` cache: the plan's pool, capped at
    1/MAX_SCRATCH_FRACTION of the cache; 0 (with a warning) when the pool cannot serve the cache.
    The scheduler and the runner both call this with the same arguments, so they agree."""
    plan = engine_plan(vllm_config)
    count = min(plan.scratch_blocks, max(num_blocks // MAX_SCRATCH_FRACTION, 0))
    if count == 0:
        return 0
    needed = min_scratch_blocks(int(vllm_config.speculative_config.num_speculative_tokens or 1),
                                int(vllm_config.cache_config.block_size))
    if num_kv_cache_groups != 1 or count < needed:
        logger.warning("RADAR tree verification: no scratch blocks (%d asked for, %d allowed by a %d-block "
                       "cache, a path needs %d; %d KV-cache groups, 1 supported)", plan.scratch_blocks, count,
                       num_blocks, needed, num_kv_cache_groups)
        return 0
    return count


def scratch_block_ids(num_blocks: int, count: int, blocks_per_manager_block: int = 1) -> list[int]:
    """Kernel block ids of the pool: the last ``count`` manager blocks of a ``num_blocks`` cache,
    each split into ``blocks_per_manager_block`` kernel blocks."""
    if count < 0 or count > num_blocks:
        raise ValueError(f"scratch block count must be in [0, {num_blocks}], got {count}")
    if blocks_per_manager_block < 1:
        raise ValueError(f"blocks_per_manager_block must be >= 1, got {blocks_per_manager_block}")
    return list(range((num_blocks - count) * blocks_per_manager_block, num_blocks * blocks_per_manager_block))
