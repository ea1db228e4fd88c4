"""``cosine_alignment``: mean cosine of each query row to the selected keys of its sequence."""
from __future__ import annotations

import torch

from .. import _validation as V
from .._backend import resolve_backend
from ._dispatch import implementation_for

IMPLEMENTATIONS = {
    "torch": "kawhi_kernels.reference.cosine_alignment:cosine_alignment_reference",
    "triton": "kawhi_kernels.triton.cosine_alignment:cosine_alignment_triton",
    "cuda": "kawhi_kernels.cuda.cosine_alignment:cosine_alignment_cuda",
}


@torch.library.custom_op("kawhi::cosine_alignment", mutates_args=())
def _cosine_alignment_op(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    key_region: torch.Tensor, num_regions: int, heads: list[int], per_head: bool, backend: str,
) -> torch.Tensor:
    impl = implementation_for(IMPLEMENTATIONS, backend, q.dtype)
    return impl(q, k, cu_seqlens_q, cu_seqlens_k, key_region, num_regions, heads=heads,
                per_head=per_head)


@_cosine_alignment_op.register_fake
def _(q, k, cu_seqlens_q, cu_seqlens_k, key_region, num_regions, heads, per_head, backend):
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    shape = (q.shape[0], len(heads), num_regions) if per_head else (q.shape[0], num_regions)
    return q.new_empty(shape, dtype=dtype)


def cosine_alignment(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    key_region: torch.Tensor,
    num_regions: int = 1,
    *,
    heads=None,
    per_head: bool = False,
    check_finite: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean cosine similarity of every query row to the keys of each region of its own sequence.

    KAWHI's spatial alignment α_t is ``cosine_alignment(q_resp, k, ..., key_region=selected ? 0 : −1,
    heads=vision_critical_heads)[:, 0]``. Computed in factorised form (mean of unit keys per
    region, then one dot product per row and head), O((Nq + Nk)·H·D) for one region.

    Args:
        q: [total_q, Hq, D] fp16/bf16/fp32/fp64 query rows, packed; k: [total_k, Hk, D], Hq % Hk == 0.
        cu_seqlens_q, cu_seqlens_k: int32/int64 [B+1].
        key_region: int [total_k] in [0, num_regions) or −1 (key not selected).
        heads: optional subset of query heads (mean is over these).
        per_head: return per-head values instead of their mean.
    Returns:
        fp32 (fp64 for fp64 inputs) [total_q, R], or [total_q, len(heads), R] with ``per_head``;
        0 for a region without keys and for zero vectors. No causal masking (keys are image tokens).
    """
    hq, _, d = V.check_qk_pair(q, k)
    device = q.device
    V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], device=device)
    V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], device=device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_k: expected {cu_seqlens_q.numel()} entries (as cu_seqlens_q), "
                         f"got {cu_seqlens_k.numel()}")
    V.check_positive_int("num_regions", num_regions, allow_zero=True)
    V.check_ids("key_region", key_region, k.shape[0], num_regions, device=device)
    head_list = V.check_heads(heads, hq)
    if check_finite:
        V.check_finite("q", q)
        V.check_finite("k", k)
    resolved = resolve_backend(backend, device, "cosine_alignment", tuple(IMPLEMENTATIONS), head_dim=d)
    with torch.no_grad():
        return _cosine_alignment_op(q.detach(), k.detach(), cu_seqlens_q, cu_seqlens_k, key_region,
                                    num_regions, head_list, bool(per_head), resolved)
