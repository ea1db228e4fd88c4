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
from ._launch import (device_index, dtype_code, extension_for, int32_on, make_args, ptr,
                      stream_handle)


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
    a = make_args(
        ext, "cosine_alignment", q=ptr(q), k=ptr(k), dtype=code, total_q=q.shape[0],
        total_k=k.shape[0], hq=hq, hk=hk, head_dim=d, q_stride_t=q.stride(0),
        q_stride_h=q.stride(1), k_stride_t=k.stride(0), k_stride_h=k.stride(1),
        cu_seqlens_q=ptr(cu_q), cu_seqlens_k=ptr(cu_k), num_seqs=num_seqs,
        key_region=ptr(region), num_regions=num_regions, heads=ptr(head_tab),
        num_heads=len(heads), per_head=bool(per_head), kbar=ptr(kbar), out=ptr(out),
        stream=stream_handle(device), device=device_index(device))
    ext.cosine_alignment(a)
    del keep, kbar  # stream-ordered reuse only (see attention_mass_cuda)
    return out
