"""Shared helpers for the Triton tests: random packed-varlen inputs, tolerances, the device.

Each Triton test module sets ``TRITON_INTERPRET=1`` itself (without a CUDA device) before
anything imports triton; the kernels then run on CPU tensors in Triton's interpreter.
"""
from __future__ import annotations

import math

import torch

HAS_CUDA = torch.cuda.is_available()
# Tensors the kernels run on: CUDA when present, else CPU under the interpreter.
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# Kernel vs torch reference. Under the interpreter only the summation order differs; compiled
# kernels add approximate exp2/log2 and tensor-core accumulation orders. Both references use the
# same fp16 values as the kernels, so one tolerance serves fp32 and fp16 inputs.
MASS_TOL = {"atol": 2e-5, "rtol": 2e-4} if HAS_CUDA else {"atol": 2e-6, "rtol": 2e-5}
COSINE_TOL = {"atol": 1e-5, "rtol": 1e-4} if HAS_CUDA else {"atol": 1e-6, "rtol": 1e-5}


def fresh_seed() -> int:
    """A new seed per call (reported in assertion messages so a failure can be replayed)."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


def cu_seqlens(lengths: list[int], device=DEVICE) -> torch.Tensor:
    """int32 [B+1] cumulative lengths."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def random_qk(seed: int, lens_q: list[int], lens_k: list[int], hq: int, hk: int, d: int,
              dtype=torch.float32, device=DEVICE):
    """q [Σ lens_q, hq, d], k [Σ lens_k, hk, d] (k scaled so softmaxes are peaked), cu_q, cu_k."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g)
    k = torch.randn(sum(lens_k), hk, d, generator=g) * 1.5
    return (q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype),
            cu_seqlens(lens_q, device), cu_seqlens(lens_k, device))


def coarse_regions(seed: int, lens_k: list[int], num_regions: int, *, sinks: int = 2,
                   unused: int = 1, device=DEVICE) -> torch.Tensor:
    """int32 key_region with few regions: random ids in [0, R − unused) (the last ``unused``
    regions stay empty), the first ``sinks`` keys of every sequence −1 (so early causal rows
    see no region key), and about a quarter of the other keys −1."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lens_k)
    region = torch.randint(0, max(1, num_regions - unused), (total,), generator=g, dtype=torch.int32)
    region[torch.rand(total, generator=g) < 0.25] = -1
    start = 0
    for n in lens_k:
        region[start:start + min(sinks, n)] = -1
        start += n
    return region.to(device)


def patch_regions(seed: int, lens_k: list[int], num_regions: int, *, device=DEVICE) -> torch.Tensor:
    """int32 key_region with one region per image token: in every sequence a run of consecutive
    keys after a few text keys gets consecutive region ids (raster order), the remaining keys
    are text (−1); a few ids are scattered out of order to exercise wide region spans."""
    g = torch.Generator().manual_seed(seed)
    region = torch.full((sum(lens_k),), -1, dtype=torch.int32)
    start, next_id = 0, 0
    for n in lens_k:
        first = min(3, n)
        count = min(n - first, num_regions - next_id, 24)
        region[start + first:start + first + count] = torch.arange(next_id, next_id + count,
                                                                    dtype=torch.int32)
        next_id = (next_id + count) % num_regions
        start += n
    scattered = torch.randint(0, region.numel(), (3,), generator=g) if region.numel() else []
    for pos in scattered:
        region[pos] = int(torch.randint(0, num_regions, (), generator=g))
    return region.to(device)


def run_segments(seed: int, lens_q: list[int], num_segments: int, *, device=DEVICE) -> torch.Tensor:
    """int32 query_segment made of contiguous runs (like responses or paragraphs) with some −1
    runs; segment ``num_segments − 1`` is never used (an empty segment)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lens_q)
    seg = torch.empty(total, dtype=torch.int32)
    pos = 0
    while pos < total:
        run = int(torch.randint(1, 12, (), generator=g))
        seg[pos:pos + run] = int(torch.randint(-1, num_segments - 1, (), generator=g))
        pos += run
    return seg.to(device)


def reference_lse(q: torch.Tensor, k: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  causal: bool, scale: float) -> torch.Tensor:
    """fp32 [Hq, total_q] natural-log normaliser of scale·q·k over each row's visible keys
    (−inf for rows without any), computed in fp64 as FlashAttention's softmax_lse would be."""
    hq, hk = q.shape[1], k.shape[1]
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float64)
    qd, kd = q.double().cpu(), k.double().cpu()
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        kr = kd[k0:k1].repeat_interleave(hq // hk, dim=1)                 # [lk, hq, d]
        s = torch.einsum("qhd,khd->hqk", qd[q0:q1], kr) * scale
        if causal:
            visible = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
            s = s.masked_fill(~visible, float("-inf"))
        lse[:, q0:q1] = torch.logsumexp(s, dim=-1)
    return lse.float().to(q.device)


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
