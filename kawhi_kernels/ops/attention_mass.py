"""``attention_mass``: softmax probability mass that query rows put on key regions.

Public entry point: validation, backend choice, and the ``kawhi::attention_mass`` custom op
(with a fake kernel, so it traces under ``torch.compile``). Never records autograd history.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from .._backend import BACKENDS
from .plan import MASS_IMPLEMENTATIONS as IMPLEMENTATIONS  # noqa: F401  (the benchmark suite reads it)
from .plan import AttentionMassPlan, check_layout_structure


@torch.library.custom_op("kawhi::attention_mass", mutates_args=())
def _attention_mass_op(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    key_region: torch.Tensor, num_regions: int, query_segment: Optional[torch.Tensor],
    num_segments: int, heads: list[int], lse: Optional[torch.Tensor], causal: bool,
    softmax_scale: float, deterministic: bool, check_finite: bool, backend: str,
) -> torch.Tensor:
    # Runs eagerly even under torch.compile (custom ops are opaque to the compiler): the plan's
    # value checks and backend choice always happen here, before any kernel sees the data.
    plan = AttentionMassPlan(
        cu_seqlens_q, cu_seqlens_k, key_region, num_regions, num_heads=q.shape[1],
        num_kv_heads=k.shape[1], head_dim=q.shape[2], dtype=q.dtype,
        query_segment=query_segment, num_segments=None if query_segment is None else num_segments,
        heads=heads, causal=causal, softmax_scale=softmax_scale, deterministic=deterministic,
        backend=backend, total_q=q.shape[0])
    return plan.run(q, k, lse, check_finite=check_finite)


@_attention_mass_op.register_fake
def _(q, k, cu_seqlens_q, cu_seqlens_k, key_region, num_regions, query_segment, num_segments,
      heads, lse, causal, softmax_scale, deterministic, check_finite, backend):
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
            A non-finite entry gives 0 for its row (FlashAttention writes ±inf for a row without
            visible keys); probabilities exp(s − lse) are capped at 1, which only an
            underestimated lse exceeds — the same on every backend.
        causal: bottom-right aligned per sequence: row i sees keys j ≤ i + Lk − Lq.
        softmax_scale: default 1/√D.
        deterministic: bit-reproducible accumulation order (fused backends).
        check_finite: raise if q or k hold NaN/Inf, lse holds NaN, or lse is ±inf on a row that
            sees keys.
        backend: "auto" | "torch" | "triton" | "cuda".

    Returns:
        fp32 (fp64 for fp64 inputs) [num_segments or total_q, len(heads) or Hq, num_regions].
        A row without a visible key, an empty segment or an empty region gives 0.

    Builds an :class:`kawhi_kernels.AttentionMassPlan` and runs it once; to run the same layout
    for several layers, build the plan yourself and call ``plan.run(q, k)`` per layer.
    """
    # Shapes, dtypes and devices here (traceable); values in the plan, inside the custom op.
    hq, _, d = V.check_qk_pair(q, k)
    device = q.device
    check_layout_structure(cu_seqlens_q, cu_seqlens_k, key_region, num_regions, query_segment,
                           num_segments, device=device)
    if key_region.numel() != k.shape[0]:
        raise ValueError(f"key_region: expected {k.shape[0]} entries, got {key_region.numel()}")
    if query_segment is not None:
        if query_segment.numel() != q.shape[0]:
            raise ValueError(f"query_segment: expected {q.shape[0]} entries, got {query_segment.numel()}")
    head_list = V.check_heads(heads, hq)
    if lse is not None:
        V.check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,), device=device)
        if tuple(lse.shape) != (hq, q.shape[0]):
            raise ValueError(f"lse: expected shape {(hq, q.shape[0])} = [Hq, total_q], got {tuple(lse.shape)}")
    V.check_bool("causal", causal)
    V.check_bool("deterministic", deterministic)
    V.check_bool("check_finite", check_finite)
    softmax_scale = V.check_softmax_scale(softmax_scale, d)
    V.check_backend(backend, BACKENDS)
    with torch.no_grad():
        return _attention_mass_op(
            q.detach(), k.detach(), cu_seqlens_q, cu_seqlens_k, key_region, num_regions,
            query_segment, 0 if num_segments is None else num_segments, head_list,
            None if lse is None else lse.detach(), causal, float(softmax_scale),
            deterministic, check_finite, backend,
        )


def attention_mass_naive(q, k, cu_seqlens_q, cu_seqlens_k, key_region, num_regions, **kwargs):
    """The materialising baseline (softmax(QKᵀ) per sequence), same contract, for benchmarks."""
    from ..reference.attention_mass import attention_mass_naive as naive

    with torch.no_grad():
        return naive(q, k, cu_seqlens_q, cu_seqlens_k, key_region, num_regions, **kwargs)
