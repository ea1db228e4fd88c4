"""Fused Triton ``cosine_alignment`` (factorised mean cosine), two bandwidth-bound kernels.

1. ``_region_mean_keys_kernel``: one program per (sequence × window of BLOCK_R regions, KV head)
   walks the sequence's key tiles (tiles whose region span misses the window are skipped),
   normalises each key, and accumulates Σ unit key and the key count per region with a one-hot
   matmul onehotᵀ[BLOCK_R, BLOCK_K] @ k̂[BLOCK_K, D] (k̂ split into fp16 hi + lo parts, so the
   tensor-core product stays fp32-accurate); it writes k̄ = Σ / count (0 for an empty
   region) to an fp32 [B, R, Hk, D] buffer. No atomics: deterministic.
2. ``_alignment_kernel``: one program per (query row block of one sequence × region window)
   reads each selected head's q rows (norms first, then the products, walking the head dim in
   slices; the second read hits the cache), normalises them and takes q̂ @ k̄ᵀ for the head's KV
   head (three fp16 products of hi/lo splits), writing per-head values or accumulating the mean
   over heads. No [rows, H, R, D] intermediate exists.

Launches use 8 warps, 64 keys per tile (16 for D > 128), 32 rows per program, BLOCK_R = 16…64
regions per window (fewer for wider heads, :func:`_block_regions`) and the head dim in slices of
16 or 64: no register spills in sm_80/sm_90 builds. The (block or sequence) × window index
is flattened into grid axis 0, whose limit is 2^31 − 1 (axes 1 and 2 stop at 65535).

fp16/bf16/fp32 loads, fp32 arithmetic (the public op sends fp64 inputs to the torch reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._backend import check_head_dim
from .._fused_host import key_tiles, last_dim_contiguous, row_blocks
from ._utils import (
    device_guard,
    launch_options,
    next_pow2,
    split_fp16,
)


@triton.jit
def _inverse_norm(sq):
    """1/√sq for sq > 0 (subnormal sums included), 0 for a zero vector; fp32 throughout (a
    literal below fp32's normal range would be typed fp64, which Triton 3.6 refuses in sqrt_rn)."""
    return tl.where(sq > 0, 1.0 / tl.sqrt_rn(tl.where(sq > 0, sq, 1.0)), 0.0)


@triton.jit
def _region_mean_keys_kernel(
    k_ptr, region_ptr, cu_k_ptr, tile_base_ptr, tile_rmin_ptr, tile_rmax_ptr, kbar_ptr,
    stride_kt, stride_kh, num_regions, num_kv_heads, head_dim, num_windows,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    seq = pid // num_windows
    w0 = (pid % num_windows) * BLOCK_R
    kv = tl.program_id(1)
    k_start = tl.load(cu_k_ptr + seq)
    lk = tl.load(cu_k_ptr + seq + 1) - k_start
    tile0 = tl.load(tile_base_ptr + seq)
    k_base = k_ptr + k_start.to(tl.int64) * stride_kt + kv.to(tl.int64) * stride_kh
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    cols = w0 + tl.arange(0, BLOCK_R)
    sums = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    counts = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, lk, BLOCK_K):
        tile = tile0 + start // BLOCK_K
        rmin = tl.load(tile_rmin_ptr + tile)
        rmax = tl.load(tile_rmax_ptr + tile)
        if (rmax >= w0) & (rmin < w0 + BLOCK_R):
            offs_k = start + tl.arange(0, BLOCK_K)
            k_ok = offs_k < lk
            x = tl.load(k_base + offs_k[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            sq = tl.sum(x * x, axis=1)
            inv = _inverse_norm(sq)
            unit = x * inv[:, None]
            region = tl.load(region_ptr + k_start.to(tl.int64) + offs_k, mask=k_ok, other=-1)
            onehot_t = (cols[:, None] == region[None, :]).to(tl.float16)      # [BLOCK_R, BLOCK_K]
            u_hi, u_lo = split_fp16(unit)
            sums = tl.dot(onehot_t, u_lo, tl.dot(onehot_t, u_hi, sums))
            counts += tl.sum(onehot_t.to(tl.float32), axis=1)
    means = sums / tl.maximum(counts, 1.0)[:, None]
    row = (seq.to(tl.int64) * num_regions + cols) * num_kv_heads + kv
    tl.store(kbar_ptr + row[:, None] * head_dim + offs_d[None, :], means,
             mask=(cols < num_regions)[:, None] & d_ok[None, :])


@triton.jit
def _alignment_kernel(
    q_ptr, kbar_ptr, out_ptr, blocks_ptr, head_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    num_heads, group_size, num_regions, num_kv_heads, head_dim, inv_num_heads, num_windows,
    PER_HEAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, CHUNK_D: tl.constexpr,
):
    # The head dim is walked in CHUNK_D slices (norms first, then the products), so the live
    # register tiles are [BLOCK_Q, CHUNK_D] whatever D is.
    blk = tl.program_id(0) // num_windows
    w0 = (tl.program_id(0) % num_windows) * BLOCK_R
    seq = tl.load(blocks_ptr + blk * 4)
    row0 = tl.load(blocks_ptr + blk * 4 + 1)
    nrows = tl.load(blocks_ptr + blk * 4 + 2)
    rows = (row0 + tl.arange(0, BLOCK_Q)).to(tl.int64)
    row_ok = tl.arange(0, BLOCK_Q) < nrows
    offs_c = tl.arange(0, CHUNK_D)
    cols = w0 + tl.arange(0, BLOCK_R)
    col_ok = cols < num_regions
    mean = tl.zeros([BLOCK_Q, BLOCK_R], dtype=tl.float32)
    for i in range(num_heads):
        h = tl.load(head_ptr + i)
        kv = h // group_size
        q_rows = q_ptr + rows[:, None] * stride_qt + h.to(tl.int64) * stride_qh
        sq = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for d0 in tl.static_range(0, BLOCK_D, CHUNK_D):
            d_ok = (d0 + offs_c) < head_dim
            x = tl.load(q_rows + d0 + offs_c[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            sq += tl.sum(x * x, axis=1)
        inv = _inverse_norm(sq)
        kb_rows = (seq.to(tl.int64) * num_regions + cols) * num_kv_heads + kv
        cos = tl.zeros([BLOCK_Q, BLOCK_R], dtype=tl.float32)
        for d0 in tl.static_range(0, BLOCK_D, CHUNK_D):
            d_ok = (d0 + offs_c) < head_dim
            x = tl.load(q_rows + d0 + offs_c[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            kb = tl.load(kbar_ptr + kb_rows[:, None] * head_dim + d0 + offs_c[None, :],
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            u_hi, u_lo = split_fp16(x * inv[:, None])
            kb_hi, kb_lo = split_fp16(tl.trans(kb))
            cos = tl.dot(u_lo, kb_hi, tl.dot(u_hi, kb_lo, tl.dot(u_hi, kb_hi, cos)))
        if PER_HEAD:
            tl.store(out_ptr + rows[:, None] * stride_ot + i * stride_oh + cols[None, :], cos,
                     mask=row_ok[:, None] & col_ok[None, :])
        else:
            mean += cos
    if not PER_HEAD:
        tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :], mean * inv_num_heads,
                 mask=row_ok[:, None] & col_ok[None, :])


def _block_regions(num_regions: int, d: int) -> int:
    """Regions per window: 16…64 (next power of two of R), at most 32 for D > 64 and 16 for
    D > 128. From sm_90 builds of the alignment kernel (64 rows, 8 warps): no register spills
    up to D = 128 within these caps; at D = 256 with 64 regions its pipelined q/k̄ tiles needed
    256 KiB of shared memory (sm_90 allows 227 KiB) and the launch would fail.
    """
    cap = 64 if d <= 64 else 32 if d <= 128 else 16
    return min(cap, max(16, next_pow2(num_regions)))


_NUM_WARPS = 8


def _launch_meta(d: int, num_regions: int, block_q: int | None, block_k: int | None,
                 per_head: bool) -> tuple[dict, dict]:
    """Constexprs of the region-mean and alignment launches (``_NUM_WARPS`` warps, default
    stages): the only place they are chosen, used by the launcher and :func:`kernel_builds`.

    Defaults are the largest tiles without register spills in sm_80/sm_90 builds: 32 query rows
    per program; 64 keys per tile (16 for D > 128); the head dim walked in slices of 16 (64 when
    the region window is 16 wide).
    """
    block_r = _block_regions(num_regions, d)
    block_d = max(16, next_pow2(d))
    block_q = block_q if block_q is not None else 32
    block_k = block_k if block_k is not None else (64 if d <= 128 else 16)
    chunk_d = min(block_d, 16 if block_r >= 32 else 64)
    mean = dict(BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_R=block_r)
    align = dict(PER_HEAD=bool(per_head), BLOCK_Q=block_q, BLOCK_D=block_d, BLOCK_R=block_r,
                 CHUNK_D=chunk_d)
    return mean, align


def kernel_builds():
    """Every compiled configuration the launcher chooses with its default tiles: each dtype ×
    head-dim class (D ≤ 64, ≤ 128, ≤ 256, at the widest D, where the region window is largest)
    × per-head output on/off (static GPU checks, :mod:`.builds`)."""
    from .builds import KernelBuild

    builds = []
    for tname in ("fp16", "bf16", "fp32"):
        for d in (64, 128, 256):
            for per_head in (False, True):
                mean, align = _launch_meta(d, 1 << 20, None, None, per_head)
                if not per_head:
                    builds.append(KernelBuild(
                        name=f"cosine region means {tname} D={d} R-window={mean['BLOCK_R']}",
                        kernel=_region_mean_keys_kernel,
                        pointer_types={"k_ptr": "*" + tname, "kbar_ptr": "*fp32"},
                        float_args=(), constexprs=mean, num_warps=_NUM_WARPS, num_stages=3,
                        tensor_cores=True))
                builds.append(KernelBuild(
                    name=(f"cosine alignment {tname} D={d} R-window={align['BLOCK_R']}"
                          f"{' per-head' if per_head else ''}"),
                    kernel=_alignment_kernel,
                    pointer_types={"q_ptr": "*" + tname, "kbar_ptr": "*fp32", "out_ptr": "*fp32"},
                    float_args=("inv_num_heads",), constexprs=align, num_warps=_NUM_WARPS,
                    num_stages=3, tensor_cores=True))
    return builds


@dataclass(frozen=True)
class CosineLaunchPlan:
    """The two launches of the Triton ``cosine_alignment`` for one batch layout, except q and k:
    built once by :func:`plan_cosine_alignment_triton`; running it does no host sync."""

    device: torch.device
    heads: tuple
    group_size: int
    num_kv_heads: int
    head_dim: int
    total_q: int
    num_seqs: int
    num_regions: int
    per_head: bool
    num_windows: int
    mean_meta: dict
    align_meta: dict
    cu_k: torch.Tensor
    region: torch.Tensor
    tile_base: torch.Tensor
    tile_rmin: torch.Tensor
    tile_rmax: torch.Tensor
    blocks: torch.Tensor
    head_tab: torch.Tensor


def plan_cosine_alignment_triton(
    cu_seqlens_q_host: torch.Tensor, cu_seqlens_k_host: torch.Tensor, key_region: torch.Tensor,
    num_regions: int, *, num_heads: int, num_kv_heads: int, head_dim: int,
    heads: list[int] | None = None, per_head: bool = False, block_q: int | None = None,
    block_k: int | None = None,
) -> CosineLaunchPlan:
    """Launch tables of the Triton ``cosine_alignment`` (inputs validated): cumulative lengths
    int [B+1] on the CPU, key_region int [total_k] on the kernels' device."""
    heads = list(range(num_heads)) if heads is None else list(heads)
    check_head_dim("q", head_dim, "Triton")
    device = key_region.device
    mean_meta, align_meta = _launch_meta(head_dim, num_regions, block_q, block_k, per_head)
    tile_base, tile_rmin, tile_rmax = key_tiles(cu_seqlens_k_host, key_region, mean_meta["BLOCK_K"])
    blocks = row_blocks(cu_seqlens_q_host, cu_seqlens_k_host, align_meta["BLOCK_Q"])
    return CosineLaunchPlan(
        device=device, heads=tuple(heads), group_size=num_heads // num_kv_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, total_q=int(cu_seqlens_q_host[-1]),
        num_seqs=cu_seqlens_k_host.numel() - 1, num_regions=num_regions, per_head=bool(per_head),
        num_windows=triton.cdiv(num_regions, mean_meta["BLOCK_R"]) if num_regions else 0,
        mean_meta=mean_meta, align_meta=align_meta,
        cu_k=cu_seqlens_k_host.to(device=device, dtype=torch.int32),
        region=key_region.to(dtype=torch.int32).contiguous(), tile_base=tile_base,
        tile_rmin=tile_rmin, tile_rmax=tile_rmax, blocks=blocks.to(device),
        head_tab=torch.tensor(heads, dtype=torch.int32).to(device))


def run_cosine_alignment_triton(plan: CosineLaunchPlan, q: torch.Tensor,
                                k: torch.Tensor) -> torch.Tensor:
    """The planned launches (region means, then alignment); no host sync. fp32 [total_q, R], or
    [total_q, len(heads), R] per head."""
    device, heads, d = plan.device, plan.heads, plan.head_dim
    shape = ((plan.total_q, len(heads), plan.num_regions) if plan.per_head
             else (plan.total_q, plan.num_regions))
    out = torch.zeros(shape, dtype=torch.float32, device=device)
    if plan.total_q == 0 or k.shape[0] == 0 or plan.num_regions == 0 or plan.blocks.shape[0] == 0:
        return out
    q = last_dim_contiguous(q)
    k = last_dim_contiguous(k)
    kbar = torch.empty(plan.num_seqs, plan.num_regions, plan.num_kv_heads, d,
                       dtype=torch.float32, device=device)
    stride_oh = out.stride(1) if plan.per_head else 0
    extra = launch_options(_NUM_WARPS)
    with device_guard(device):              # Triton launches on the current device
        _region_mean_keys_kernel[(plan.num_seqs * plan.num_windows, plan.num_kv_heads)](
            k, plan.region, plan.cu_k, plan.tile_base, plan.tile_rmin, plan.tile_rmax, kbar,
            k.stride(0), k.stride(1), plan.num_regions, plan.num_kv_heads, d, plan.num_windows,
            **plan.mean_meta, **extra)
        _alignment_kernel[(plan.blocks.shape[0] * plan.num_windows,)](
            q, kbar, out, plan.blocks, plan.head_tab,
            q.stride(0), q.stride(1), out.stride(0), stride_oh,
            len(heads), plan.group_size, plan.num_regions, plan.num_kv_heads, d,
            1.0 / len(heads), plan.num_windows, **plan.align_meta, **extra)
    return out


def cosine_alignment_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    key_region: torch.Tensor,
    num_regions: int = 1,
    *,
    heads: list[int] | None = None,
    per_head: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """Triton ``cosine_alignment`` (inputs validated by :func:`kawhi_kernels.ops.cosine_alignment`).

    Args:
        q: [total_q, Hq, D] fp16/bf16/fp32 D ≤ 256.
        k: [total_k, Hk, D] same dtype; Hq % Hk == 0.
        cu_seqlens_q, cu_seqlens_k: int32/int64 [B+1].
        key_region: int32/int64 [total_k] in [0, R) or −1 (key not selected).
        num_regions: R.
        heads: selected query heads (default all); per_head: keep the head axis.
        block_q, block_k: rows per program / keys per tile (powers of two ≥ 16; default 32 /
            64, 16 keys for D > 128).

    Returns:
        fp32 [total_q, R], or [total_q, len(heads), R] with ``per_head``.
    """
    plan = plan_cosine_alignment_triton(
        cu_seqlens_q.detach().to("cpu", torch.int64), cu_seqlens_k.detach().to("cpu", torch.int64),
        key_region.to(q.device), num_regions, num_heads=q.shape[1], num_kv_heads=k.shape[1],
        head_dim=q.shape[2], heads=heads, per_head=per_head, block_q=block_q, block_k=block_k)
    return run_cosine_alignment_triton(plan, q, k)
