"""``cosine_alignment``: mean cosine of each query row to the selected keys of its sequence."""
from __future__ import annotations

import torch

from .. import _validation as V
from .._backend import BACKENDS
from .plan import COSINE_IMPLEMENTATIONS as IMPLEMENTATIONS  # noqa: F401  (the benchmark suite reads it)
from .plan import CosineAlignmentPlan, check_layout_structure


@torch.library.custom_op("kawhi::cosine_alignment", mutates_args=())
def _cosine_alignment_op(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    key_region: torch.Tensor, num_regions: int, heads: list[int], per_head: bool,
    check_finite: bool, backend: str,
) -> torch.Tensor:
    # Eager even under torch.compile: value checks and backend choice happen in the plan.
    plan = CosineAlignmentPlan(cu_seqlens_q, cu_seqlens_k, key_region, num_regions,
                               num_heads=q.shape[1], num_kv_heads=k.shape[1], head_dim=q.shape[2],
                               dtype=q.dtype, heads=heads, per_head=per_head, backend=backend,
                               total_q=q.shape[0])
    return plan.run(q, k, check_finite=check_finite)


@_cosine_alignment_op.register_fake
def _(q, k, cu_seqlens_q, cu_seqlens_k, key_region, num_regions, heads, per_head, check_finite,
      backend):
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
    # Shapes, dtypes and devices here (traceable); values in the plan, inside the custom op.
    hq, _, d = V.check_qk_pair(q, k)
    device = q.device
    check_layout_structure(cu_seqlens_q, cu_seqlens_k, key_region, num_regions, device=device)
    if key_region.numel() != k.shape[0]:
        raise ValueError(f"key_region: expected {k.shape[0]} entries, got {key_region.numel()}")
    head_list = V.check_heads(heads, hq)
    V.check_bool("per_head", per_head)
    V.check_bool("check_finite", check_finite)
    V.check_backend(backend, BACKENDS)
    with torch.no_grad():
        return _cosine_alignment_op(q.detach(), k.detach(), cu_seqlens_q, cu_seqlens_k, key_region,
                                    num_regions, head_list, per_head, check_finite, backend)
