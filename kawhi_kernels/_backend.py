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
        return ("no compiled extension is importable (neither the in-tree kawhi_kernels._C nor "
                "a kawhi-kernels-cuda12/13 companion)")
    if not ext.has_cuda():
        return f"{ext.__name__} was built without CUDA (nvcc was not found at build time)"
    if device.type != "cuda":
        return f"tensors are on {device}; the CUDA backend needs CUDA tensors"
    return cuda_backend_problem(device.index if device.index is not None else torch.cuda.current_device())


# fp32 inputs of the Triton attention_mass use tf32x3 products (three TF32 MMAs on operand
# splits): beyond D = 128 no tile avoids register spills on sm_80/sm_90 (see
# ``python -m kawhi_kernels.triton.builds``), so such inputs stay on the reference.
TRITON_MASS_FP32_MAX_HEAD_DIM = 128


def triton_mass_head_dim_limit(dtype: torch.dtype) -> tuple[int, str]:
    """(largest head dim, qualifier) the Triton ``attention_mass`` takes for ``dtype`` inputs."""
    if dtype == torch.float32:
        return TRITON_MASS_FP32_MAX_HEAD_DIM, "for fp32 inputs (bf16/fp16 go to 256)"
    return FUSED_MAX_HEAD_DIM, ""


def check_head_dim(name: str, d: int, backend: str, limit: int = FUSED_MAX_HEAD_DIM,
                   what: str = "") -> None:
    """ValueError naming ``name`` when the head dim exceeds what the fused kernels support
    (``limit``; ``what`` qualifies it, e.g. "for fp32 inputs")."""
    if d > limit:
        qualifier = f" {what}" if what else ""
        raise ValueError(f"{name}: head dim {d} exceeds the {backend} backend limit {limit}"
                         f"{qualifier}; use backend='torch'")


def resolve_backend(backend: str, device: torch.device, op_name: str,
                    implemented: tuple[str, ...], *, head_dim: int | None = None,
                    triton_head_dim: tuple[int, str] | None = None) -> str:
    """Turn ``backend`` (possibly "auto") into a concrete backend that can run ``op_name`` on
    ``device``; raise ``ValueError``/``RuntimeError`` with the reason when a forced one cannot.
    ``head_dim`` above :data:`FUSED_MAX_HEAD_DIM` (or above the Triton limit given as
    ``triton_head_dim`` = (limit, "for ... inputs")) keeps ``auto`` off that backend."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    reasons = {"triton": triton_unavailable_reason, "cuda": cuda_unavailable_reason}
    limits = {"triton": triton_head_dim or (FUSED_MAX_HEAD_DIM, "")}
    triton_limit = limits["triton"][0]
    too_wide = head_dim is not None and head_dim > triton_limit
    if backend == "auto":
        # Rule for 'cuda': auto never picks it until GPU timings measured next to Triton (same
        # run, benchmarks/results/) show a shape class where it wins; then that class, and its
        # data, are written here. None exist yet (csrc/ has not run on a GPU), so auto is
        # Triton on CUDA devices and the reference elsewhere; backend='cuda' must be asked for.
        if (device.type == "cuda" and "triton" in implemented and not too_wide
                and triton_unavailable_reason(device) is None):
            return "triton"
        return "torch"
    if backend != "torch" and head_dim is not None:
        check_head_dim("q", head_dim, backend)
        if backend in limits:
            check_head_dim("q", head_dim, backend, *limits[backend])
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
