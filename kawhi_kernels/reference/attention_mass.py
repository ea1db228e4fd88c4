"""PyTorch reference for ``attention_mass`` and the naive materialising baseline.

The reference is the oracle every other backend is tested against. It processes one sequence at
a time and, inside a sequence, blocks of query rows, so the extra memory is bounded by
``chunk_rows × Lk × heads-per-KV-group`` scores instead of ``total_q × total_k``. It never repeats
K for GQA: query heads are grouped by the KV head they read.

Math (per sequence, per selected query head h reading KV head h // (Hq / Hk)):
    s_ij = scale · q_i · k_j           for keys j visible to row i
    p_ij = exp(s_ij − lse_i)           lse_i = logsumexp_j s_ij (or the given ``lse``)
    out[seg(i), h, region(j)] += p_ij  for region(j) ≥ 0 and seg(i) ≥ 0
Causal masking is bottom-right aligned: row i of a sequence with Lq rows and Lk keys sees keys
j ≤ i + Lk − Lq. A row with no visible key contributes nothing.
"""
from __future__ import annotations

import math

import torch

# Scores held at once by the reference: rows_per_chunk × Lk × group ≤ this many elements.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs are computed (and returned) in fp64; everything else in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kv_groups(heads: list[int], group_size: int) -> list[tuple[int, list[int], list[int]]]:
    """Group selected query heads by KV head: [(kv_head, query_heads, output_slots)]."""
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for slot, h in enumerate(heads):
        qh, slots = groups.setdefault(h // group_size, ([], []))
        qh.append(h)
        slots.append(slot)
    return [(kv, qh, slots) for kv, (qh, slots) in sorted(groups.items())]


def _row_chunks(num_rows: int, num_keys: int, group: int, chunk_elements: int):
    rows = max(1, chunk_elements // max(1, num_keys * group))
    for start in range(0, num_rows, rows):
        yield start, min(num_rows, start + rows)


def attention_mass_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    key_region: torch.Tensor,
    num_regions: int,
    *,
    query_segment: torch.Tensor | None = None,
    num_segments: int | None = None,
    heads: list[int] | None = None,
    lse: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Chunked PyTorch reference of ``attention_mass`` (inputs assumed validated).

    q [total_q, Hq, D], k [total_k, Hk, D] (fp16/bf16/fp32/fp64); cu_seqlens_* int [B+1];
    key_region int [total_k] in [0, R) or −1; query_segment int [total_q] in [0, S) or −1;
    heads: list of query-head indices (default all); lse fp32 [Hq, total_q].
    Returns fp32 (fp64 for fp64 inputs) [S or total_q, len(heads), R].
    """
    hq, hk, d = q.shape[1], k.shape[1], q.shape[2]
    group_size = hq // hk
    heads = list(range(hq)) if heads is None else list(heads)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    cdtype = compute_dtype_for(q.dtype)
    num_out_rows = q.shape[0] if query_segment is None else num_segments
    out = torch.zeros(num_out_rows, len(heads), num_regions, dtype=cdtype, device=q.device)
    if num_regions == 0 or num_out_rows == 0:
        return out

    cu_q = cu_seqlens_q.tolist()
    cu_k = cu_seqlens_k.tolist()
    key_region = key_region.to(torch.int64)
    segment = None if query_segment is None else query_segment.to(torch.int64)
    groups = _kv_groups(heads, group_size)

    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        regions = key_region[k0:k1]
        region_keys = (regions >= 0).nonzero().squeeze(1)
        if region_keys.numel() == 0:
            continue
        region_ids = regions[region_keys]
        k_seq = k[k0:k1].to(cdtype)
        key_pos = torch.arange(lk, device=q.device)
        for r0, r1 in _row_chunks(lq, lk, group_size, chunk_elements):
            rows = torch.arange(r0, r1, device=q.device)
            visible = key_pos[None, :] <= (rows[:, None] + (lk - lq)) if causal else None
            for kv, qheads, slots in groups:
                qc = q[q0 + r0:q0 + r1, qheads].to(cdtype)                     # [n, g, D]
                scores = torch.einsum("ngd,kd->gnk", qc, k_seq[:, kv]) * scale  # [g, n, Lk]
                if visible is not None:
                    scores = scores.masked_fill(~visible, float("-inf"))
                if lse is None:
                    row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
                else:
                    row_lse = lse[qheads, q0 + r0:q0 + r1].to(cdtype).unsqueeze(-1)
                # A non-finite normaliser (a row with no visible key: -inf here, ±inf from
                # FlashAttention) gives 0. p ≤ 1 for a true normaliser; the cap defines an
                # underestimated lse the same way on every backend.
                finite = torch.isfinite(row_lse)
                row_lse = torch.where(finite, row_lse, torch.zeros_like(row_lse))
                probs = torch.exp(scores[..., region_keys] - row_lse).clamp_(max=1.0)
                probs = torch.where(finite, probs, torch.zeros_like(probs))      # [g, n, Kr]
                per_row = torch.zeros(len(qheads), r1 - r0, num_regions, dtype=cdtype, device=q.device)
                per_row.index_add_(2, region_ids, probs)
                per_row = per_row.transpose(0, 1)                                 # [n, g, R]
                slot_index = torch.tensor(slots, device=q.device)[None, :]
                if segment is None:
                    out_rows = rows + q0
                else:
                    out_rows = segment[q0 + r0:q0 + r1]
                    keep = out_rows >= 0
                    out_rows, per_row = out_rows[keep], per_row[keep]
                out.index_put_((out_rows[:, None], slot_index), per_row, accumulate=True)
    return out


def attention_mass_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    key_region: torch.Tensor,
    num_regions: int,
    *,
    query_segment: torch.Tensor | None = None,
    num_segments: int | None = None,
    heads: list[int] | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Benchmark baseline: what users write today. Repeats K for GQA, materialises the full
    softmax(QKᵀ) of each sequence in fp32, then reduces it with a dense key→region indicator.

    Same shapes and result as :func:`attention_mass_reference`; memory O(Hq · Lq · Lk) per sequence.
    """
    hq, hk, d = q.shape[1], k.shape[1], q.shape[2]
    heads = list(range(hq)) if heads is None else list(heads)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    cdtype = compute_dtype_for(q.dtype)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    per_row_out = torch.zeros(q.shape[0], len(heads), num_regions, dtype=cdtype, device=q.device)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        k_rep = k[k0:k1].repeat_interleave(hq // hk, dim=1)[:, heads].to(cdtype)  # [Lk, H, D]
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1, heads].to(cdtype), k_rep) * scale
        if causal:
            visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            scores = scores.masked_fill(~visible, float("-inf"))
        attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)                          # [H, Lq, Lk]
        regions = key_region[k0:k1].to(torch.int64)
        indicator = torch.zeros(lk, num_regions, dtype=cdtype, device=q.device)
        keep = regions >= 0
        indicator[keep.nonzero().squeeze(1), regions[keep]] = 1.0
        per_row_out[q0:q1] = (attn @ indicator).transpose(0, 1)
    if query_segment is None:
        return per_row_out
    out = torch.zeros(num_segments, len(heads), num_regions, dtype=cdtype, device=q.device)
    keep = query_segment >= 0
    out.index_add_(0, query_segment[keep].to(torch.int64), per_row_out[keep])
    return out
