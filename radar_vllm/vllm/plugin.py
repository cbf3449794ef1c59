"""vLLM general-plugin entry point (``vllm.general_plugins``: ``radar = radar_vllm.vllm.plugin:register``).

``register()`` is called by vLLM in the front-end, engine-core and every worker process, possibly
more than once per process: it is idempotent and cheap (it wraps three methods of modules vLLM
has loaded anyway, see :mod:`radar_vllm.vllm.hooks`), and it changes nothing unless RADAR is
requested, except one declaration: ``SchedulerStats.spec_decoding_stats`` is declared as RADAR's
subclass so its tree-mode stop depths survive serialization (:mod:`radar_vllm.vllm.spec_stats`;
other engines' stats decode unchanged). It fails loudly on a vLLM version this plugin was not built for.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Supported vLLM releases: [minimum, maximum) as (major, minor).
SUPPORTED_VLLM_MIN = (0, 32)
SUPPORTED_VLLM_MAX = (0, 34)

_registered = False


def vllm_release(version: str) -> tuple[int, ...]:
    """``"0.32.1.dev3+gabc"`` -> ``(0, 32, 1)``."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release
    except InvalidVersion as error:
        raise RuntimeError(f"radar_vllm cannot parse the installed vLLM version {version!r}") from error


def check_vllm_version(version: str) -> None:
    """Raise RuntimeError unless ``version`` is in the supported range."""
    release = vllm_release(version)
    if not SUPPORTED_VLLM_MIN <= release[:2] < SUPPORTED_VLLM_MAX:
        low = ".".join(map(str, SUPPORTED_VLLM_MIN))
        high = ".".join(map(str, SUPPORTED_VLLM_MAX))
        raise RuntimeError(
            f"radar_vllm supports vLLM >= {low}, < {high}, but vLLM {version} is installed. Install a "
            f"supported vLLM (e.g. pip install 'vllm>={low},<{high}'), or keep this vLLM and disable "
            f"the plugin with VLLM_PLUGINS='' (or uninstall radar-vllm)"
        )


class _ForwardToVllmLogger(logging.Handler):
    """Hands ``radar_vllm.*`` records to vLLM's logger, whatever handlers it has at that time."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("vllm").handle(record)


def _share_vllm_log_handlers() -> None:
    """Let ``radar_vllm.*`` log records go out like vLLM's own (same handlers and level), unless
    the application configured the ``radar_vllm`` logger itself."""
    package_logger = logging.getLogger("radar_vllm")
    if package_logger.handlers:
        return
    package_logger.addHandler(_ForwardToVllmLogger())
    if package_logger.level == logging.NOTSET:
        package_logger.setLevel(logging.getLogger("vllm").getEffectiveLevel())
    package_logger.propagate = False


def register() -> None:
    """Install RADAR's hooks into vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    import vllm

    check_vllm_version(vllm.__version__)
    from radar_vllm.vllm import hooks

    hooks.install()
    _share_vllm_log_handlers()
    _registered = True
    logger.debug("radar_vllm plugin registered (vLLM %s)", vllm.__version__)
