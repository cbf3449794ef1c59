"""Kernel dispatch: reference on CPU tensors unless the Triton path is forced."""
from __future__ import annotations

import pytest
import torch

from radar_vllm.kernels import dispatch


def test_cpu_tensors_use_the_reference_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    assert not dispatch.use_triton(torch.zeros(2), None)


def test_force_backend_overrides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
    assert not dispatch.use_triton(torch.zeros(2))
    with dispatch.force_backend("triton"):
        assert dispatch.use_triton(torch.zeros(2))
        with dispatch.force_backend("torch"):
            assert not dispatch.use_triton(torch.zeros(2))
        assert dispatch.use_triton(torch.zeros(2))
    assert dispatch.requested_backend() == "torch"


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "0")
    with dispatch.force_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.use_triton(torch.zeros(2))


def test_unknown_backend_names_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="'cuda'"):
        with dispatch.force_backend("cuda"):
            pass
    monkeypatch.setenv(dispatch.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="'fast'"):
        dispatch.requested_backend()
