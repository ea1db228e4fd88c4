"""The softmax normaliser (lse) as SDPA's own flash kernel returns it, in the layout and units
``attention_mass(lse=...)`` expects.

``torch.ops.aten._scaled_dot_product_flash_attention`` (CUDA) and its CPU twin
``_scaled_dot_product_flash_attention_for_cpu`` return a ``logsumexp`` of shape [B, H, L] (fp32)
next to the output. ``attention_mass`` wants fp32 [Hq, total_q] in natural log over each query
row's visible keys. The kernels are run on the *full* causal sequence (every token a query, as in
the model's own forward), so there is no question of how a causal mask aligns when Lq ≠ Lk; the
response rows are then sliced out. Units are checked, not assumed (:func:`lse_units`): FlashAttention
2 documents a natural-log ``softmax_lse``, but some kernels keep a base-2 running max internally.
"""
from __future__ import annotations

import torch

# Shared with the capture, which reads the same ops' lse during the model's forward.
from ..integrations.attention_lse import LN2, lse_units, to_natural_log  # noqa: F401


def _flash_logsumexp(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """logsumexp [1, H, L] of one dense [1, H, L, D] problem from SDPA's flash kernel."""
    v = k  # any value works: only the normaliser is kept
    if q.is_cuda:
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal=causal, return_debug_mask=False, scale=scale)
    else:
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal=causal, scale=scale)
    return out[1]


def sdpa_flash_lse(q_full: torch.Tensor, k_full: torch.Tensor, cu_seqlens: torch.Tensor,
                   rows_per_seq: list[int], *, softmax_scale: float, causal: bool = True
                   ) -> torch.Tensor:
    """lse of the last ``rows_per_seq[b]`` tokens of each packed sequence, from SDPA's flash path.

    q_full: [total, Hq, D] every token's query (fp16/bf16 on CUDA; the CPU kernel takes fp32 too);
    k_full: [total, Hk, D] (K is repeated to Hq heads for the kernel: it wants equal head counts);
    cu_seqlens: int [B+1] of the full sequences; rows_per_seq: response rows per sequence (each
    ≤ its length). Returns fp32 [Hq, sum(rows_per_seq)] in the units the kernel wrote (see
    :func:`lse_units` / :func:`to_natural_log`), rows in packed order.
    """
    hq, hk = q_full.shape[1], k_full.shape[1]
    if hq % hk:
        raise ValueError(f"k_full: Hq={hq} must be a multiple of Hk={hk}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    if len(rows_per_seq) != len(cu) - 1:
        raise ValueError(f"rows_per_seq: expected {len(cu) - 1} entries, got {len(rows_per_seq)}")
    parts = []
    for b, rows in enumerate(rows_per_seq):
        s0, s1 = cu[b], cu[b + 1]
        if not 0 <= rows <= s1 - s0:
            raise ValueError(f"rows_per_seq[{b}]={rows}: expected 0 … {s1 - s0}")
        if rows == 0:
            continue
        q = q_full[s0:s1].transpose(0, 1).unsqueeze(0)                               # [1, Hq, L, D]
        k = k_full[s0:s1].repeat_interleave(hq // hk, dim=1).transpose(0, 1).unsqueeze(0)
        lse = _flash_logsumexp(q.contiguous(), k.contiguous(), softmax_scale, causal)  # [1, Hq, L]
        length = s1 - s0                     # the kernel may pad its lse past L: index from L
        parts.append(lse[0, :, length - rows:length].float())
    if not parts:
        return q_full.new_zeros((hq, 0), dtype=torch.float32)
    return torch.cat(parts, dim=1).contiguous()
