"""PyTorch reference for ``cosine_alignment`` (factorised mean cosine).

For query row i of sequence b, head h (reading KV head h // (Hq / Hk)) and region r:
    out[i, h, r] = mean over keys j of sequence b with region(j) = r of cos(q_i^h, k_j^kv(h))
                 = q̂_i^h · k̄_{b, kv(h), r},   k̄ = mean of unit keys
so the cost is O((Nq + Nk) · H · D) per region instead of O(Nq · Nk · H · D). A zero vector has
cosine 0 with everything; a region without keys gives 0.
"""
from __future__ import annotations

import torch

from .attention_mass import compute_dtype_for


def unit_vectors(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / ‖x‖ along the last dim in ``dtype``; zero vectors stay zero."""
    x = x.to(dtype)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(x))


def region_mean_unit_keys(
    k: torch.Tensor, cu_seqlens_k: torch.Tensor, key_region: torch.Tensor, num_regions: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """k̄ [B, R, Hk, D]: mean unit key of every (sequence, region); zeros where a region is empty."""
    num_seqs = cu_seqlens_k.numel() - 1
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int64)
    seq_of_key = torch.repeat_interleave(torch.arange(num_seqs, device=k.device), lengths)
    keep = key_region >= 0
    flat = seq_of_key[keep] * num_regions + key_region[keep].to(torch.int64)
    sums = torch.zeros(num_seqs * num_regions, k.shape[1], k.shape[2], dtype=dtype, device=k.device)
    sums.index_add_(0, flat, unit_vectors(k[keep], dtype))
    counts = torch.zeros(num_seqs * num_regions, dtype=dtype, device=k.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=dtype))
    means = sums / counts.clamp_min(1.0)[:, None, None]
    return means.view(num_seqs, num_regions, k.shape[1], k.shape[2])


def cosine_alignment_reference(
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
    """Reference ``cosine_alignment`` (inputs assumed validated).

    q [total_q, Hq, D], k [total_k, Hk, D]; key_region int [total_k] in [0, R) or −1.
    Returns fp32 (fp64 for fp64 inputs) [total_q, R], or [total_q, len(heads), R] if ``per_head``.
    """
    hq, hk = q.shape[1], k.shape[1]
    heads = list(range(hq)) if heads is None else list(heads)
    cdtype = compute_dtype_for(q.dtype)
    head_index = torch.tensor(heads, device=q.device, dtype=torch.int64)
    kbar = region_mean_unit_keys(k, cu_seqlens_k, key_region, num_regions, cdtype)
    kbar = kbar[:, :, head_index // (hq // hk)]                             # [B, R, H, D]
    out = torch.zeros(q.shape[0], len(heads), num_regions, dtype=cdtype, device=q.device)
    cu_q = cu_seqlens_q.tolist()
    for b in range(len(cu_q) - 1):
        q0, q1 = cu_q[b], cu_q[b + 1]
        if q1 > q0:
            qhat = unit_vectors(q[q0:q1, heads], cdtype)                     # [n, H, D]
            out[q0:q1] = torch.einsum("nhd,rhd->nhr", qhat, kbar[b])
    return out if per_head else out.mean(dim=1)
