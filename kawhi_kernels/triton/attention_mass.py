"""Fused Triton ``attention_mass``: softmax mass of query rows on key regions, never writing P.

One program per (query row block, KV head group). A row block holds up to ``BLOCK_ROWS`` rows of
one sequence and one segment (host-built table, see :func:`.._fused_host.row_blocks`); the program
stacks the rows of a group of selected query heads that read its KV head into one M tile of
BLOCK_ROWS × GP stacked rows (row-major over (row, head)), so every K tile is loaded once per
group. Groups are packed without power-of-two padding (:func:`pack_head_groups`: GP any size,
M = BLOCK_ROWS × GP rounded up to a power of two, e.g. 21 rows × 3 heads in M = 64); a KV head
may be split into several near-equal groups when that wastes fewer stacked rows (each reads
its K).

One kernel per accumulation scheme, sharing the ``@triton.jit`` helpers (block setup, score
tile, normaliser, region probabilities, one-hot product, stores) and the named constexpr output
modes (``OUT_ROWS``, ``OUT_SEG_ATOMIC``, ``OUT_PARTIAL``):

* ``_mass_online_kernel`` — coarse regions (R ≤ 64) without ``lse``, one pass: an [M, R] fp32
  accumulator of exp2(s − m) · onehot(key → region) for the running row max m, rescaled when m
  grows (flash-forward style, the one-hot as V), divided by the row sum at the end;
* ``_mass_coarse_kernel`` — coarse regions with ``lse`` (or R > 64 registers): pass 1 (skipped
  when ``lse`` is given) computes the normaliser, pass 2 recomputes the scores,
  p = exp(s − lse), and acc[M, R] += P @ onehot, held in registers and written once;
* ``_mass_atomic_kernel`` — per-patch regions, ``deterministic=False``: column sums scattered
  with ``tl.atomic_add`` (rows of a segment summed inside the tile first);
* ``_mass_window_kernel`` — per-patch regions, ``deterministic=True``: for each key tile, the
  window(s) of BLOCK_R region ids its keys cover get P @ onehot(window), added with plain
  load-add-store into memory the program owns (per-row outputs, or one partial row per block for
  segments); segment partials are then summed by a second kernel in a fixed block order.
  Bit-identical run to run.

The region passes loop over the per-block key-tile range [t0, t1) of the planner
(:func:`.._fused_host.region_tile_ranges`): bounds are data and the body has no branch, so the
K loads are software-pipelined (cp.async; checked in the static builds).

The one-hot products run on fp16 tensor cores with p split into fp16 hi + lo parts (the 0/1
matrix is exact), which keeps them fp32-accurate (~2^-22 relative); p is capped at 1 (exceeded
only by an underestimated ``lse``, on every backend alike), so the split never overflows. QKᵀ uses the input dtype on
tensor cores with fp32 accumulation (tf32x3 for fp32 inputs on NVIDIA).

Key tiles beyond the causal limit of the block's last row are skipped in every pass, key tiles
before the sequence's first and after its last region tile in the region pass. Offsets are
int64. Loads in fp16/bf16/fp32, all arithmetic in fp32 (the public op sends fp64 inputs to the
torch reference).

Tiles come from :data:`MASS_TILE_TABLE`, keyed on (dtype, head-dim class, kernel, has_lse,
group class), every entry spill-free in sm_80 and sm_90 builds on Triton 3.6 and 3.9 (not tuned
on timings: no GPU yet): M = 64 stacked rows, 64 keys per tile (32 for D > 128), 8 warps for
fp16/bf16; 16 × 16, 4 warps (8 on the windowed path), 1 stage for fp32 inputs, which are limited
to D ≤ 128 (the tf32x3 operand splits spill beyond). The host prepares the row-block table and
the key-tile region spans (one device→host copy of cu_seqlens and query_segment).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._backend import check_head_dim, triton_mass_head_dim_limit
from .._fused_host import (
    block_key_tiles,
    head_group_tables,
    heads_by_kv,
    key_tile_visits,
    key_tiles,
    last_dim_contiguous,
    region_tile_ranges,
    row_blocks,
    segment_block_lists,
    split_head_groups,
)
from ._utils import (
    compiled_dot_precision,
    device_guard,
    dot_precision,
    interpreter_dot_dtype,
    interpreter_dot_operands,
    launch_options,
    next_pow2,
    split_fp16,
)

LOG2E = 1.4426950408889634

# Output modes, named constexprs the kernels compare against (the host reads their values).
OUT_ROWS = tl.constexpr(0)        # out[global row, slot, region]; each row owned by one program
OUT_SEG_ATOMIC = tl.constexpr(1)  # out[segment, slot, region] via atomics
OUT_PARTIAL = tl.constexpr(2)     # partial[block, slot, region]; reduced afterwards in block order
_OUT_ROWS, _OUT_SEG_ATOMIC, _OUT_PARTIAL = OUT_ROWS.value, OUT_SEG_ATOMIC.value, OUT_PARTIAL.value
# Region accumulation schemes, one kernel each (host side only).
_ACC_COARSE = 0      # registers [M, BLOCK_R], one-hot matmul: _mass_coarse_kernel / _online_kernel
_ACC_ATOMIC = 1      # per-tile atomics of column sums: _mass_atomic_kernel
_ACC_WINDOW = 2      # per-tile one-hot matmul over region windows, load-add-store: _mass_window_kernel
# Names of the kernels a run may launch (module attributes, looked up at each launch).
LAUNCHED_KERNELS = ("_mass_online_kernel", "_mass_coarse_kernel", "_mass_atomic_kernel",
                    "_mass_window_kernel", "_sum_partials_kernel")
# Default ptxas register limit of the main kernels' table entries (8 warps may use 255): without
# it ptxas caps several pipelined sm_80 builds at 128 registers and spills; the two-pass coarse
# kernel spills with it and keeps ptxas's own choice (its entries' maxnreg None; static builds).
MAX_REGISTERS = 255


# Largest R of the single-pass kernel (its [M, R] accumulator is rescaled every key tile).
ONE_PASS_MAX_REGIONS = 64


# ---------------------------------------------------------------------------------------------
# Helpers shared by the kernels.

@triton.jit
def _program_block(q_ptr, k_ptr, cu_q_ptr, cu_k_ptr, blocks_ptr, group_kv_ptr, group_head_ptr,
                   group_slot_ptr, stride_qt, stride_qh, stride_kt, stride_kh, head_dim,
                   CAUSAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, GP: tl.constexpr,
                   BLOCK_M: tl.constexpr, GP_PAD: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """This program's row block and KV group: the stacked q tile [M, BLOCK_D] (row-major over
    (row, head), zero for padding), the KV head's K base pointer, per stacked row its global row,
    head, output slot, validity and causal key limit (keys n < limit are visible), the block's
    key end n_end, its sequence and segment."""
    pid_b = tl.program_id(0)
    pid_g = tl.program_id(1)
    seq = tl.load(blocks_ptr + pid_b * 4)
    row0 = tl.load(blocks_ptr + pid_b * 4 + 1)
    nrows = tl.load(blocks_ptr + pid_b * 4 + 2)
    seg = tl.load(blocks_ptr + pid_b * 4 + 3)
    q_start = tl.load(cu_q_ptr + seq)
    lq = tl.load(cu_q_ptr + seq + 1) - q_start
    k_start = tl.load(cu_k_ptr + seq)
    lk = tl.load(cu_k_ptr + seq + 1) - k_start
    local0 = row0 - q_start
    kv = tl.load(group_kv_ptr + pid_g)

    offs_m = tl.arange(0, BLOCK_M)
    r = offs_m // GP
    head = tl.load(group_head_ptr + pid_g * GP + offs_m % GP)       # [M], −1 for padding
    slot = tl.load(group_slot_ptr + pid_g * GP + offs_m % GP)
    row_ok = (r < nrows) & (head >= 0)
    grow = (row0 + r).to(tl.int64)
    head64 = tl.maximum(head, 0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + grow[:, None] * stride_qt + head64[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    k_base = k_ptr + k_start.to(tl.int64) * stride_kt + kv.to(tl.int64) * stride_kh
    if CAUSAL:                                        # bottom-right aligned
        limit = tl.minimum(local0 + r + 1 + lk - lq, lk)
        n_end = tl.minimum(local0 + nrows + lk - lq, lk)
    else:
        limit = tl.zeros([BLOCK_M], dtype=tl.int32) + lk
        n_end = lk
    limit = tl.where(row_ok, limit, 0)
    return q, k_base, k_start, seq, seg, grow, head64, slot, row_ok, limit, n_end


@triton.jit
def _loop_tiles(loop_tiles_ptr, n_end, BLOCK_N: tl.constexpr):
    """This block's key-tile loop bounds from the planner's table (:func:`interior_key_tiles`):
    interior tiles [0, ti) are visible to every real row of the block (no mask at all), the
    full pass runs [ti, ⌈n_end / BLOCK_N⌉) masked; the region pass [t0, t1) splits at
    tm = clamp(ti, t0, t1) into unmasked [t0, tm) and masked [tm, t1)."""
    base = loop_tiles_ptr + tl.program_id(0) * 4
    ti = tl.load(base)
    t0 = tl.load(base + 1)
    tm = tl.load(base + 2)
    t1 = tl.load(base + 3)
    return ti, tl.cdiv(n_end, BLOCK_N), t0, tm, t1


@triton.jit
def _scores(q, k_base, region_base, start, n_end, limit, stride_kt, head_dim, scale_log2,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
            MASKED: tl.constexpr):
    """log2-domain scores [M, BLOCK_N] of the key tile at ``start``, the tile's key offsets
    within the sequence and their region ids. ``MASKED`` (edge and diagonal tiles): keys ≥ n_end
    read as 0 with region −1, and keys beyond a row's causal limit score −inf; an interior
    tile (every key visible to every real row) loads and scores without any mask."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
    if MASKED:
        kt = tl.load(k_ptrs, mask=(offs_n < n_end)[:, None] & (offs_d < head_dim)[None, :],
                     other=0.0)
        region = tl.load(region_base + offs_n, mask=offs_n < n_end, other=-1)
    else:
        kt = tl.load(k_ptrs, mask=(offs_d < head_dim)[None, :], other=0.0)
        region = tl.load(region_base + offs_n)
    s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        s = tl.where(offs_n[None, :] < limit[:, None], s, float("-inf"))
    return s, offs_n, region


@triton.jit
def _sum_step(q, k_base, region_base, start, n_end, limit, m_i, l_i, stride_kt, head_dim,
              scale_log2, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of pass 1: the online row max and sum of exp2."""
    s, offs_n, region = _scores(q, k_base, region_base, start, n_end, limit, stride_kt, head_dim,
                                scale_log2, BLOCK_N, BLOCK_D, DOT_PRECISION, MASKED)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _normaliser(q, k_base, region_base, lse_ptr, stride_lh, stride_lt, head64, grow, row_ok,
                limit, n_end, ti, tn, stride_kt, head_dim, scale_log2, HAS_LSE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """log2 normaliser [M] per stacked row: the given natural-log ``lse`` in log2 units, or
    pass 1 (online max and sum over the visible keys: interior tiles [0, ti) unmasked, then
    [ti, tn) masked). +inf where the row is padding or has a non-finite normaliser (no visible
    key; FlashAttention writes ±inf there), so that its probabilities exp2(s − lse2) are 0."""
    if HAS_LSE:
        lse = tl.load(lse_ptr + head64 * stride_lh + grow * stride_lt, mask=row_ok, other=0.0)
        lse2 = lse * 1.4426950408889634
        lse_ok = (tl.abs(lse2) < float("inf")) & row_ok
    else:
        m_i = tl.full(limit.shape, float("-inf"), dtype=tl.float32)
        l_i = tl.zeros(limit.shape, dtype=tl.float32)
        for t in range(0, ti):
            m_i, l_i = _sum_step(q, k_base, region_base, t * BLOCK_N, n_end, limit, m_i, l_i,
                                 stride_kt, head_dim, scale_log2, BLOCK_N, BLOCK_D,
                                 DOT_PRECISION, False)
        for t in range(ti, tn):
            m_i, l_i = _sum_step(q, k_base, region_base, t * BLOCK_N, n_end, limit, m_i, l_i,
                                 stride_kt, head_dim, scale_log2, BLOCK_N, BLOCK_D,
                                 DOT_PRECISION, True)
        lse_ok = (l_i > 0) & row_ok
        lse2 = m_i + tl.log2(tl.maximum(l_i, 1e-30))
    return tl.where(lse_ok, lse2, float("inf"))


@triton.jit
def _probabilities(s, lse2):
    """p = exp2(s − lse2) [M, BLOCK_N], 0 for invisible keys (s = −inf) and rows without a
    normaliser (lse2 = +inf). p ≤ 1 for a true normaliser; capping it defines an underestimated
    lse (and keeps the fp16 hi/lo split of p finite) the same way on every backend."""
    return tl.minimum(tl.exp2(s - lse2[:, None]), 1.0)


@triton.jit
def _onehot_dot(p_hi, p_lo, region, cols, acc):
    """acc + p @ onehot(region == cols) on fp16 tensor cores, p given as its fp16 hi/lo split
    (the 0/1 matrix is exact, so the product is fp32-accurate; keys of region −1 have a zero
    one-hot row and add nothing)."""
    onehot = (region[:, None] == cols[None, :]).to(tl.float16)
    acc = tl.dot(p_hi, onehot, acc)
    return tl.dot(p_lo, onehot, acc)


@triton.jit
def _head_sums(x, BLOCK_ROWS: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
               GP_PAD: tl.constexpr, C: tl.constexpr, EXACT: tl.constexpr):
    """Per head j of the group, the sum over the block's rows of x [BLOCK_M, C] (stacked row
    i = r · GP + j): [GP_PAD, C]. A power-of-two GP fills the tile exactly and is a reshape
    and sum; a packed GP (BLOCK_ROWS · GP < BLOCK_M, no power-of-two padding of the heads)
    multiplies by the 0/1 selector [GP_PAD, BLOCK_M] — in fp32 FMAs when ``EXACT`` (once per
    program), else on fp16 tensor cores with x split into hi + lo (x ≤ 65504: per-tile p and
    window sums; fp32-accurate like the one-hot products)."""
    if GP_PAD == GP and BLOCK_ROWS * GP == BLOCK_M:
        out = tl.sum(tl.reshape(x, (BLOCK_ROWS, GP, C)), axis=0)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        offs_j = tl.arange(0, GP_PAD)
        sel = ((offs_m % GP)[None, :] == offs_j[:, None]) & (offs_m < BLOCK_ROWS * GP)[None, :]
        if EXACT:
            out = tl.dot(sel.to(tl.float32), x, input_precision="ieee")
        else:
            x_hi, x_lo = split_fp16(x)
            sel16 = sel.to(tl.float16)
            out = tl.dot(sel16, x_lo, tl.dot(sel16, x_hi))
    return out


@triton.jit
def _group_out(out_ptr, seg, group_slot_ptr, stride_orow, stride_oslot, OUT_MODE: tl.constexpr,
               GP: tl.constexpr, GP_PAD: tl.constexpr):
    """Output row pointers [GP_PAD, 1] of the group's heads for the segment modes (the segment's
    row for atomics, the block's partial row otherwise) and which of them are real heads."""
    if OUT_MODE == OUT_SEG_ATOMIC:
        out_row = seg.to(tl.int64)
    else:
        out_row = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, GP_PAD)
    slot_g = tl.load(group_slot_ptr + tl.program_id(1) * GP + offs_j, mask=offs_j < GP,
                     other=-1)                                                      # −1: padding
    return out_ptr + out_row * stride_orow + tl.maximum(slot_g, 0)[:, None] * stride_oslot, slot_g >= 0


@triton.jit
def _store_regions(acc, out_ptr, grow, slot, row_ok, seg, group_slot_ptr, stride_orow,
                   stride_oslot, num_regions, OUT_MODE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   GP: tl.constexpr, BLOCK_M: tl.constexpr, GP_PAD: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """Write a block's [M, BLOCK_R] region masses (0 on padding rows): per row, or summed over
    its rows per head (atomically into the segment, or into the block's partial row)."""
    offs_r = tl.arange(0, BLOCK_R)
    col_ok = offs_r < num_regions
    if OUT_MODE == OUT_ROWS:
        out_rows = out_ptr + grow[:, None] * stride_orow + tl.maximum(slot, 0)[:, None] * stride_oslot
        tl.store(out_rows + offs_r[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
    else:
        out_grp, head_ok = _group_out(out_ptr, seg, group_slot_ptr, stride_orow, stride_oslot,
                                      OUT_MODE, GP, GP_PAD)
        red = _head_sums(acc, BLOCK_ROWS, GP, BLOCK_M, GP_PAD, BLOCK_R, True)
        ok = head_ok[:, None] & col_ok[None, :]
        if OUT_MODE == OUT_SEG_ATOMIC:
            tl.atomic_add(out_grp + offs_r[None, :], red, mask=ok, sem="relaxed")
        else:
            tl.store(out_grp + offs_r[None, :], red, mask=ok)


@triton.jit
def _online_step(q, k_base, region_base, start, n_end, limit, offs_r, m_i, l_i, acc, stride_kt,
                 head_dim, scale_log2, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of the single pass: rescale acc and l to the new row max, add the tile."""
    s, offs_n, region = _scores(q, k_base, region_base, start, n_end, limit, stride_kt, head_dim,
                                scale_log2, BLOCK_N, BLOCK_D, DOT_PRECISION, MASKED)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)                 # 0 while the row has seen no key
    p = tl.exp2(s - m_safe[:, None])              # ≤ 1; 0 for invisible keys
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p_hi, p_lo = split_fp16(p)
    acc = _onehot_dot(p_hi, p_lo, region, offs_r, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _coarse_step(q, k_base, region_base, start, n_end, limit, offs_r, lse2, acc, stride_kt,
                 head_dim, scale_log2, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of the coarse region pass: acc += P @ onehot(region)."""
    s, offs_n, region = _scores(q, k_base, region_base, start, n_end, limit, stride_kt, head_dim,
                                scale_log2, BLOCK_N, BLOCK_D, DOT_PRECISION, MASKED)
    p_hi, p_lo = split_fp16(_probabilities(s, lse2))
    return _onehot_dot(p_hi, p_lo, region, offs_r, acc)


@triton.jit
def _atomic_step(q, k_base, region_base, start, n_end, limit, lse2, out_rows, out_grp, head_ok,
                 stride_kt, head_dim, scale_log2, OUT_MODE: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, GP: tl.constexpr,
                 BLOCK_M: tl.constexpr, GP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of the atomic pass: p scattered into its rows' (or segment's) regions."""
    s, offs_n, region = _scores(q, k_base, region_base, start, n_end, limit, stride_kt, head_dim,
                                scale_log2, BLOCK_N, BLOCK_D, DOT_PRECISION, MASKED)
    p = _probabilities(s, lse2)
    if OUT_MODE == OUT_ROWS:
        take = (p > 0) & (region >= 0)[None, :]
        tl.atomic_add(out_rows + region[None, :], p, mask=take, sem="relaxed")
    else:
        colsum = _head_sums(p, BLOCK_ROWS, GP, BLOCK_M, GP_PAD, BLOCK_N, False)
        tl.atomic_add(out_grp + region[None, :], colsum,
                      mask=head_ok[:, None] & (region >= 0)[None, :], sem="relaxed")


@triton.jit
def _window_step(q, k_base, region_base, start, n_end, limit, lse2, rmin, rmax, offs_r, row_ok,
                 out_rows, out_grp, head_ok, stride_kt, head_dim, scale_log2,
                 OUT_MODE: tl.constexpr, BLOCK_ROWS: tl.constexpr, GP: tl.constexpr,
                 BLOCK_M: tl.constexpr, GP_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of the windowed pass: P @ onehot(window) for each window of BLOCK_R region
    ids in [rmin, rmax], added with load-add-store into memory the program owns."""
    s, offs_n, region = _scores(q, k_base, region_base, start, n_end, limit, stride_kt, head_dim,
                                scale_log2, BLOCK_N, BLOCK_D, DOT_PRECISION, MASKED)
    p_hi, p_lo = split_fp16(_probabilities(s, lse2))
    for w0 in range(rmin, rmax + 1, BLOCK_R):
        cols = w0 + offs_r
        part = _onehot_dot(p_hi, p_lo, region, cols, tl.zeros([BLOCK_M, BLOCK_R],
                                                               dtype=tl.float32))
        col_ok = cols <= rmax
        if OUT_MODE == OUT_ROWS:
            ptrs = out_rows + cols[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + part, mask=ok)
        else:
            red = _head_sums(part, BLOCK_ROWS, GP, BLOCK_M, GP_PAD, BLOCK_R, False)
            ptrs = out_grp + cols[None, :]
            ok = head_ok[:, None] & col_ok[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + red, mask=ok)
        # The next window/tile may re-read these addresses from other threads (or
        # replicated copies of a small tile): make the stores visible to the CTA.
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------
# Kernels: one per accumulation scheme, plus the single-pass coarse kernel. All take the same
# arguments (one launcher). Every key loop runs in two ranges from the planner's table
# (``loop_tiles``, :func:`interior_key_tiles`): interior tiles, visible to every real row of the
# block, without any mask, then the diagonal/edge tiles masked. Loop bounds are data and the
# bodies have no branch, so Triton software-pipelines the K loads of each range.

@triton.jit
def _mass_online_kernel(
    q_ptr, k_ptr, region_ptr, lse_ptr, out_ptr,
    cu_q_ptr, cu_k_ptr, blocks_ptr, loop_tiles_ptr, tile_base_ptr, tile_rmin_ptr, tile_rmax_ptr,
    group_kv_ptr, group_head_ptr, group_slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lh, stride_lt, stride_orow, stride_oslot,
    num_regions, head_dim, scale_log2,
    CAUSAL: tl.constexpr, OUT_MODE: tl.constexpr, BLOCK_ROWS: tl.constexpr, GP: tl.constexpr,
    BLOCK_M: tl.constexpr, GP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Coarse regions without ``lse`` in one pass over the visible keys (flash-forward style):
    acc[M, R] holds Σ exp2(s − m) · onehot(region) for the running row max m, rescaled when m
    grows, and is divided by the row sum at the end. p = exp2(s − m) ≤ 1 keeps its fp16 hi/lo
    split exact; a row without any visible key (and a padding row) gets 0."""
    q, k_base, k_start, seq, seg, grow, head64, slot, row_ok, limit, n_end = _program_block(
        q_ptr, k_ptr, cu_q_ptr, cu_k_ptr, blocks_ptr, group_kv_ptr, group_head_ptr,
        group_slot_ptr, stride_qt, stride_qh, stride_kt, stride_kh, head_dim, CAUSAL,
        BLOCK_ROWS, GP, BLOCK_M, GP_PAD, BLOCK_D)
    ti, tn, t0, tm, t1 = _loop_tiles(loop_tiles_ptr, n_end, BLOCK_N)
    region_base = region_ptr + k_start.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    m_i = tl.full(limit.shape, float("-inf"), dtype=tl.float32)
    l_i = tl.zeros(limit.shape, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for t in range(0, ti):
        m_i, l_i, acc = _online_step(q, k_base, region_base, t * BLOCK_N, n_end, limit, offs_r,
                                     m_i, l_i, acc, stride_kt, head_dim, scale_log2, BLOCK_N,
                                     BLOCK_D, DOT_PRECISION, False)
    for t in range(ti, tn):
        m_i, l_i, acc = _online_step(q, k_base, region_base, t * BLOCK_N, n_end, limit, offs_r,
                                     m_i, l_i, acc, stride_kt, head_dim, scale_log2, BLOCK_N,
                                     BLOCK_D, DOT_PRECISION, True)
    acc = acc * tl.where(row_ok & (l_i > 0), 1.0 / tl.maximum(l_i, 1e-30), 0.0)[:, None]
    _store_regions(acc, out_ptr, grow, slot, row_ok, seg, group_slot_ptr, stride_orow,
                   stride_oslot, num_regions, OUT_MODE, BLOCK_ROWS, GP, BLOCK_M, GP_PAD, BLOCK_R)


@triton.jit
def _mass_coarse_kernel(
    q_ptr, k_ptr, region_ptr, lse_ptr, out_ptr,
    cu_q_ptr, cu_k_ptr, blocks_ptr, loop_tiles_ptr, tile_base_ptr, tile_rmin_ptr, tile_rmax_ptr,
    group_kv_ptr, group_head_ptr, group_slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lh, stride_lt, stride_orow, stride_oslot,
    num_regions, head_dim, scale_log2,
    HAS_LSE: tl.constexpr, CAUSAL: tl.constexpr, OUT_MODE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr, GP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Coarse regions, two passes (normaliser given or pass 1, then p into regions):
    acc[M, R] += P @ onehot(key → region) over the block's region tiles, written once. The
    interior region tiles are software-pipelined at NUM_STAGES (cp.async K loads); the few
    masked diagonal/edge tiles run unpipelined (pipelining both loops spills on sm_80)."""
    q, k_base, k_start, seq, seg, grow, head64, slot, row_ok, limit, n_end = _program_block(
        q_ptr, k_ptr, cu_q_ptr, cu_k_ptr, blocks_ptr, group_kv_ptr, group_head_ptr,
        group_slot_ptr, stride_qt, stride_qh, stride_kt, stride_kh, head_dim, CAUSAL,
        BLOCK_ROWS, GP, BLOCK_M, GP_PAD, BLOCK_D)
    ti, tn, t0, tm, t1 = _loop_tiles(loop_tiles_ptr, n_end, BLOCK_N)
    region_base = region_ptr + k_start.to(tl.int64)
    lse2 = _normaliser(q, k_base, region_base, lse_ptr, stride_lh, stride_lt, head64, grow,
                       row_ok, limit, n_end, ti, tn, stride_kt, head_dim, scale_log2, HAS_LSE,
                       BLOCK_N, BLOCK_D, DOT_PRECISION)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for t in tl.range(t0, tm, num_stages=NUM_STAGES):
        acc = _coarse_step(q, k_base, region_base, t * BLOCK_N, n_end, limit, offs_r, lse2, acc,
                           stride_kt, head_dim, scale_log2, BLOCK_N, BLOCK_D, DOT_PRECISION,
                           False)
    for t in tl.range(tm, t1, num_stages=1):
        acc = _coarse_step(q, k_base, region_base, t * BLOCK_N, n_end, limit, offs_r, lse2, acc,
                           stride_kt, head_dim, scale_log2, BLOCK_N, BLOCK_D, DOT_PRECISION,
                           True)
    _store_regions(acc, out_ptr, grow, slot, row_ok, seg, group_slot_ptr, stride_orow,
                   stride_oslot, num_regions, OUT_MODE, BLOCK_ROWS, GP, BLOCK_M, GP_PAD, BLOCK_R)


@triton.jit
def _mass_atomic_kernel(
    q_ptr, k_ptr, region_ptr, lse_ptr, out_ptr,
    cu_q_ptr, cu_k_ptr, blocks_ptr, loop_tiles_ptr, tile_base_ptr, tile_rmin_ptr, tile_rmax_ptr,
    group_kv_ptr, group_head_ptr, group_slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lh, stride_lt, stride_orow, stride_oslot,
    num_regions, head_dim, scale_log2,
    HAS_LSE: tl.constexpr, CAUSAL: tl.constexpr, OUT_MODE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr, GP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Per-patch regions, non-deterministic: p scattered into the output with relaxed atomics
    (per row, or the column sums of the block's rows per head for segments)."""
    q, k_base, k_start, seq, seg, grow, head64, slot, row_ok, limit, n_end = _program_block(
        q_ptr, k_ptr, cu_q_ptr, cu_k_ptr, blocks_ptr, group_kv_ptr, group_head_ptr,
        group_slot_ptr, stride_qt, stride_qh, stride_kt, stride_kh, head_dim, CAUSAL,
        BLOCK_ROWS, GP, BLOCK_M, GP_PAD, BLOCK_D)
    ti, tn, t0, tm, t1 = _loop_tiles(loop_tiles_ptr, n_end, BLOCK_N)
    region_base = region_ptr + k_start.to(tl.int64)
    lse2 = _normaliser(q, k_base, region_base, lse_ptr, stride_lh, stride_lt, head64, grow,
                       row_ok, limit, n_end, ti, tn, stride_kt, head_dim, scale_log2, HAS_LSE,
                       BLOCK_N, BLOCK_D, DOT_PRECISION)
    out_rows = out_ptr + grow[:, None] * stride_orow + tl.maximum(slot, 0)[:, None] * stride_oslot
    out_grp, head_ok = _group_out(out_ptr, seg, group_slot_ptr, stride_orow, stride_oslot,
                                  OUT_MODE, GP, GP_PAD)
    for t in tl.range(t0, tm, num_stages=NUM_STAGES):
        _atomic_step(q, k_base, region_base, t * BLOCK_N, n_end, limit, lse2, out_rows, out_grp,
                     head_ok, stride_kt, head_dim, scale_log2, OUT_MODE, BLOCK_ROWS, GP, BLOCK_M,
                     GP_PAD, BLOCK_N, BLOCK_D, DOT_PRECISION, False)
    for t in tl.range(tm, t1, num_stages=NUM_STAGES):
        _atomic_step(q, k_base, region_base, t * BLOCK_N, n_end, limit, lse2, out_rows, out_grp,
                     head_ok, stride_kt, head_dim, scale_log2, OUT_MODE, BLOCK_ROWS, GP, BLOCK_M,
                     GP_PAD, BLOCK_N, BLOCK_D, DOT_PRECISION, True)


@triton.jit
def _mass_window_kernel(
    q_ptr, k_ptr, region_ptr, lse_ptr, out_ptr,
    cu_q_ptr, cu_k_ptr, blocks_ptr, loop_tiles_ptr, tile_base_ptr, tile_rmin_ptr, tile_rmax_ptr,
    group_kv_ptr, group_head_ptr, group_slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lh, stride_lt, stride_orow, stride_oslot,
    num_regions, head_dim, scale_log2,
    HAS_LSE: tl.constexpr, CAUSAL: tl.constexpr, OUT_MODE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr, GP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Per-patch regions, deterministic: for each key tile, the window(s) of BLOCK_R region ids
    its keys cover ([tile_rmin, tile_rmax], empty for a tile without region keys) get
    P @ onehot(window), added with plain load-add-store into memory the program owns (per-row
    outputs, or the block's partial row for segments). Bit-identical run to run."""
    q, k_base, k_start, seq, seg, grow, head64, slot, row_ok, limit, n_end = _program_block(
        q_ptr, k_ptr, cu_q_ptr, cu_k_ptr, blocks_ptr, group_kv_ptr, group_head_ptr,
        group_slot_ptr, stride_qt, stride_qh, stride_kt, stride_kh, head_dim, CAUSAL,
        BLOCK_ROWS, GP, BLOCK_M, GP_PAD, BLOCK_D)
    ti, tn, t0, tm, t1 = _loop_tiles(loop_tiles_ptr, n_end, BLOCK_N)
    region_base = region_ptr + k_start.to(tl.int64)
    lse2 = _normaliser(q, k_base, region_base, lse_ptr, stride_lh, stride_lt, head64, grow,
                       row_ok, limit, n_end, ti, tn, stride_kt, head_dim, scale_log2, HAS_LSE,
                       BLOCK_N, BLOCK_D, DOT_PRECISION)
    offs_r = tl.arange(0, BLOCK_R)
    out_rows = out_ptr + grow[:, None] * stride_orow + tl.maximum(slot, 0)[:, None] * stride_oslot
    out_grp, head_ok = _group_out(out_ptr, seg, group_slot_ptr, stride_orow, stride_oslot,
                                  OUT_MODE, GP, GP_PAD)
    tile0 = tl.load(tile_base_ptr + seq)             # the sequence's first key tile
    for t in tl.range(t0, tm, num_stages=NUM_STAGES):
        _window_step(q, k_base, region_base, t * BLOCK_N, n_end, limit, lse2,
                     tl.load(tile_rmin_ptr + tile0 + t), tl.load(tile_rmax_ptr + tile0 + t),
                     offs_r, row_ok, out_rows, out_grp, head_ok, stride_kt, head_dim, scale_log2,
                     OUT_MODE, BLOCK_ROWS, GP, BLOCK_M, GP_PAD, BLOCK_N, BLOCK_D, BLOCK_R,
                     DOT_PRECISION, False)
    for t in tl.range(tm, t1, num_stages=NUM_STAGES):
        _window_step(q, k_base, region_base, t * BLOCK_N, n_end, limit, lse2,
                     tl.load(tile_rmin_ptr + tile0 + t), tl.load(tile_rmax_ptr + tile0 + t),
                     offs_r, row_ok, out_rows, out_grp, head_ok, stride_kt, head_dim, scale_log2,
                     OUT_MODE, BLOCK_ROWS, GP, BLOCK_M, GP_PAD, BLOCK_N, BLOCK_D, BLOCK_R,
                     DOT_PRECISION, True)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, seg_start_ptr, seg_blocks_ptr, row_elems,
                         BLOCK: tl.constexpr):
    """out[s, :] = Σ partial[b, :] over the blocks b of segment s, in the listed (fixed) order."""
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < row_elems
    lo = tl.load(seg_start_ptr + s)
    hi = tl.load(seg_start_ptr + s + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(lo, hi):
        b = tl.load(seg_blocks_ptr + i).to(tl.int64)
        acc += tl.load(part_ptr + b * row_elems + cols, mask=ok, other=0.0)
    tl.store(out_ptr + s.to(tl.int64) * row_elems + cols, acc, mask=ok)


@dataclass(frozen=True)
class TileConfig:
    """One entry of :data:`MASS_TILE_TABLE`: stacked rows M (row block × group heads), keys per
    tile, software-pipelining stages of the key loops, warps, and the ptxas register limit
    (``maxnreg``; None: ptxas's own choice)."""

    stacked_rows: int
    block_n: int
    num_stages: int
    num_warps: int
    maxnreg: int | None = MAX_REGISTERS


# The configuration space the table draws from (DESIGN §7 / issue 13): M 64/128, BLOCK_N
# 32–128 (32 only for D > 128, 16 only for fp32's tf32x3 tiles), 1–3 stages, 4/8 warps.
TILE_SPACE = {"stacked_rows": (16, 64, 128), "block_n": (16, 32, 64, 128),
              "num_stages": (1, 2, 3), "num_warps": (4, 8)}
# Head-dim classes (an entry serves every D up to its class; built at the class's D) and
# group classes (heads stacked per KV group: up to 8, or more — built at 3 and at the most the
# tile stacks).
HEAD_DIM_CLASSES = (128, 256)
GROUP_CLASSES = ("narrow", "wide")
NARROW_GROUP = 8
# Stacking of the narrow class's builds: 3 heads per group, how the KAWHI heads are packed
# (:func:`pack_head_groups`; not a power of two: the packed layout and its selector sums).
NARROW_BUILD_GROUP = 3

# Tile table of the Triton attention_mass, keyed on (dtype, head-dim class, kernel, has_lse,
# group class); "auto" launches (no block_rows/block_n given) take their entry from here.
# Kernels: "one-pass" (_mass_online_kernel: coarse R ≤ 64 without lse), "coarse" (two-pass
# _mass_coarse_kernel, R ≤ 64 with lse), "atomic", "window".
# Every entry is compiled for sm_80 and sm_90 on Triton 3.6 and 3.9 by the static builds
# (:func:`kernel_builds` lists one build per entry and output mode) and chosen as the largest
# spill-free tile of its class there — not on timings: no GPU was available when it was made, so
# nothing is autotuned. GPU timings (benchmarks/attention_mass) are meant to re-rank the space
# per entry and edit this table; the static builds keep each new choice spill-free.
# A plan's lse and lse-free launches share its row-block and key-tile tables, so paired entries
# (one-pass with coarse + lse; atomic/window with and without lse) keep equal M and
# BLOCK_N (tested); stages and warps are free per entry.
_HALF = {
    # D ≤ 128. The lse region pass is pipelined (cp.async) at 32 keys per tile: at 64 it spills
    # on sm_80 with Triton 3.6 (88–136 B), and with the 255-register cap at any tile.
    (128, "one-pass", False, "narrow"): TileConfig(64, 64, 1, 8),
    (128, "one-pass", False, "wide"): TileConfig(64, 64, 1, 8),
    (128, "coarse", True, "narrow"): TileConfig(64, 32, 2, 8, None),
    (128, "coarse", True, "wide"): TileConfig(64, 32, 2, 8, None),
    (128, "atomic", False, "narrow"): TileConfig(64, 64, 2, 8),
    (128, "atomic", False, "wide"): TileConfig(64, 64, 2, 8),
    (128, "atomic", True, "narrow"): TileConfig(64, 64, 2, 8),
    (128, "atomic", True, "wide"): TileConfig(64, 64, 2, 8),
    (128, "window", False, "narrow"): TileConfig(64, 64, 2, 8),
    (128, "window", False, "wide"): TileConfig(64, 64, 2, 8),
    (128, "window", True, "narrow"): TileConfig(64, 64, 2, 8),
    (128, "window", True, "wide"): TileConfig(64, 64, 2, 8),
    # 128 < D ≤ 256: 32 keys per tile
    (256, "one-pass", False, "narrow"): TileConfig(64, 32, 1, 8),
    (256, "one-pass", False, "wide"): TileConfig(64, 32, 1, 8),
    (256, "coarse", True, "narrow"): TileConfig(64, 32, 2, 8, None),
    (256, "coarse", True, "wide"): TileConfig(64, 32, 2, 8, None),
    (256, "atomic", False, "narrow"): TileConfig(64, 32, 2, 8),
    (256, "atomic", False, "wide"): TileConfig(64, 32, 2, 8),
    (256, "atomic", True, "narrow"): TileConfig(64, 32, 2, 8),
    (256, "atomic", True, "wide"): TileConfig(64, 32, 2, 8),
    (256, "window", False, "narrow"): TileConfig(64, 32, 2, 8),
    (256, "window", False, "wide"): TileConfig(64, 32, 2, 8),
    (256, "window", True, "narrow"): TileConfig(64, 32, 2, 8),
    (256, "window", True, "wide"): TileConfig(64, 32, 2, 8),
}
# fp32 inputs (D ≤ 128): tf32x3 QKᵀ triples the operand registers: 16 × 16 tiles, 1 stage,
# 4 warps (8 on the windowed path).
_FP32 = {
    (128, "one-pass", False, "narrow"): TileConfig(16, 16, 1, 4),
    (128, "one-pass", False, "wide"): TileConfig(16, 16, 1, 4),
    (128, "coarse", True, "narrow"): TileConfig(16, 16, 1, 4),
    (128, "coarse", True, "wide"): TileConfig(16, 16, 1, 4),
    (128, "atomic", False, "narrow"): TileConfig(16, 16, 1, 4),
    (128, "atomic", False, "wide"): TileConfig(16, 16, 1, 4),
    (128, "atomic", True, "narrow"): TileConfig(16, 16, 1, 4),
    (128, "atomic", True, "wide"): TileConfig(16, 16, 1, 4),
    (128, "window", False, "narrow"): TileConfig(16, 16, 1, 8),
    (128, "window", False, "wide"): TileConfig(16, 16, 1, 8),
    (128, "window", True, "narrow"): TileConfig(16, 16, 1, 8),
    (128, "window", True, "wide"): TileConfig(16, 16, 1, 8),
}
MASS_TILE_TABLE = {(dtype, *key): cfg for dtype, part in
                   (("fp16", _HALF), ("bf16", _HALF), ("fp32", _FP32)) for key, cfg in part.items()}
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _kernel_name(acc_mode: int, block_r: int, has_lse: bool) -> str:
    """The table's kernel key of a launch (see :func:`_main_kernel`)."""
    if _single_pass(acc_mode, block_r, has_lse):
        return "one-pass"
    return {_ACC_COARSE: "coarse", _ACC_ATOMIC: "atomic", _ACC_WINDOW: "window"}[acc_mode]


def table_key(dtype: torch.dtype, d: int, acc_mode: int, block_r: int, has_lse: bool,
              gp: int) -> tuple:
    """:data:`MASS_TILE_TABLE` key of a launch: (dtype name, head-dim class, kernel, has_lse,
    group class)."""
    d_class = next((c for c in HEAD_DIM_CLASSES if d <= c), None)
    if dtype not in _DTYPE_NAMES or d_class is None:
        raise ValueError(f"no attention_mass tile for dtype {dtype}, head dim {d}")
    kernel = _kernel_name(acc_mode, block_r, has_lse)
    return (_DTYPE_NAMES[dtype], d_class, kernel, bool(has_lse) and kernel != "one-pass",
            "narrow" if gp <= NARROW_GROUP else "wide")


def _tile_config(dtype: torch.dtype, d: int, acc_mode: int, block_r: int, has_lse: bool,
                 gp: int) -> TileConfig:
    """The :data:`MASS_TILE_TABLE` entry of a launch."""
    key = table_key(dtype, d, acc_mode, block_r, has_lse, gp)
    if key not in MASS_TILE_TABLE:
        raise ValueError(f"no attention_mass tile for {key}")
    return MASS_TILE_TABLE[key]


def max_stacked_rows(dtype: torch.dtype, d: int, acc_mode: int) -> int:
    """Most stacked rows M over the entries a plan of (dtype, d, accumulation) may launch: the
    cap on heads per KV group (larger groups are split)."""
    return min(_tile_config(dtype, d, acc_mode, 16, has_lse, 1).stacked_rows
               for has_lse in (False, True))


def _accumulation(num_regions: int, deterministic: bool, coarse_max_regions: int,
                  dtype: torch.dtype) -> tuple[int, int]:
    """(ACC_MODE, BLOCK_R): registers for R ≤ coarse_max_regions, else windows (deterministic;
    32 regions wide for fp32 inputs, whose window path spills at 64 on Triton 3.6 / sm_80) or
    atomics."""
    if not 0 <= coarse_max_regions <= ONE_PASS_MAX_REGIONS:
        raise ValueError(f"coarse_max_regions: expected 0..{ONE_PASS_MAX_REGIONS} (the register "
                         f"accumulator's checked width), got {coarse_max_regions}")
    if num_regions <= coarse_max_regions:
        return _ACC_COARSE, max(16, next_pow2(num_regions))
    if deterministic:
        return _ACC_WINDOW, (32 if dtype == torch.float32 else 64)
    return _ACC_ATOMIC, 16                           # (BLOCK_R unused on this path)


def _output_mode(segmented: bool, deterministic: bool) -> int:
    if not segmented:
        return _OUT_ROWS
    return _OUT_PARTIAL if deterministic else _OUT_SEG_ATOMIC


def _launch_meta(dtype: torch.dtype, d: int, acc_mode: int, block_r: int, out_mode: int, gp: int,
                 *, has_lse: bool, causal: bool, dot_precision_: str,
                 block_rows: int | None = None, block_n: int | None = None) -> tuple[dict, int, int]:
    """(constexprs, num_warps, num_stages) of one launch of :func:`_main_kernel` (same
    arguments): the table entry (:func:`_tile_config`), or the given ``block_rows``/``block_n``;
    the only place launch parameters are chosen, used by the launcher and by
    :func:`kernel_builds`."""
    cfg = _tile_config(dtype, d, acc_mode, block_r, has_lse, gp)
    block_rows = block_rows if block_rows is not None else max(1, cfg.stacked_rows // gp)
    block_n = block_n if block_n is not None else cfg.block_n
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n: expected a power of two ≥ 16, got {block_n}")
    if gp & (gp - 1) == 0:                   # power-of-two group: the rows fill M exactly
        if block_rows * gp < 16:             # tl.dot needs M ≥ 16
            block_rows = next_pow2(-(-16 // gp))
        block_rows = next_pow2(block_rows)
        block_m, gp_pad = block_rows * gp, gp
    else:                                    # packed group: M = next power of two ≥ rows × GP
        block_m, gp_pad = max(16, next_pow2(block_rows * gp)), max(16, next_pow2(gp))
    constexprs = dict(CAUSAL=bool(causal), OUT_MODE=out_mode, BLOCK_ROWS=block_rows, GP=gp,
                      BLOCK_M=block_m, GP_PAD=gp_pad, BLOCK_N=block_n,
                      BLOCK_D=max(16, next_pow2(d)), BLOCK_R=block_r,
                      DOT_PRECISION=dot_precision_, NUM_STAGES=cfg.num_stages)
    if not _single_pass(acc_mode, block_r, has_lse):
        constexprs["HAS_LSE"] = bool(has_lse)
    return constexprs, cfg.num_warps, cfg.num_stages


def _single_pass(acc_mode: int, block_r: int, has_lse: bool) -> bool:
    """Whether a launch uses the single-pass kernel: coarse regions (R ≤ 64) without ``lse``."""
    return acc_mode == _ACC_COARSE and block_r <= ONE_PASS_MAX_REGIONS and not has_lse


def _main_kernel(acc_mode: int, block_r: int, has_lse: bool):
    """The ``@triton.jit`` kernel of a launch (looked up when called, so it can be replaced)."""
    if _single_pass(acc_mode, block_r, has_lse):
        return _mass_online_kernel
    return {_ACC_COARSE: _mass_coarse_kernel, _ACC_ATOMIC: _mass_atomic_kernel,
            _ACC_WINDOW: _mass_window_kernel}[acc_mode]


def kernel_builds():
    """Every compiled configuration the launcher can choose (for the static GPU checks in
    :mod:`.builds`): each :data:`MASS_TILE_TABLE` entry, built at its head-dim class's D and at
    its group class's stacking (3 heads per KV group, packed as the KAWHI heads are, or the
    most the tile stacks, a power of two), with
    every output mode its kernel serves (rows, segment atomics, deterministic partials), plus
    the deterministic segment reduction.
    Causal masking is on (off only drops the mask). Each build records its table key."""
    from .builds import KernelBuild

    precision = compiled_dot_precision()
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    out_names = {_OUT_ROWS: "rows", _OUT_SEG_ATOMIC: "seg-atomic", _OUT_PARTIAL: "partials"}
    acc_of = {"one-pass": (_ACC_COARSE, 64), "coarse": (_ACC_COARSE, 64),
              "atomic": (_ACC_ATOMIC, 16), "window": (_ACC_WINDOW, None)}
    builds = []
    for key in MASS_TILE_TABLE:
        tname, d, kernel_name, has_lse, group = key
        dtype = dtypes[tname]
        if d > triton_mass_head_dim_limit(dtype)[0]:
            raise AssertionError(f"table entry {key} is beyond the head-dim limit")
        acc, block_r = acc_of[kernel_name]
        if kernel_name == "window":
            block_r = _accumulation(1 << 20, True, 64, dtype)[1]
        deterministic_out = (False, True) if kernel_name != "atomic" else (False,)
        outs = sorted({_output_mode(seg, det) for seg in (False, True) for det in deterministic_out})
        if kernel_name == "atomic":
            outs = [_OUT_ROWS, _OUT_SEG_ATOMIC]
        elif kernel_name == "window":
            outs = [_OUT_ROWS, _OUT_PARTIAL]
        gp = NARROW_BUILD_GROUP if group == "narrow" else max_stacked_rows(dtype, d, acc)
        for out in outs:
            constexprs, warps, stages = _launch_meta(
                dtype, d, acc, block_r, out, gp, has_lse=has_lse, causal=True,
                dot_precision_=precision)
            if table_key(dtype, d, acc, block_r, has_lse, gp) != key:
                raise AssertionError(f"build of {key} resolves to another table entry")
            builds.append(KernelBuild(
                name=(f"attention_mass {tname} D={d} {kernel_name}/{out_names[out]}"
                      f" GP={gp} {'lse' if has_lse else 'no-lse'}"),
                kernel=_main_kernel(acc, block_r, has_lse),
                pointer_types={"q_ptr": "*" + tname, "k_ptr": "*" + tname,
                               "lse_ptr": "*fp32", "out_ptr": "*fp32"},
                float_args=("scale_log2",), constexprs=constexprs,
                num_warps=warps, num_stages=stages, tensor_cores=True,
                async_copies=stages > 1 and acc != _ACC_WINDOW,
                maxnreg=_tile_config(dtype, d, acc, block_r, has_lse, gp).maxnreg,
                table_key=key))
    for block in (16, 1024):
        builds.append(KernelBuild(
            name=f"attention_mass segment partials BLOCK={block}", kernel=_sum_partials_kernel,
            pointer_types={"part_ptr": "*fp32", "out_ptr": "*fp32"}, float_args=(),
            constexprs={"BLOCK": block}, num_warps=4, num_stages=3, tensor_cores=False))
    return builds


# Head packing: a candidate split whose stacked rows per query row are within this factor of the
# fewest is preferred when it has fewer groups (each group reads its KV head's K once more).
PACK_TOLERANCE = 1.05


def pack_head_groups(heads: list[int], group_size: int, stacked_rows: int, max_group: int,
                     device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Selected query heads packed into KV groups without power-of-two padding: (kv int32 [G],
    head int32 [G, GP], slot int32 [G, GP], GP), −1 padding for groups smaller than GP.

    Each KV head's selected heads are split into near-equal parts of at most ``cap`` heads; a
    program stacks ⌊stacked_rows / GP⌋ rows of its part (M = rows × GP stacked rows, GP any
    size), so the work per query row is G / ⌊stacked_rows / GP⌋ stacked rows per M. The cap
    (1..max_group) with the least work is taken, or, within :data:`PACK_TOLERANCE` of it, the
    one with the fewest groups. E.g. the KAWHI heads {0, 1, 3 | 22–27} of Qwen2.5-VL-7B (7 query
    heads per KV head) at M = 64: three groups of 3 heads × 21 rows (63 of 64 stacked rows real)
    instead of two groups of 8 padded heads × 8 rows (9 of 16 real).
    """
    by_kv = heads_by_kv(heads, group_size)
    largest = max(len(m) for m in by_kv.values())
    candidates = []
    for cap in range(1, max(1, min(max_group, stacked_rows, largest)) + 1):
        groups = split_head_groups(by_kv, cap)
        gp = max(len(m) for _, m in groups)
        work = len(groups) / max(1, stacked_rows // gp)
        candidates.append((work, len(groups), groups, gp))
    least = min(c[0] for c in candidates)
    _, _, groups, gp = min((c for c in candidates if c[0] <= least * PACK_TOLERANCE),
                           key=lambda c: (c[1], c[0]))
    return head_group_tables(groups, gp, device)


def interior_key_tiles(blocks: torch.Tensor, cu_seqlens_q_host: torch.Tensor,
                       cu_seqlens_k_host: torch.Tensor, block_n: int, causal: bool) -> torch.Tensor:
    """Per row block, the leading key tiles every real row of the block sees in full: int64
    [num_blocks] on the CPU, ⌊min(limit of the block's first row, Lk) / block_n⌋ (bottom-right
    causal; all of a sequence's full tiles without causality). Tiles below it need no mask at
    all (no causal limit inside, no key past the sequence end); the diagonal and the sequence's
    partial last tile come after it.

    Args:
        blocks: :func:`.._fused_host.row_blocks` table. cu_seqlens_q_host, cu_seqlens_k_host: int
            [B+1] on the CPU. block_n: keys per tile. causal: bottom-right aligned causal mask.
    """
    cu_q = cu_seqlens_q_host.to("cpu", torch.int64)
    cu_k = cu_seqlens_k_host.to("cpu", torch.int64)
    seq = blocks[:, 0].to(torch.int64)
    lk = cu_k[seq + 1] - cu_k[seq]
    if causal:
        lq = cu_q[seq + 1] - cu_q[seq]
        first_local = blocks[:, 1].to(torch.int64) - cu_q[seq]
        visible = torch.clamp(torch.minimum(first_local + 1 + lk - lq, lk), min=0)
    else:
        visible = lk
    return visible // block_n


def loop_tiles_table(interior: torch.Tensor, region_ranges: torch.Tensor) -> torch.Tensor:
    """The kernels' loop-bound table, int32 [num_blocks, 4] on ``region_ranges``' device:
    (ti, t0, tm, t1) — interior tiles [0, ti) of the full pass (the rest, up to the block's
    visible tiles, masked), and the region pass [t0, t1) split at tm = clamp(ti, t0, t1) into
    unmasked [t0, tm) and masked [tm, t1). Built without a sync.

    Args:
        interior: :func:`interior_key_tiles` (CPU). region_ranges: int32 [num_blocks, 2] from
            :func:`.._fused_host.region_tile_ranges`.
    """
    ranges = region_ranges.to(torch.int64)
    ti = interior.to(device=ranges.device, dtype=torch.int64)
    t0, t1 = ranges[:, 0], ranges[:, 1]
    tm = torch.minimum(torch.maximum(ti, t0), t1)
    return torch.stack([ti, t0, tm, t1], 1).to(torch.int32).contiguous()


@dataclass(frozen=True)
class KeyTileTables:
    """The key-tile tables of one launch's BLOCK_N (see :mod:`.._fused_host`): per sequence its
    first tile (tile_base int32 [B]), per tile its region span (tile_rmin/tile_rmax int32 [T]),
    per row block its visible tiles (block_key_tiles int64 [num_blocks], CPU), region range
    (region_tiles int32 [num_blocks, 2]), interior tiles (interior_tiles int64, CPU) and the
    kernels' loop bounds (loop_tiles int32 [num_blocks, 4], :func:`loop_tiles_table`)."""

    block_n: int
    tile_base: torch.Tensor
    tile_rmin: torch.Tensor
    tile_rmax: torch.Tensor
    block_key_tiles: torch.Tensor
    region_tiles: torch.Tensor
    interior_tiles: torch.Tensor
    loop_tiles: torch.Tensor


def key_tile_tables(blocks_host: torch.Tensor, cu_seqlens_q_host: torch.Tensor,
                    cu_seqlens_k_host: torch.Tensor, key_region: torch.Tensor, block_n: int,
                    causal: bool) -> KeyTileTables:
    """:class:`KeyTileTables` of a layout at ``block_n`` keys per tile (no device→host sync)."""
    tile_base, tile_rmin, tile_rmax = key_tiles(cu_seqlens_k_host, key_region, block_n)
    visible = block_key_tiles(blocks_host, cu_seqlens_q_host, cu_seqlens_k_host, block_n, causal)
    ranges = region_tile_ranges(blocks_host, visible, cu_seqlens_k_host, tile_rmax, block_n)
    interior = interior_key_tiles(blocks_host, cu_seqlens_q_host, cu_seqlens_k_host, block_n,
                                  causal)
    return KeyTileTables(block_n, tile_base, tile_rmin, tile_rmax, visible, ranges, interior,
                         loop_tiles_table(interior, ranges))


@dataclass(frozen=True)
class MassLaunchPlan:
    """Everything one ``attention_mass`` launch needs except q, k and lse: built once per batch
    layout by :func:`plan_attention_mass_triton`, on the layout's device. The launch parameters
    of both cases are planned (``launches[has_lse]``: (constexprs, num_warps, num_stages)) with
    their key-tile tables (``tables[has_lse]``, shared when both use the same BLOCK_N; the row
    blocks are always shared), and each run picks its kernel (:func:`_main_kernel`).

    ``run_attention_mass_triton`` reads only these tensors and Python values: no host sync, no
    data-dependent shape.
    """

    device: torch.device
    heads: tuple
    num_out: int
    num_regions: int
    num_segments: int
    out_mode: int
    acc_mode: int
    block_r: int
    launches: dict
    maxnreg: dict
    tables: dict
    scale_log2: float
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    region: torch.Tensor
    blocks: torch.Tensor
    kv_tab: torch.Tensor
    head_tab: torch.Tensor
    slot_tab: torch.Tensor
    seg_start: torch.Tensor | None
    seg_order: torch.Tensor | None

    @property
    def num_blocks(self) -> int:
        return self.blocks.shape[0]

    @property
    def constexprs(self) -> dict:
        """Constexprs of the launch without ``lse``."""
        return self.launches[False][0]

    # The lse-free launch's key-tile tables (what the tile-count tests read).
    @property
    def block_key_tiles(self) -> torch.Tensor:
        return self.tables[False].block_key_tiles

    @property
    def region_tiles(self) -> torch.Tensor:
        return self.tables[False].region_tiles

    @property
    def interior_tiles(self) -> torch.Tensor:
        return self.tables[False].interior_tiles

    @property
    def loop_tiles(self) -> torch.Tensor:
        return self.tables[False].loop_tiles

    def key_tile_visits(self, has_lse: bool) -> int:
        """QKᵀ tiles ([M, BLOCK_N] score tiles at that launch's BLOCK_N) a run visits over all
        programs (:func:`.._fused_host.key_tile_visits` over the launch's own loop tables; syncs
        once for the region ranges: not for the hot path)."""
        single = _single_pass(self.acc_mode, self.block_r, has_lse)
        t = self.tables[has_lse]
        return key_tile_visits(t.block_key_tiles, t.region_tiles, self.kv_tab.numel(),
                               normaliser_pass=not has_lse, region_pass=not single)

    def score_columns(self, has_lse: bool) -> int:
        """Stacked-row × key products per M a run computes: key_tile_visits × BLOCK_N (comparable
        across launches of different BLOCK_N)."""
        return self.key_tile_visits(has_lse) * self.tables[has_lse].block_n


def plan_attention_mass_triton(
    cu_seqlens_q_host: torch.Tensor,
    cu_seqlens_k_host: torch.Tensor,
    key_region: torch.Tensor,
    num_regions: int,
    *,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    query_segment_host: torch.Tensor | None = None,
    num_segments: int = 0,
    heads: list[int] | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    block_rows: int | None = None,
    block_n: int | None = None,
    coarse_max_regions: int = 64,
    max_group_heads: int | None = None,
) -> MassLaunchPlan:
    """Launch tables of the Triton ``attention_mass`` for one batch layout (inputs validated).

    Args:
        cu_seqlens_q_host, cu_seqlens_k_host: int [B+1] cumulative lengths, on the CPU.
        key_region: int [total_k] region ids on the tensors' device (its region spans per key tile
            are reduced there, without a sync).
        num_regions: R. dtype / num_heads / num_kv_heads / head_dim: of the q and k to come
            (the tile configuration depends on them; an fp16 plan runs fp16 or bf16 inputs).
        query_segment_host: optional int [total_q] segment ids on the CPU; num_segments: S.
        Other arguments as :func:`attention_mass_triton`.
    """
    device = key_region.device
    heads = list(range(num_heads)) if heads is None else list(heads)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    segmented = query_segment_host is not None
    check_head_dim("q", head_dim, "Triton", *triton_mass_head_dim_limit(dtype))
    dtype = interpreter_dot_dtype(dtype)          # what the kernel's tl.dot operands will be
    total_q = int(cu_seqlens_q_host[-1])
    num_out = num_segments if segmented else total_q
    acc_mode, block_r = _accumulation(num_regions, deterministic, coarse_max_regions, dtype)
    max_stacked = max_stacked_rows(dtype, head_dim, acc_mode)
    max_group = max_group_heads if max_group_heads is not None else max_stacked
    if max_group < 1:
        raise ValueError(f"max_group_heads: expected a positive int, got {max_group}")
    kv_tab, head_tab, slot_tab, gp = pack_head_groups(heads, num_heads // num_kv_heads,
                                                      max_stacked, max_group, device)
    out_mode = _output_mode(segmented, deterministic)
    launches = {has_lse: _launch_meta(
        dtype, head_dim, acc_mode, block_r, out_mode, gp, has_lse=has_lse, causal=causal,
        dot_precision_=dot_precision(device), block_rows=block_rows, block_n=block_n)
        for has_lse in (False, True)}
    tiles = launches[False][0]
    if launches[True][0]["BLOCK_ROWS"] != tiles["BLOCK_ROWS"]:
        raise AssertionError("the row-block table is shared by both launches")
    blocks_host = row_blocks(cu_seqlens_q_host, cu_seqlens_k_host, tiles["BLOCK_ROWS"],
                             query_segment_host)
    by_n = {}
    for has_lse in (False, True):
        n = launches[has_lse][0]["BLOCK_N"]
        if n not in by_n:
            by_n[n] = key_tile_tables(blocks_host, cu_seqlens_q_host, cu_seqlens_k_host,
                                      key_region, n, causal)
    tables = {has_lse: by_n[launches[has_lse][0]["BLOCK_N"]] for has_lse in (False, True)}
    seg_start = seg_order = None
    if out_mode == _OUT_PARTIAL:
        seg_start, seg_order = (t.to(device) for t in segment_block_lists(blocks_host, num_segments))
    return MassLaunchPlan(
        device=device, heads=tuple(heads), num_out=num_out, num_regions=num_regions,
        num_segments=num_segments, out_mode=out_mode, acc_mode=acc_mode, block_r=block_r,
        launches=launches, tables=tables, scale_log2=scale * LOG2E,
        maxnreg={has_lse: _tile_config(dtype, head_dim, acc_mode, block_r, has_lse, gp).maxnreg
                 for has_lse in (False, True)},
        cu_q=cu_seqlens_q_host.to(device=device, dtype=torch.int32),
        cu_k=cu_seqlens_k_host.to(device=device, dtype=torch.int32),
        region=key_region.to(dtype=torch.int32).contiguous(),
        blocks=blocks_host.to(device), kv_tab=kv_tab, head_tab=head_tab, slot_tab=slot_tab,
        seg_start=seg_start, seg_order=seg_order)


def run_attention_mass_triton(plan: MassLaunchPlan, q: torch.Tensor, k: torch.Tensor,
                              lse: torch.Tensor | None = None) -> torch.Tensor:
    """One launch of the planned ``attention_mass`` (two with deterministic segments); no host
    sync. q/k/lse must match the plan (checked by the caller): fp32 [num_out, len(heads), R]."""
    q, k = interpreter_dot_operands(q, k)
    device = plan.device
    shape = (plan.num_out, len(plan.heads), plan.num_regions)
    if plan.num_out == 0 or plan.num_regions == 0 or k.shape[0] == 0 or plan.num_blocks == 0:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    if plan.out_mode == _OUT_PARTIAL:
        # The reduction writes every segment row; the coarse path stores every partial row,
        # the windowed path accumulates into its partials (zero-filled).
        out = torch.empty(shape, dtype=torch.float32, device=device)
        make = torch.zeros if plan.acc_mode == _ACC_WINDOW else torch.empty
        target = make(plan.num_blocks, len(plan.heads), plan.num_regions, dtype=torch.float32,
                      device=device)
    else:
        out = torch.zeros(shape, dtype=torch.float32, device=device)   # rows/segments may stay 0
        target = out
    q = last_dim_contiguous(q)
    k = last_dim_contiguous(k)
    if lse is None:
        lse_arg, stride_lh, stride_lt = q, 0, 0
    else:
        lse_arg, stride_lh, stride_lt = lse, lse.stride(0), lse.stride(1)
    has_lse = lse is not None
    constexprs, num_warps, num_stages = plan.launches[has_lse]
    tables = plan.tables[has_lse]
    kernel = _main_kernel(plan.acc_mode, plan.block_r, has_lse)
    extra = launch_options(num_warps, num_stages=num_stages, maxnreg=plan.maxnreg[has_lse])
    with device_guard(device):              # Triton launches on the current device
        kernel[(plan.num_blocks, plan.kv_tab.numel())](
            q, k, plan.region, lse_arg, target,
            plan.cu_q, plan.cu_k, plan.blocks, tables.loop_tiles, tables.tile_base,
            tables.tile_rmin, tables.tile_rmax,
            plan.kv_tab, plan.head_tab, plan.slot_tab,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), stride_lh, stride_lt,
            target.stride(0), target.stride(1),
            plan.num_regions, q.shape[2], plan.scale_log2, **constexprs, **extra,
        )
        if plan.out_mode == _OUT_PARTIAL:
            row_elems = len(plan.heads) * plan.num_regions
            block = min(1024, next_pow2(row_elems))
            _sum_partials_kernel[(plan.num_segments, triton.cdiv(row_elems, block))](
                target, out, plan.seg_start, plan.seg_order, row_elems, BLOCK=block)
    return out


def attention_mass_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    key_region: torch.Tensor,
    num_regions: int,
    *,
    query_segment: torch.Tensor | None = None,
    num_segments: int = 0,
    heads: list[int] | None = None,
    lse: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    block_rows: int | None = None,
    block_n: int | None = None,
    coarse_max_regions: int = 64,
    max_group_heads: int | None = None,
) -> torch.Tensor:
    """Triton ``attention_mass`` (inputs validated by :func:`kawhi_kernels.ops.attention_mass`):
    :func:`plan_attention_mass_triton` then :func:`run_attention_mass_triton`.

    Args:
        q: [total_q, Hq, D] fp16/bf16 with D ≤ 256, or fp32 with D ≤ 128.
        k: [total_k, Hk, D] same dtype, Hq % Hk == 0.
        cu_seqlens_q, cu_seqlens_k: int32/int64 [B+1].
        key_region: int32/int64 [total_k] in [0, R) or −1.
        num_regions: R.
        query_segment: optional int [total_q] in [0, num_segments) or −1; num_segments: S.
        heads: selected query heads (output order), default all.
        lse: optional fp32 [Hq, total_q] natural-log normalisers (skips pass 1); a non-finite
            entry gives 0 for its row; probabilities are capped at 1.
        causal: bottom-right aligned causal mask.
        softmax_scale: default 1/√D.
        deterministic: bit-identical results run to run (no float atomics).
        block_rows: rows per block (default ⌊M / GP⌋, M = 64 stacked rows, 16 for fp32; GP =
            heads per KV group as packed by :func:`pack_head_groups`, any size; a power-of-two
            GP rounds the rows to a power of two).
        block_n: keys per tile (default 64, 32 for D > 128, 16 for fp32; a power of two ≥ 16).
        coarse_max_regions: R at or below which the register one-hot matmul path is used
            (0..64; wider register accumulators are not in the checked tile table).
        max_group_heads: most query heads of one KV head stacked in one program (default: the
            tile configuration's M: 64 stacked rows, 16 for fp32); larger groups are split.

    Returns:
        fp32 [num_segments or total_q, len(heads), R].
    """
    plan = plan_attention_mass_triton(
        cu_seqlens_q.detach().to("cpu", torch.int64), cu_seqlens_k.detach().to("cpu", torch.int64),
        key_region.to(q.device), num_regions, dtype=q.dtype, num_heads=q.shape[1],
        num_kv_heads=k.shape[1], head_dim=q.shape[2],
        query_segment_host=(None if query_segment is None
                            else query_segment.detach().to("cpu", torch.int64)),
        num_segments=num_segments, heads=heads, causal=causal,
        softmax_scale=softmax_scale, deterministic=deterministic, block_rows=block_rows,
        block_n=block_n, coarse_max_regions=coarse_max_regions, max_group_heads=max_group_heads)
    return run_attention_mass_triton(plan, q, k, lse)
