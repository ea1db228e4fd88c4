"""Accuracy helpers of the benchmark: the error metric, fp32 log-sum-exp, and fp64 references on
a subsample of the problem (one sequence), computed once per shape in the same run."""
from __future__ import annotations

import torch

from ..reference.attention_mass import attention_mass_reference
from ..reference.cosine_alignment import cosine_alignment_reference
from .inputs import PackedInputs

# Error floor: elements whose reference magnitude is below this fraction of the largest one are
# compared against that floor instead of their own magnitude (tiny masses would otherwise turn
# bf16 rounding of ~1e-7 values into meaningless huge relative errors).
RELATIVE_FLOOR = 1e-3
# Per-row outputs are checked on the last rows of the first sequence (a suffix keeps the
# bottom-right causal alignment of the rows).
CHECK_ROWS = 128


def max_rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = RELATIVE_FLOOR) -> float:
    """max |out − ref| / max(|ref|, floor · max|ref|) over all elements, in float64.

    out, ref: same shape (any float dtype/device). Returns 0.0 for two empty tensors and the
    plain max abs error when ``ref`` is all zeros. NaN in ``out`` gives NaN.
    """
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"out: expected shape {tuple(ref.shape)} (as ref), got {tuple(out.shape)}")
    if ref.numel() == 0:
        return 0.0
    out = out.detach().to(ref.device, torch.float64)
    ref = ref.detach().to(torch.float64)
    diff = (out - ref).abs()
    scale = float(ref.abs().max())
    if scale == 0.0:
        return float(diff.max())
    return float((diff / ref.abs().clamp_min(floor * scale)).max())


def attention_lse(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, causal: bool, softmax_scale: float,
                  chunk_elements: int = 1 << 26) -> torch.Tensor:
    """Natural-log softmax normaliser of every row and head, as FlashAttention varlen returns it.

    q [total_q, Hq, D], k [total_k, Hk, D] (GQA: head h reads KV head h // (Hq/Hk)); causal is
    bottom-right aligned per sequence. Computed in fp32 in row chunks. Returns fp32 [Hq, total_q]
    (−inf for a row without a visible key).
    """
    hq, hk = q.shape[1], k.shape[1]
    group = hq // hk
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        step = max(1, chunk_elements // (lk * hq))
        key_pos = torch.arange(lk, device=q.device)
        for r0 in range(0, lq, step):
            r1 = min(lq, r0 + step)
            qc = q[q0 + r0:q0 + r1].float().view(r1 - r0, hk, group, -1)           # [n, Hk, g, D]
            scores = torch.einsum("nkgd,mkd->kgnm", qc, k[k0:k1].float()) * softmax_scale
            if causal:
                rows = torch.arange(r0, r1, device=q.device)
                visible = key_pos[None, :] <= rows[:, None] + (lk - lq)
                scores = scores.masked_fill(~visible, float("-inf"))
            lse[:, q0 + r0:q0 + r1] = torch.logsumexp(scores, dim=-1).reshape(hq, r1 - r0)
    return lse


def attention_reference_subsample(inputs: PackedInputs) -> tuple[torch.Tensor, slice]:
    """fp64 ``attention_mass`` of copy 0 on the first sequence, and which output rows it covers.

    Per-row output: the last ``CHECK_ROWS`` rows of sequence 0 (all keys). Segment output: all
    rows of sequence 0, i.e. the segments 0 … M−1 it owns. Returns (fp64 reference, slice of the
    op's output rows to compare with it).
    """
    q, k = inputs.qs[0], inputs.ks[0]
    lq, lk = inputs.rows_per_seq, inputs.keys_per_seq
    device = q.device
    region = inputs.key_region[:lk]
    if inputs.query_segment is None:
        n = min(lq, CHECK_ROWS)
        rows = slice(lq - n, lq)
        ref = attention_mass_reference(
            q[rows].double(), k[:lk].double(), torch.tensor([0, n], device=device),
            torch.tensor([0, lk], device=device), region, inputs.num_regions,
            causal=inputs.causal, softmax_scale=inputs.softmax_scale)
        return ref, rows
    segment = inputs.query_segment[:lq]
    num = int(segment.max()) + 1
    ref = attention_mass_reference(
        q[:lq].double(), k[:lk].double(), torch.tensor([0, lq], device=device),
        torch.tensor([0, lk], device=device), region, inputs.num_regions, query_segment=segment,
        num_segments=num, causal=inputs.causal, softmax_scale=inputs.softmax_scale)
    return ref, slice(0, num)


def cosine_reference(inputs: PackedInputs, heads: list[int]) -> torch.Tensor:
    """fp64 ``cosine_alignment`` (mean over ``heads``) of copy 0, all rows: [total_q, R]."""
    return cosine_alignment_reference(inputs.qs[0].double(), inputs.ks[0].double(), inputs.cu_seqlens_q,
                                      inputs.cu_seqlens_k, inputs.key_region, inputs.num_regions,
                                      heads=heads)
