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


def key_tiles(cu_seqlens_k_host: torch.Tensor, key_region: torch.Tensor, block_n: int):
    """Per-sequence key tiles of ``block_n`` keys and the region span of each tile.

    Args:
        cu_seqlens_k_host: int [B+1] cumulative key counts on the CPU (tile counts come from it,
            so nothing is copied back from the device).
        key_region: int [total_k] region ids on the kernels' device.
        block_n: keys per tile.

    Returns (tile_base int32 [B] — index of each sequence's first tile, tile_rmin int32 [T],
    tile_rmax int32 [T]) on key_region's device; tile_rmax = −1 marks a tile without any region
    key (skipped by the second pass), otherwise [tile_rmin, tile_rmax] bounds its region ids.
    """
    device = key_region.device
    cu_k = cu_seqlens_k_host.to("cpu", torch.int64)
    lens_k = cu_k[1:] - cu_k[:-1]
    tiles_per_seq = (lens_k + block_n - 1) // block_n
    tile_base_host = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
    num_tiles = int(tiles_per_seq.sum())
    total_k = key_region.numel()
    # Tile of every key, built on the host from the layout alone and uploaded once.
    seq_of_key = torch.repeat_interleave(torch.arange(lens_k.numel()), lens_k, output_size=total_k)
    pos = torch.arange(total_k) - cu_k[:-1][seq_of_key]
    tile_of_key = (tile_base_host[seq_of_key] + pos // block_n).to(device)
    region = key_region.to(torch.int64)
    has = region >= 0
    big = torch.iinfo(torch.int32).max
    # Keys without a region scatter into a spare slot (index num_tiles), dropped afterwards:
    # no boolean-mask indexing, so no data-dependent shape.
    slot = torch.where(has, tile_of_key, torch.full_like(tile_of_key, num_tiles))
    tile_rmin = torch.full((num_tiles + 1,), big, dtype=torch.int64, device=device)
    tile_rmax = torch.full((num_tiles + 1,), -1, dtype=torch.int64, device=device)
    tile_rmin.scatter_reduce_(0, slot, region, reduce="amin")
    tile_rmax.scatter_reduce_(0, slot, region, reduce="amax")
    tile_rmin, tile_rmax = tile_rmin[:num_tiles], tile_rmax[:num_tiles]
    tile_rmin = torch.where(tile_rmax >= 0, tile_rmin, torch.zeros_like(tile_rmin))
    return (tile_base_host.to(device=device, dtype=torch.int32), tile_rmin.to(torch.int32),
            tile_rmax.to(torch.int32))
