"""KAWHI paragraph weights (DESIGN.md section 1, step 4; paper Eq. 15).

For every response b with paragraphs j = 0 … M_b−1 (paragraph ids are local to the response):

    ᾱ_j = mean of α_t over the tokens t of paragraph j
    w̃_j = (1 − λ)·softmax_j(ᾱ / τ) + λ / M_b
    w_j = w_min + (w_max − w_min)·w̃_j            ∈ [w_min, w_max]

and every token of paragraph j gets w_j. Tokens with paragraph id −1 ("no paragraph") and every
token of a response with no paragraph (M_b = 0) get 1.0, i.e. plain GRPO. A paragraph id that no
token of the response carries (ids may skip values) does not exist: it is not counted in M_b.

Literal weights average w_min + (w_max − w_min)/M_b over paragraphs (0.1 + 0.9/M with the defaults),
so advantages shrink with the paragraph count. ``rescale="mean"`` (not in the paper) divides each
response's paragraph-token weights by their token mean so that this mean is exactly 1; the weights
may then leave [w_min, w_max]; tokens with id −1 keep 1.0.

Fully vectorised, no loop over tokens or responses: every (response, id) pair gets one global
slot (a dense table, or ``torch.unique`` of response·stride + id when ids are large and sparse),
per-paragraph and per-response reductions are ``index_add_`` / ``scatter_reduce_`` calls, and the
softmax subtracts the per-response maximum. One host sync (the id range) besides validation.
"""
from __future__ import annotations

import math

import torch

from .._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_cu_seqlens,
    check_finite,
    check_ids,
    check_real,
    check_tensor,
)

RESCALE_MODES = (None, "mean")
_MAX_ID = 2**31 - 1  # paragraph ids must fit in int32
# A dense (response, id) slot table is used while it has at most this many slots per token (or
# DENSE_SLOTS_MIN slots); beyond, slots are the distinct keys found by a sort (torch.unique).
DENSE_SLOTS_PER_TOKEN = 4
DENSE_SLOTS_MIN = 1 << 16


def _check_same_length(alpha: torch.Tensor, paragraph_ids) -> None:
    """paragraph_ids must be an int32/int64 [T] tensor on alpha's device with T = len(alpha);
    checked before cu_seqlens so that a mismatch names the two arguments that disagree."""
    check_tensor("paragraph_ids", paragraph_ids, ndim=1, dtypes=INDEX_DTYPES, device=alpha.device)
    if paragraph_ids.shape[0] != alpha.shape[0]:
        raise ValueError(f"paragraph_ids: expected one id per token of alpha (len(alpha) = "
                         f"{alpha.shape[0]}), got len(paragraph_ids) = {paragraph_ids.shape[0]}")


def paragraph_weights(
    alpha: torch.Tensor,
    paragraph_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    tau: float = 0.05,
    lam: float = 0.1,
    w_min: float = 0.1,
    w_max: float = 1.0,
    rescale: str | None = None,
) -> torch.Tensor:
    """Per-token KAWHI paragraph weights for a packed batch of responses.

    Args:
        alpha: float16/bfloat16/float32/float64 [T], spatial-alignment score of every response
            token, packed over B responses; must be finite.
        paragraph_ids: int32/int64 [T], local paragraph index of each token (0 … M_b−1) or −1 for
            "no paragraph" (e.g. from ``paragraph_ids_batch``); same device as ``alpha``.
        cu_seqlens: int32/int64 [B+1], cumulative response lengths (0, …, T); same device.
        tau: softmax temperature τ > 0 (the paper does not give it; default 0.05).
        lam: uniform-mixing weight λ ∈ [0, 1] (not given in the paper; default 0.1).
        w_min, w_max: weight range, 0 ≤ w_min ≤ w_max (paper: 0.1, 1.0).
        rescale: None (paper's literal formula) or "mean" (token mean of each response's
            paragraph-token weights scaled to 1; requires w_max > 0).
    Returns:
        float32 [T] (float64 if ``alpha`` is float64) on ``alpha``'s device.
    Raises:
        TypeError / ValueError naming the offending argument.
    """
    check_tensor("alpha", alpha, ndim=1, dtypes=FLOAT_DTYPES)
    device = alpha.device
    total = alpha.shape[0]
    _check_same_length(alpha, paragraph_ids)
    check_cu_seqlens("cu_seqlens", cu_seqlens, total, device=device)
    check_ids("paragraph_ids", paragraph_ids, total, _MAX_ID, device=device)
    check_finite("alpha", alpha)
    tau = check_real("tau", tau)
    lam = check_real("lam", lam)
    w_min = check_real("w_min", w_min)
    w_max = check_real("w_max", w_max)
    if not tau > 0:
        raise ValueError(f"tau: expected a temperature > 0, got {tau}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: expected a value in [0, 1], got {lam}")
    if w_min < 0:
        raise ValueError(f"w_min: expected a value >= 0, got {w_min}")
    if w_max < w_min:
        raise ValueError(f"w_max: expected a value >= w_min ({w_min}), got {w_max}")
    if not (rescale is None or (isinstance(rescale, str) and rescale in RESCALE_MODES)):
        raise ValueError(f"rescale: expected one of {list(RESCALE_MODES)}, got {rescale!r}")
    if rescale == "mean" and w_max == 0:
        raise ValueError("w_max: must be > 0 when rescale='mean' (all weights would be 0)")

    cdtype = torch.float64 if alpha.dtype == torch.float64 else torch.float32
    if total == 0:
        return torch.ones(0, dtype=cdtype, device=device)
    ids = paragraph_ids.to(torch.int64)
    max_id = int(ids.max())
    if max_id < 0:  # no token belongs to a paragraph
        return torch.ones(total, dtype=cdtype, device=device)

    num_seqs = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    seq_of_token = torch.repeat_interleave(
        torch.arange(num_seqs, device=device), lengths, output_size=total)
    valid = ids >= 0

    # Slots = (response, local id) pairs; key = response·stride + id, −1 for tokens without a
    # paragraph. Small id ranges use a dense table (plus one trash slot for −1 tokens), large
    # sparse ones the sorted distinct keys. A slot that no token hits is not a paragraph.
    stride = max_id + 1
    key = torch.where(valid, seq_of_token * stride + ids, torch.full_like(ids, -1))
    if num_seqs * stride <= max(DENSE_SLOTS_PER_TOKEN * total, DENSE_SLOTS_MIN):
        num_slots = num_seqs * stride + 1
        slot_key = torch.arange(num_slots, device=device)
        slot_key[-1] = -1
        slot_of_tok = torch.where(valid, key, torch.full_like(key, num_slots - 1))
    else:
        slot_key, slot_of_tok = torch.unique(key, sorted=True, return_inverse=True)
        num_slots = slot_key.numel()
    slot_seq = torch.div(slot_key.clamp_min(0), stride, rounding_mode="floor")

    def per_slot(values):
        return torch.zeros(num_slots, dtype=cdtype, device=device).index_add_(0, slot_of_tok, values)

    def per_seq(index, values):
        return torch.zeros(num_seqs, dtype=cdtype, device=device).index_add_(0, index, values)

    count = per_slot(torch.ones(total, dtype=cdtype, device=device))
    present = (count > 0) & (slot_key >= 0)
    mean_alpha = per_slot(alpha.to(cdtype)) / count.clamp_min(1.0)
    neg_inf = torch.full((), -math.inf, dtype=cdtype, device=device)
    z = torch.where(present, mean_alpha / tau, neg_inf)

    # Softmax over the paragraphs of each response, max-subtracted.
    z_max = torch.full((num_seqs,), -math.inf, dtype=cdtype, device=device).scatter_reduce_(
        0, slot_seq, z, reduce="amax", include_self=True)
    e = torch.where(present, torch.exp(z - z_max[slot_seq]), torch.zeros((), dtype=cdtype, device=device))
    denom = per_seq(slot_seq, e).clamp_min(1.0)  # >= 1 wherever a paragraph exists (its max has e = 1)
    num_paras = per_seq(slot_seq, present.to(cdtype)).clamp_min(1.0)
    soft = e / denom[slot_seq]

    # w = w_min + (w_max - w_min)·w̃ written as w_max - (w_max - w_min)·(1 - w̃), so that a
    # single-paragraph response (w̃ = 1) gets exactly w_max; clamping keeps rounding in range.
    one_minus = (1.0 - lam) * (1.0 - soft) + lam * (1.0 - 1.0 / num_paras[slot_seq])
    w = (w_max - (w_max - w_min) * one_minus).clamp_(w_min, w_max)
    w_tok = w[slot_of_tok]

    one = torch.ones((), dtype=cdtype, device=device)
    if rescale == "mean":
        valid_f = valid.to(cdtype)
        seq_sum = per_seq(seq_of_token, w_tok * valid_f)
        seq_cnt = per_seq(seq_of_token, valid_f)
        # responses without paragraph tokens divide by 0 here; their tokens are all reset to 1 below
        w_tok = w_tok / (seq_sum / seq_cnt)[seq_of_token]
    return torch.where(valid, w_tok, one)
