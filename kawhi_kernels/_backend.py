"""Which backends can run where, and how ``backend="auto"`` chooses.

Backends: ``torch`` (reference, any device), ``triton`` (fused kernels on CUDA tensors, or on CPU
tensors under ``TRITON_INTERPRET=1`` for tests), ``cuda`` (the ``kawhi_kernels._C`` extension,
CUDA tensors only). ``auto`` picks ``triton`` for CUDA tensors when Triton is importable (the
hand-written CUDA kernels have no benchmark data yet that would justify preferring them), and
``torch`` otherwise.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
# Largest head dim the fused kernels (Triton and CUDA, csrc/ops.h kMaxHeadDim) are built for; the
# reference has no limit.
FUSED_MAX_HEAD_DIM = 256


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton backend can run on ``device``, else a human-readable reason."""
    error = _import_error("triton")
    if error is not None:
        return f"triton is not importable ({error})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreter_enabled():
        return None
    return (f"tensors are on {device}; Triton kernels need CUDA tensors "
            "(or CPU tensors with TRITON_INTERPRET=1 set before importing triton)")


def cuda_unavailable_reason(device: torch.device) -> str | None:
    """None when the CUDA extension can run on ``device``, else a reason (extension missing or
    built without CUDA, no driver or one too old for its runtime, no code for the GPU's arch)."""
    from ._extension import cuda_backend_problem, load_extension

    ext = load_extension()
    if ext is None:
        return "the compiled extension kawhi_kernels._C is not importable"
    if not ext.has_cuda():
        return "kawhi_kernels._C was built without CUDA (nvcc was not found at build time)"
    if device.type != "cuda":
        return f"tensors are on {device}; the CUDA backend needs CUDA tensors"
    return cuda_backend_problem(device.index if device.index is not None else torch.cuda.current_device())


def check_head_dim(name: str, d: int, backend: str) -> None:
    """ValueError naming ``name`` when the head dim exceeds what the fused kernels support."""
    if d > FUSED_MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {d} exceeds the {backend} backend limit "
                         f"{FUSED_MAX_HEAD_DIM}; use backend='torch'")


def resolve_backend(backend: str, device: torch.device, op_name: str,
                    implemented: tuple[str, ...], *, head_dim: int | None = None) -> str:
    """Turn ``backend`` (possibly "auto") into a concrete backend that can run ``op_name`` on
    ``device``; raise ``ValueError``/``RuntimeError`` with the reason when a forced one cannot.
    ``head_dim`` above :data:`FUSED_MAX_HEAD_DIM` keeps ``auto`` on the reference."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    reasons = {"triton": triton_unavailable_reason, "cuda": cuda_unavailable_reason}
    too_wide = head_dim is not None and head_dim > FUSED_MAX_HEAD_DIM
    if backend == "auto":
        if (device.type == "cuda" and "triton" in implemented and not too_wide
                and triton_unavailable_reason(device) is None):
            return "triton"
        return "torch"
    if backend != "torch" and head_dim is not None:
        check_head_dim("q", head_dim, backend)
    if backend not in implemented:
        raise ValueError(f"backend: {op_name} has no {backend!r} implementation "
                         f"(available: {list(implemented)})")
    if backend in reasons:
        reason = reasons[backend](device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run {op_name}: {reason}")
    return backend


def available_backends(device: torch.device) -> dict[str, str | None]:
    """{backend: None if usable on ``device`` else the reason} — used by ``kawhi-kernels info``."""
    return {
        "torch": None,
        "triton": triton_unavailable_reason(device),
        "cuda": cuda_unavailable_reason(device),
    }
