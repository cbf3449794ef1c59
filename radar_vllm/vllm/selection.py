"""Is RADAR requested by this vLLM config, and with which settings?

RADAR is on when the speculative method is ``eagle3`` and the draft model's config carries a
``"radar"`` section (vLLM keeps unknown config.json keys in ``hf_config``). The front-end resolves
the section once (checkpoint + overrides, validated) and writes the result back into the draft
``hf_config`` with ``radar_resolved = True``, so the engine-core and worker processes, which
receive the same config, read the final settings without re-applying overrides.

Duck-typed on vLLM's config objects: importing this module does not import vLLM.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from radar_vllm.core.config import (
    RADAR_SECTION,
    RadarConfig,
    ValidatedRadar,
    resolve_radar_config,
    validate_radar_setup,
)

logger = logging.getLogger(__name__)

RADAR_METHOD = "radar"  # accepted in the speculative config, rewritten to "eagle3"
EAGLE3_METHOD = "eagle3"
RESOLVED_FLAG = "radar_resolved"

_validated: dict[int, ValidatedRadar] = {}  # id(speculative_config) -> settings


def draft_hf_config(speculative_config: Any) -> Any | None:
    draft_model_config = getattr(speculative_config, "draft_model_config", None)
    return getattr(draft_model_config, "hf_config", None)


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


def _target_sizes(speculative_config: Any) -> tuple[int | None, int | None]:
    target = getattr(speculative_config, "target_model_config", None)
    if target is None:
        return None, None
    return target.get_hidden_size(), target.get_vocab_size()


def resolve_and_validate(
    speculative_config: Any,
    overrides: dict[str, Any] | None = None,
) -> ValidatedRadar:
    """Resolve and validate the RADAR settings of ``speculative_config`` (cached per object).

    In the front-end (not yet resolved): checkpoint section + ``RADAR_OVERRIDES`` +
    ``overrides`` (the speculative config's own ``"radar"`` object), validated against the target
    and ``num_speculative_tokens``, then written back resolved. Elsewhere: read back as is.
    """
    key = id(speculative_config)
    if key in _validated and not overrides:
        return _validated[key]
    section = raw_radar_section(speculative_config)
    if section is None:
        raise ValueError("the draft model config has no RADAR section")
    hf_config = draft_hf_config(speculative_config)
    directory = checkpoint_dir(speculative_config)
    if getattr(hf_config, RESOLVED_FLAG, False):
        config = RadarConfig.from_dict(section)
    else:
        extra = [("the speculative config's \"radar\" object", overrides)] if overrides else []
        config = resolve_radar_config(section, *extra)
    target_hidden_size, target_vocab_size = _target_sizes(speculative_config)
    validated = validate_radar_setup(
        config,
        directory,
        head_config=_head_config_dict(directory),
        target_hidden_size=target_hidden_size,
        target_vocab_size=target_vocab_size,
        num_speculative_tokens=speculative_config.num_speculative_tokens,
    )
    resolved = dict(config.to_dict(), policy=str(validated.policy_path.resolve()))
    setattr(hf_config, RADAR_SECTION, resolved)
    setattr(hf_config, RESOLVED_FLAG, True)
    final = ValidatedRadar(
        config=RadarConfig.from_dict(resolved),
        checkpoint_dir=validated.checkpoint_dir,
        policy_path=validated.policy_path.resolve(),
        policy_threshold=validated.policy_threshold,
        policy_decision=validated.policy_decision,
    )
    _validated[key] = final
    return final


def _head_config_dict(directory: Path) -> dict[str, Any]:
    from radar_vllm.core.config import read_head_config

    return read_head_config(directory)


def radar_settings(vllm_config: Any) -> ValidatedRadar:
    """The RADAR settings of a config for which :func:`is_radar` holds."""
    return resolve_and_validate(vllm_config.speculative_config)
