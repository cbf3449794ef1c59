"""vLLM general-plugin entry point.

``register()`` is called by vLLM in the front-end, engine-core and every worker process, possibly
more than once per process; it must be idempotent and cheap, and change nothing unless RADAR is
requested.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    logger.debug("radar_vllm plugin loaded")
