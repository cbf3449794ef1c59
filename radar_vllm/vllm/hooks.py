"""The few places where the plugin wraps vLLM; each wrapper is inert unless RADAR is requested.

Installed once per process by :func:`radar_vllm.vllm.plugin.register`:

1. ``EngineArgs.create_speculative_config`` (front-end): accepts ``"method": "radar"`` (rewritten
   to ``"eagle3"``, ``num_speculative_tokens`` defaulting to the checkpoint's depth) and a
   ``"radar"`` object of overrides; resolves and validates the RADAR settings before any engine
   process starts.
2. ``EngineArgs.create_engine_config`` (front-end): for a RADAR config, decides the engine plan
   (:func:`radar_vllm.vllm.engine_plan.plan_engine`: worker, scheduler, mode, scratch blocks) and
   hooks the RADAR metrics into the front-end's stat loggers.
3. ``VllmConfig.use_v2_model_runner`` (every process): RADAR runs on the V1 model runner; where
   vLLM would pick V2 the property answers False for RADAR configs and says so in the log.

4. ``Platform.register_triton_kernel_overrides`` (every worker): afterwards, probes vLLM's
   ``expand_kernel`` and installs a corrected one where it is wrong
   (:mod:`radar_vllm.vllm.cpu_sampling_fix`; every engine of the process, RADAR or not).

Everything else is vLLM's own extension points: ``worker_cls``, ``scheduler_cls``, stat loggers,
the kernel-override registry and, on CPU, the attention backend registry (``CPU_ATTN`` becomes
:class:`radar_vllm.vllm.attention.RadarCPUAttentionBackend`, vLLM's backend whose metadata may
carry a RADAR plan; without one it runs vLLM's code unchanged).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from radar_vllm.vllm.engine_plan import (
    EAGLE3_METHOD,
    RADAR_METHOD,
    is_radar,
    plan_engine,
    raw_radar_section,
    resolve_and_validate,
)

logger = logging.getLogger(__name__)

RADAR_OVERRIDES_KEY = "radar"  # key of the overrides object inside the speculative config
_WRAPPED = "__radar_wrapped__"


def _wrap_method(owner: type, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(owner, name)
    if getattr(original, _WRAPPED, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _WRAPPED, True)
    setattr(owner, name, wrapper)


def install() -> None:
    """Install the wrappers (idempotent)."""
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    from radar_vllm.vllm.spec_stats import install_stats_transport

    _wrap_method(EngineArgs, "create_speculative_config", _wrap_create_speculative_config)
    _wrap_method(EngineArgs, "create_engine_config", _wrap_create_engine_config)
    _install_v1_runner_property(VllmConfig)
    # every worker: correct the CPU build's sampled-verification kernel where it is wrong
    from radar_vllm.vllm import cpu_sampling_fix

    cpu_sampling_fix.install()
    # CPU: RADAR's attention backend (inert unless a RADAR plan is in its metadata), registered before
    # any engine of the process resolves its backend
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from radar_vllm.vllm.attention import register_backend

        register_backend()
    # before any engine of this process builds its output decoder (see the module's doc)
    install_stats_transport()


# --------------------------------------------------------------------------------------------
# 1. speculative config


def _normalized_speculative_dict(args: Any) -> dict[str, Any] | None:
    spec = args.speculative_config
    if spec is None:
        return None
    if not isinstance(spec, dict):
        return None
    return {key.replace("-", "_"): value for key, value in spec.items()}


def _default_depth(model: str, overrides: dict[str, Any] | None = None) -> int | None:
    """Draft tokens per request of a local RADAR checkpoint (for ``"method": "radar"`` without N):
    ``max_depth`` in chain mode, ``total_tokens - 1`` in tree mode."""
    import os

    from radar_vllm.core.config import RadarConfig, env_overrides, radar_section, read_head_config

    if not os.path.isdir(model):
        return None
    section = radar_section(read_head_config(model))
    if section is None:
        return None
    config = RadarConfig.from_dict(section).with_overrides(env_overrides())
    if overrides:
        config = config.with_overrides(overrides, source="the speculative config's \"radar\" object")
    return config.num_draft_tokens


def _rewrite_radar_request(args: Any) -> tuple[bool, dict[str, Any]]:
    """Turn ``"method": "radar"`` into ``"eagle3"`` and take out the ``"radar"`` overrides object
    (on ``args``, in place); return (RADAR explicitly requested, overrides)."""
    radar_requested = False
    overrides: dict[str, Any] = {}
    if getattr(args, "spec_method", None) == RADAR_METHOD:
        args.spec_method = EAGLE3_METHOD
        radar_requested = True
    spec = _normalized_speculative_dict(args)
    if spec is None:
        return radar_requested, overrides
    if spec.get("method") == RADAR_METHOD:
        spec["method"] = EAGLE3_METHOD
        radar_requested = True
    if RADAR_OVERRIDES_KEY in spec:
        overrides = spec.pop(RADAR_OVERRIDES_KEY)
        if not isinstance(overrides, dict):
            raise ValueError(
                f'speculative_config["{RADAR_OVERRIDES_KEY}"] must be an object of RADAR options, got {overrides!r}'
            )
    if radar_requested and spec.get("num_speculative_tokens") is None and spec.get("model"):
        depth = _default_depth(str(spec["model"]), overrides)
        if depth is not None:
            spec["num_speculative_tokens"] = depth
    args.speculative_config = spec
    return radar_requested, overrides


def _wrap_create_speculative_config(original: Callable[..., Any]) -> Callable[..., Any]:
    def create_speculative_config(self: Any, target_model_config: Any, target_parallel_config: Any) -> Any:
        # The user's arguments are restored afterwards, so that building the config again (the
        # same EngineArgs may be used twice) sees the same request.
        saved = (self.spec_method, self.speculative_config)
        try:
            radar_requested, overrides = _rewrite_radar_request(self)
            speculative_config = original(self, target_model_config, target_parallel_config)
        finally:
            self.spec_method, self.speculative_config = saved
        if speculative_config is None:
            return None
        section = raw_radar_section(speculative_config)
        if section is None:
            if radar_requested or overrides:
                raise ValueError(
                    f"RADAR was requested but the draft model {speculative_config.model!r} is not a RADAR "
                    f'checkpoint (its config.json has no "radar" section); build one with '
                    f"`radar-vllm pack HEAD_DIR POLICY OUT_DIR`"
                )
            return speculative_config
        if speculative_config.method != EAGLE3_METHOD:
            raise ValueError(
                f'the RADAR checkpoint {speculative_config.model!r} runs with "method": "eagle3" or '
                f'"radar", got "method": {speculative_config.method!r}'
            )
        if getattr(speculative_config, "draft_sample_method", "greedy") != "greedy":
            raise ValueError(
                "RADAR drafts greedily (its policy reads the draft distribution); remove "
                f"draft_sample_method={speculative_config.draft_sample_method!r} from the speculative config"
            )
        if getattr(speculative_config, "parallel_drafting", False):
            raise ValueError("RADAR drafts one level per draft call; remove parallel_drafting from the speculative config")
        validated = resolve_and_validate(speculative_config, overrides)
        _keep_trailing_prefix_block(speculative_config, saved[1])
        logger.info(
            "RADAR enabled: checkpoint %s, mode=%s, max_depth=%d, top_k=%d, decision=%s, threshold=%.3f, policy %s",
            validated.checkpoint_dir,
            validated.config.mode,
            validated.config.max_depth,
            validated.config.top_k,
            validated.decision,
            validated.threshold,
            validated.policy_path,
        )
        return speculative_config

    return create_speculative_config


BLOCK_DROP_KEY = "disable_eagle_block_drop"


def _keep_trailing_prefix_block(speculative_config: Any, user_spec: Any) -> None:
    """RADAR engines keep the last block of a prefix-cache hit, where the user did not say otherwise.

    vLLM's EAGLE engines drop it and have the target recompute its tokens (up to a block's worth
    per new request; on a CPU a large part of a served step with arrivals), only so that the
    drafter's KV at the block's last position, which depends on the token after it, is rewritten.
    RADAR's drafter skips most rounds under load anyway (its KV at skipped positions is written
    only when it drafts again), and a draft from a slightly different drafter KV costs at most
    acceptance, never outputs: verification does not trust the drafter.
    ``"disable_eagle_block_drop": false`` in the speculative config keeps vLLM's behaviour."""
    given = {str(key).replace("-", "_") for key in user_spec} if isinstance(user_spec, dict) else set()
    if BLOCK_DROP_KEY in given or getattr(speculative_config, BLOCK_DROP_KEY, True):
        return
    setattr(speculative_config, BLOCK_DROP_KEY, True)
    logger.info("RADAR: prefix-cache hits keep their last block (%s=true; set it false in the speculative config "
                "for vLLM's EAGLE behaviour)", BLOCK_DROP_KEY)


# --------------------------------------------------------------------------------------------
# 2. engine config: worker, scheduler, metrics


def _wrap_create_engine_config(original: Callable[..., Any]) -> Callable[..., Any]:
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        vllm_config = original(self, *args, **kwargs)
        if is_radar(vllm_config):
            plan_engine(vllm_config)
            install_metrics_hook()
        return vllm_config

    return create_engine_config


def install_metrics_hook() -> None:
    """Add :class:`RadarStatLogger` to every front-end ``StatLoggerManager`` of a RADAR engine."""
    from vllm.v1.metrics.loggers import StatLoggerManager

    def make_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
            original(self, vllm_config, *args, **kwargs)
            # Chain mode: stop depths are the draft lengths in vLLM's per-position counters; tree
            # mode: RADAR's scheduler adds the worker's stop depths (see radar_vllm.vllm.metrics).
            if is_radar(vllm_config):
                from radar_vllm.vllm.metrics import RadarStatLogger

                self.stat_loggers.append(RadarStatLogger(vllm_config, self.engine_indexes))

        return __init__

    _wrap_method(StatLoggerManager, "__init__", make_wrapper)


# --------------------------------------------------------------------------------------------
# 3. the V1 model runner


def _install_v1_runner_property(vllm_config_cls: type) -> None:
    original = vllm_config_cls.__dict__.get("use_v2_model_runner")
    if not isinstance(original, property) or getattr(original.fget, _WRAPPED, False):
        return

    def use_v2_model_runner(self: Any) -> bool:
        if not is_radar(self):
            return original.fget(self)
        import vllm.envs as envs

        if envs.VLLM_USE_V2_MODEL_RUNNER:
            raise ValueError(
                "RADAR runs on vLLM's V1 model runner, but VLLM_USE_V2_MODEL_RUNNER=1 is set; unset it"
            )
        if envs.VLLM_USE_V2_MODEL_RUNNER is None and not getattr(use_v2_model_runner, "_logged", False):
            use_v2_model_runner._logged = True  # type: ignore[attr-defined]
            logger.info("RADAR: using the V1 model runner (RADAR's proposer extends the V1 EAGLE proposer)")
        return False

    setattr(use_v2_model_runner, _WRAPPED, True)
    setattr(vllm_config_cls, "use_v2_model_runner", property(use_v2_model_runner, doc=original.__doc__))

