"""CUDA ``cosine_alignment`` (hand-written kernels in csrc/cosine_alignment.cu), thin wrapper.

Two kernels without atomics (bit-reproducible): the mean unit key of every (sequence, region,
KV head) into an fp32 workspace [B, R, Hk, D], then one warp per query row taking the unit
query's dot product with its heads' mean keys (per head, or averaged over heads in-kernel).
The public op sends fp64 inputs to the torch reference.
"""
from __future__ import annotations

import torch

from .._backend import check_head_dim
from .._fused_host import last_dim_contiguous
from ._launch import device_index, dtype_code, extension_for, int32_on, ptr, stream_handle


def cosine_alignment_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    key_region: torch.Tensor,
    num_regions: int = 1,
    *,
    heads: list[int] | None = None,
    per_head: bool = False,
) -> torch.Tensor:
    """CUDA ``cosine_alignment`` (inputs validated by :func:`kawhi_kernels.ops.cosine_alignment`).

    Args:
        q: [total_q, Hq, D] fp16/bf16/fp32 CUDA tensor D ≤ 256.
        k: [total_k, Hk, D] same dtype and device, Hq % Hk == 0.
        cu_seqlens_q, cu_seqlens_k: int32/int64 [B+1].
        key_region: int32/int64 [total_k] in [0, R) or −1 (key not selected).
        num_regions: R.
        heads: selected query heads (default all); the mean is over these.
        per_head: return per-head values instead of their mean.

    Returns:
        fp32 [total_q, R], or [total_q, len(heads), R] with ``per_head``;
        0 for a region without keys and for zero vectors.
    """
    hq, hk, d = q.shape[1], k.shape[1], q.shape[2]
    heads = list(range(hq)) if heads is None else list(heads)
    device = q.device
    ext = extension_for(device, "cosine_alignment")
    check_head_dim("q", d, "CUDA")
    code = dtype_code(ext, "q", q.dtype)
    shape = (q.shape[0], len(heads), num_regions) if per_head else (q.shape[0], num_regions)
    if q.shape[0] == 0 or num_regions == 0:
        return torch.zeros(shape, dtype=torch.float32, device=device)

    q = last_dim_contiguous(q)
    k = last_dim_contiguous(k)
    num_seqs = cu_seqlens_q.numel() - 1
    out = torch.empty(shape, dtype=torch.float32, device=device)
    kbar = torch.empty(num_seqs, num_regions, hk, d, dtype=torch.float32, device=device)
    keep = [int32_on(cu_seqlens_q, device), int32_on(cu_seqlens_k, device),
            int32_on(key_region, device), torch.tensor(heads, dtype=torch.int32, device=device)]
    cu_q, cu_k, region, head_tab = keep
    a = ext.CosineAlignmentArgs()
    a.q, a.k, a.dtype = ptr(q), ptr(k), code
    a.total_q, a.total_k, a.hq, a.hk, a.head_dim = q.shape[0], k.shape[0], hq, hk, d
    a.q_stride_t, a.q_stride_h = q.stride(0), q.stride(1)
    a.k_stride_t, a.k_stride_h = k.stride(0), k.stride(1)
    a.cu_seqlens_q, a.cu_seqlens_k, a.num_seqs = ptr(cu_q), ptr(cu_k), num_seqs
    a.key_region, a.num_regions = ptr(region), num_regions
    a.heads, a.num_heads, a.per_head = ptr(head_tab), len(heads), bool(per_head)
    a.kbar, a.out = ptr(kbar), ptr(out)
    a.stream, a.device = stream_handle(device), device_index(device)
    ext.cosine_alignment(a)
    del keep, kbar  # stream-ordered reuse only (see attention_mass_cuda)
    return out
