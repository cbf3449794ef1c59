"""The single place that chooses between a Triton kernel and its torch reference.

Rule: the Triton kernel runs when every tensor argument is on a CUDA device and Triton imports;
everything else uses the torch reference. The choice can be forced, for tests that run Triton on
CPU tensors under ``TRITON_INTERPRET=1`` or for benchmarks that time the reference on a GPU:
either with the environment variable ``RADAR_KERNEL_BACKEND`` (``auto``, ``triton``, ``torch``)
or, taking precedence, with the ``force_backend`` context manager.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

BACKEND_ENV = "RADAR_KERNEL_BACKEND"
INTERPRET_ENV = "TRITON_INTERPRET"
BACKEND_AUTO = "auto"
BACKEND_TRITON = "triton"
BACKEND_TORCH = "torch"
BACKENDS = (BACKEND_AUTO, BACKEND_TRITON, BACKEND_TORCH)

_forced_backend: str | None = None


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get(INTERPRET_ENV, "0") not in ("", "0")


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls with the backend ``name`` (``auto``, ``triton`` or ``torch``)."""
    global _forced_backend
    previous = _forced_backend
    _forced_backend = _check_backend(name)
    try:
        yield
    finally:
        _forced_backend = previous


def requested_backend() -> str:
    """The backend asked for by ``force_backend`` or the environment (``auto`` if neither)."""
    if _forced_backend is not None:
        return _forced_backend
    return _check_backend(os.environ.get(BACKEND_ENV, BACKEND_AUTO).strip().lower() or BACKEND_AUTO)


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel call on ``tensors`` (None entries ignored) should take the Triton path."""
    requested = requested_backend()
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if requested == BACKEND_TORCH:
        return False
    if requested == BACKEND_TRITON:
        if not triton_available():
            raise RuntimeError(f"{BACKEND_ENV}=triton was requested but triton is not installed")
        if not on_cuda and not interpreter_enabled():
            raise RuntimeError(
                f"the Triton backend was forced for CPU tensors; set {INTERPRET_ENV}=1 to run it "
                "in the Triton interpreter"
            )
        return True
    return on_cuda and triton_available()
