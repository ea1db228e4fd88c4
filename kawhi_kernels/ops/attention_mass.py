"""``attention_mass``: softmax probability mass that query rows put on key regions.

Public entry point: validation, backend choice, and the ``kawhi::attention_mass`` custom op
(with a fake kernel, so it traces under ``torch.compile``). Never records autograd history.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _validation as V
from .._backend import resolve_backend, triton_mass_head_dim_limit
from ._dispatch import implementation_for

IMPLEMENTATIONS = {
    "torch": "kawhi_kernels.reference.attention_mass:attention_mass_reference",
    "triton": "kawhi_kernels.triton.attention_mass:attention_mass_triton",
    "cuda": "kawhi_kernels.cuda.attention_mass:attention_mass_cuda",
}


@torch.library.custom_op("kawhi::attention_mass", mutates_args=())
def _attention_mass_op(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    key_region: torch.Tensor, num_regions: int, query_segment: Optional[torch.Tensor],
    num_segments: int, heads: list[int], lse: Optional[torch.Tensor], causal: bool,
    softmax_scale: float, deterministic: bool, backend: str,
) -> torch.Tensor:
    impl = implementation_for(IMPLEMENTATIONS, backend, q.dtype)
    kwargs = dict(query_segment=query_segment, num_segments=num_segments, heads=heads, lse=lse,
                  causal=causal, softmax_scale=softmax_scale)
    if backend != "torch" and q.dtype != torch.float64:
        kwargs["deterministic"] = deterministic
    return impl(q, k, cu_seqlens_q, cu_seqlens_k, key_region, num_regions, **kwargs)


@_attention_mass_op.register_fake
def _(q, k, cu_seqlens_q, cu_seqlens_k, key_region, num_regions, query_segment, num_segments,
      heads, lse, causal, softmax_scale, deterministic, backend):
    rows = q.shape[0] if query_segment is None else num_segments
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((rows, len(heads), num_regions), dtype=dtype)


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    key_region: torch.Tensor,
    num_regions: int,
    *,
    query_segment: torch.Tensor | None = None,
    num_segments: int | None = None,
    heads=None,
    lse: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    check_finite: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention probability mass from query rows onto key regions, without an attention map.

    Args:
        q: [total_q, Hq, D] fp16/bf16/fp32/fp64, the query rows of interest (post-RoPE), packed.
        k: [total_k, Hk, D] same dtype/device, Hq % Hk == 0 (GQA: head h reads KV head
            h // (Hq / Hk); K is never repeated).
        cu_seqlens_q, cu_seqlens_k: int32/int64 [B+1] cumulative lengths of the B sequences.
        key_region: int32/int64 [total_k], region id in [0, num_regions) or −1 (key stays in the
            softmax denominator but counts in no region).
        num_regions: R ≥ 0.
        query_segment: optional int [total_q] in [0, num_segments) or −1 (row ignored); rows of a
            segment are summed. Requires ``num_segments``.
        heads: optional subset of query-head indices (list or 1-D int tensor), output order.
        lse: optional fp32 [Hq, total_q] natural-log softmax normaliser of scale·q·k over each
            row's visible keys (FlashAttention varlen's ``softmax_lse``); skips the normaliser pass.
            A non-finite entry marks a row without visible keys (its output is 0).
        causal: bottom-right aligned per sequence: row i sees keys j ≤ i + Lk − Lq.
        softmax_scale: default 1/√D.
        deterministic: bit-reproducible accumulation order (fused backends).
        check_finite: raise if q, k or lse hold NaN/Inf.
        backend: "auto" | "torch" | "triton" | "cuda".

    Returns:
        fp32 (fp64 for fp64 inputs) [num_segments or total_q, len(heads) or Hq, num_regions].
        A row without a visible key, an empty segment or an empty region gives 0.
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
    if (query_segment is None) != (num_segments is None):
        raise ValueError("query_segment/num_segments: pass both or neither")
    if query_segment is not None:
        V.check_positive_int("num_segments", num_segments, allow_zero=True)
        V.check_ids("query_segment", query_segment, q.shape[0], num_segments, device=device)
    head_list = V.check_heads(heads, hq)
    if lse is not None:
        V.check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,), device=device)
        if tuple(lse.shape) != (hq, q.shape[0]):
            raise ValueError(f"lse: expected shape {(hq, q.shape[0])} = [Hq, total_q], got {tuple(lse.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    elif not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale: expected a positive finite float, got {softmax_scale!r}")
    if check_finite:
        V.check_finite("q", q)
        V.check_finite("k", k)
        if lse is not None:
            # ±inf is legitimate for rows with no visible key (FlashAttention writes +inf, its
            # split-KV path -inf); such rows get 0. NaN is not.
            if bool(torch.isnan(lse).any()):
                raise ValueError("lse: contains NaN values")
    resolved = resolve_backend(backend, device, "attention_mass", tuple(IMPLEMENTATIONS), head_dim=d,
                               triton_head_dim=triton_mass_head_dim_limit(q.dtype))
    with torch.no_grad():
        return _attention_mass_op(
            q.detach(), k.detach(), cu_seqlens_q, cu_seqlens_k, key_region, num_regions,
            query_segment, 0 if num_segments is None else num_segments, head_list,
            None if lse is None else lse.detach(), causal, float(softmax_scale),
            bool(deterministic), resolved,
        )


def attention_mass_naive(q, k, cu_seqlens_q, cu_seqlens_k, key_region, num_regions, **kwargs):
    """The materialising baseline (softmax(QKᵀ) per sequence), same contract, for benchmarks."""
    from ..reference.attention_mass import attention_mass_naive as naive

    with torch.no_grad():
        return naive(q, k, cu_seqlens_q, cu_seqlens_k, key_region, num_regions, **kwargs)
