"""Helpers shared by the Triton kernels: sizes, launch options, host-side block tables, and the
fp16-split matmul pieces used for fp32-accurate products on tensor cores."""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreter_enabled
from .._fused_host import next_pow2  # noqa: F401  (re-exported for the kernel modules)
from .._compat import interpreter_computes_bf16_dot


def launch_options(num_warps: int, num_stages: int | None = None,
                   maxnreg: int | None = None) -> dict:
    """Launch keywords for compiled kernels; none under the interpreter, which ignores them.
    ``maxnreg`` (a ptxas register limit per thread) is passed on NVIDIA only."""
    if triton_interpreter_enabled():
        return {}
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    if maxnreg is not None and torch.version.hip is None:
        options["maxnreg"] = maxnreg
    return options


def interpreter_dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel's ``tl.dot`` operands of ``dtype`` are given as: fp32 for bf16 when the
    Triton interpreter cannot multiply bf16 tiles (:func:`.._compat.interpreter_computes_bf16_dot`),
    else ``dtype``. Exact: every bf16 value is an fp32 value, and compiled bf16 tensor-core
    products accumulate in fp32 as well, so results match a compiled bf16 kernel up to
    summation order."""
    if (dtype == torch.bfloat16 and triton_interpreter_enabled()
            and not interpreter_computes_bf16_dot()):
        return torch.float32
    return dtype


def interpreter_dot_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors a kernel feeds to ``tl.dot``, converted to :func:`interpreter_dot_dtype`
    (unchanged for compiled launches and for other dtypes)."""
    return tuple(t.to(interpreter_dot_dtype(t.dtype)) for t in tensors)


def device_guard(device: torch.device):
    """Context that makes ``device`` the current CUDA device while kernels launch.

    Triton launches on the *current* device (and its current stream), not on the device of the
    tensors passed in: a launch for tensors on ``cuda:1`` while ``cuda:0`` is current would run
    on GPU 0 with GPU 1 addresses. CPU tensors (the interpreter) need no guard.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def compiled_dot_precision() -> str:
    """``tl.dot`` input precision of fp32 operands in compiled GPU kernels: ``tf32x3`` on NVIDIA
    (three TF32 MMAs, ~fp32 error), ``ieee`` on ROCm."""
    return "ieee" if torch.version.hip is not None else "tf32x3"


def dot_precision(device: torch.device) -> str:
    """``tl.dot`` input precision for fp32 operands of a launch on ``device``: near-fp32 accuracy
    everywhere (:func:`compiled_dot_precision` on GPUs; the interpreter computes with numpy in
    fp32 whatever is asked, and takes ``ieee``). fp16/bf16 operands ignore this setting."""
    if device.type == "cuda" and not triton_interpreter_enabled():
        return compiled_dot_precision()
    return "ieee"


@triton.jit
def split_fp16(x):
    """fp32 x (|x| ≤ 65504) → fp16 (hi, lo) with hi + lo = x to ~2^-22 relative (absolute 2^-25
    below fp16's normal range). A product with an fp16-exact matrix (0/1 one-hot) then costs two
    fp16 tensor-core MMAs and stays fp32-accurate; a product of two split operands needs three
    (hi·hi + hi·lo + lo·hi)."""
    hi = x.to(tl.float16)
    lo = (x - hi.to(tl.float32)).to(tl.float16)
    return hi, lo
