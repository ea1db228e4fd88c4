"""Helpers shared by the Triton kernels: sizes, launch options, host-side block tables, and the
fp16-split matmul pieces used for fp32-accurate products on tensor cores."""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreter_enabled
from .._compat import interpreter_computes_bf16_dot


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ max(n, 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def launch_options(num_warps: int, num_stages: int | None = None) -> dict:
    """Launch keywords for compiled kernels; none under the interpreter, which ignores them."""
    if triton_interpreter_enabled():
        return {}
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return options


def interpreter_dot_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors a kernel feeds to ``tl.dot``, upcast from bf16 to fp32 when the Triton
    interpreter cannot multiply bf16 tiles (:func:`.._compat.interpreter_computes_bf16_dot`).

    Exact: every bf16 value is an fp32 value, and compiled bf16 tensor-core products accumulate
    in fp32 as well, so results match a compiled bf16 kernel up to summation order. Compiled
    launches and other dtypes get the tensors back unchanged.
    """
    if (triton_interpreter_enabled() and any(t.dtype == torch.bfloat16 for t in tensors)
            and not interpreter_computes_bf16_dot()):
        return tuple(t.float() if t.dtype == torch.bfloat16 else t for t in tensors)
    return tensors


def device_guard(device: torch.device):
    """Context that makes ``device`` the current CUDA device while kernels launch.

    Triton launches on the *current* device (and its current stream), not on the device of the
    tensors passed in: a launch for tensors on ``cuda:1`` while ``cuda:0`` is current would run
    on GPU 0 with GPU 1 addresses. CPU tensors (the interpreter) need no guard.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def dot_precision(device: torch.device) -> str:
    """``tl.dot`` input precision for fp32 operands: near-fp32 accuracy everywhere.

    NVIDIA: ``tf32x3`` (three TF32 MMAs, ~fp32 error); ROCm: ``ieee``; the interpreter computes
    with numpy in fp32 whatever is asked. fp16/bf16 operands ignore this setting.
    """
    if device.type == "cuda" and torch.version.hip is None and not triton_interpreter_enabled():
        return "tf32x3"
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


def key_tiles(cu_seqlens_k: torch.Tensor, key_region: torch.Tensor, block_n: int):
    """Per-sequence key tiles of ``block_n`` keys and the region span of each tile.

    Returns (tile_base int32 [B] — index of each sequence's first tile, tile_rmin int32 [T],
    tile_rmax int32 [T]) on key_region's device; tile_rmax = −1 marks a tile without any region
    key (skipped by the second pass), otherwise [tile_rmin, tile_rmax] bounds its region ids.
    """
    device = key_region.device
    cu_k = cu_seqlens_k.to(device=device, dtype=torch.int64)
    lens_k = cu_k[1:] - cu_k[:-1]
    tiles_per_seq = (lens_k + block_n - 1) // block_n
    tile_base = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
    num_tiles = int(tiles_per_seq.sum())
    total_k = key_region.numel()
    seq_of_key = torch.repeat_interleave(torch.arange(lens_k.numel(), device=device), lens_k,
                                         output_size=total_k)
    pos = torch.arange(total_k, device=device) - cu_k[:-1][seq_of_key]
    tile_of_key = tile_base[seq_of_key] + pos // block_n
    region = key_region.to(torch.int64)
    has = region >= 0
    big = torch.iinfo(torch.int32).max
    tile_rmin = torch.full((num_tiles,), big, dtype=torch.int64, device=device)
    tile_rmax = torch.full((num_tiles,), -1, dtype=torch.int64, device=device)
    tile_rmin.scatter_reduce_(0, tile_of_key[has], region[has], reduce="amin")
    tile_rmax.scatter_reduce_(0, tile_of_key[has], region[has], reduce="amax")
    tile_rmin = torch.where(tile_rmax >= 0, tile_rmin, torch.zeros_like(tile_rmin))
    return tile_base.to(torch.int32), tile_rmin.to(torch.int32), tile_rmax.to(torch.int32)
