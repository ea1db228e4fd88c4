"""Group-normalised advantages and KAWHI credit reallocation (DESIGN.md section 1, step 5).

    A_g   = (R_g − mean_group(R)) / (std_group(R) + ε)       (GRPO)
    Â_g,t = A_g · w_t   on response tokens, 0 elsewhere      (KAWHI)

plus the packed ↔ padded layout helpers used to move per-token weights (packed, as produced by
``paragraph_weights``) into the padded [B, T] response tensors of GRPO trainers. Padded tensors are
right-padded: the tokens of row b occupy columns 0 … len_b − 1.
"""
from __future__ import annotations

import math

import torch

from .._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_cu_seqlens,
    check_finite,
    check_real,
    check_tensor,
)

STD_MODES = ("population", "sample", "none")
_REWARD_DTYPES = FLOAT_DTYPES + INDEX_DTYPES + (torch.bool, torch.int8, torch.int16, torch.uint8)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    group_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
    std: str = "population",
) -> torch.Tensor:
    """GRPO group-normalised advantages.

    Args:
        rewards: [N] sequence rewards (float, int or bool; must be finite).
        group_size: G; groups are consecutive runs of G responses (N must be a multiple of G).
        group_ids: alternatively int32/int64 [N] group label (≥ 0) of every response, same device;
            labels need not be contiguous or sorted. Give exactly one of group_size / group_ids.
        eps: ε ≥ 0 added to the standard deviation.
        std: "population" (divide by n, default), "sample" (divide by n − 1; a group of one has
            std 0) or "none" (no division: A = R − mean, as in Dr. GRPO).
    Returns:
        float32 [N] (float64 if rewards are float64) on ``rewards``' device. A group whose rewards
        are all equal (including a group of one) gets exactly 0, never NaN, even with eps = 0.
    """
    check_tensor("rewards", rewards, ndim=1, dtypes=_REWARD_DTYPES)
    num = rewards.shape[0]
    if num == 0:
        raise ValueError("rewards: expected at least one reward, got an empty tensor")
    if rewards.dtype.is_floating_point:
        check_finite("rewards", rewards)
    eps = check_real("eps", eps)
    if eps < 0:
        raise ValueError(f"eps: expected a value >= 0, got {eps}")
    if not (isinstance(std, str) and std in STD_MODES):
        raise ValueError(f"std: expected one of {list(STD_MODES)}, got {std!r}")
    device = rewards.device
    if (group_size is None) == (group_ids is None):
        raise ValueError("group_size: give exactly one of group_size (int) or group_ids (tensor)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size: expected an int, got {type(group_size).__name__}")
        if group_size <= 0 or num % group_size != 0:
            raise ValueError(f"group_size: expected a positive divisor of the number of rewards ({num}), "
                             f"got {group_size}")
        group_of = torch.arange(num, device=device) // group_size
        num_groups = num // group_size
    else:
        check_tensor("group_ids", group_ids, ndim=1, dtypes=INDEX_DTYPES, device=device)
        if group_ids.numel() != num:
            raise ValueError(f"group_ids: expected {num} entries (one per reward), got {group_ids.numel()}")
        if int(group_ids.min()) < 0:
            raise ValueError(f"group_ids: values must be >= 0, got minimum {int(group_ids.min())}")
        labels, group_of = torch.unique(group_ids.to(torch.int64), return_inverse=True)
        num_groups = labels.numel()

    cdtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(cdtype)
    count = torch.zeros(num_groups, dtype=cdtype, device=device).index_add_(0, group_of, torch.ones_like(r))
    mean = torch.zeros(num_groups, dtype=cdtype, device=device).index_add_(0, group_of, r) / count
    # A group whose rewards are all equal gets exactly 0 (the rounded mean may differ from the
    # rewards by an ulp, which with eps = 0 would otherwise give ±1).
    lo = torch.full((num_groups,), math.inf, dtype=cdtype, device=device).scatter_reduce_(
        0, group_of, r, reduce="amin")
    hi = torch.full((num_groups,), -math.inf, dtype=cdtype, device=device).scatter_reduce_(
        0, group_of, r, reduce="amax")
    constant = (lo == hi)[group_of]
    dev = torch.where(constant, torch.zeros_like(r), r - mean[group_of])
    if std == "none":
        return dev
    sq = torch.zeros(num_groups, dtype=cdtype, device=device).index_add_(0, group_of, dev * dev)
    dof = count if std == "population" else (count - 1.0).clamp_min(1.0)
    denom = torch.sqrt(sq / dof)[group_of] + eps
    return torch.where(constant, dev, dev / denom)


def reweight_advantages(
    advantages: torch.Tensor, token_weights: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """KAWHI credit reallocation Â[b, t] = A[b] · w[b, t] on response tokens, 0 elsewhere.

    Args:
        advantages: float [B] (one per response) or [B, T] (already per token).
        token_weights: float [B, T] per-token weights (e.g. ``packed_to_padded`` of
            ``paragraph_weights``), same device.
        response_mask: bool or integer (values 0/1) [B, T]; True/1 marks response tokens. Values of
            ``advantages``/``token_weights`` outside the mask are ignored (even NaN).
    Returns:
        [B, T] in float32, or float64 if ``advantages`` or ``token_weights`` is float64.
    """
    check_tensor("token_weights", token_weights, ndim=2, dtypes=FLOAT_DTYPES)
    device = token_weights.device
    shape = tuple(token_weights.shape)
    check_tensor("advantages", advantages, dtypes=FLOAT_DTYPES, device=device)
    if advantages.dim() == 1:
        if advantages.shape[0] != shape[0]:
            raise ValueError(f"advantages: expected shape [{shape[0]}] or {list(shape)} (as token_weights), "
                             f"got {tuple(advantages.shape)}")
        adv = advantages[:, None]
    elif advantages.dim() == 2:
        if tuple(advantages.shape) != shape:
            raise ValueError(f"advantages: expected shape [{shape[0]}] or {list(shape)} (as token_weights), "
                             f"got {tuple(advantages.shape)}")
        adv = advantages
    else:
        raise ValueError(f"advantages: expected a 1-D [B] or 2-D [B, T] tensor, got shape {tuple(advantages.shape)}")
    mask = _check_mask("response_mask", response_mask, shape, device)
    cdtype = torch.promote_types(torch.promote_types(advantages.dtype, token_weights.dtype), torch.float32)
    prod = adv.to(cdtype) * token_weights.to(cdtype)
    return torch.where(mask, prod, torch.zeros((), dtype=cdtype, device=device))


def packed_to_padded(
    values: torch.Tensor, cu_seqlens: torch.Tensor, T: int | None = None, fill: float = 0.0
) -> torch.Tensor:
    """Scatter packed rows [sum T_b, *rest] into a right-padded [B, T, *rest] tensor.

    Args:
        values: [N, *rest] any dtype, rows of B sequences concatenated.
        cu_seqlens: int32/int64 [B+1] cumulative lengths ending at N, same device.
        T: padded length (≥ the longest sequence); default the longest sequence.
        fill: value of the padding positions.
    Returns:
        [B, T, *rest] with ``values``' dtype and device; row b holds its T_b rows first.
    """
    check_tensor("values", values)
    if values.dim() == 0:
        raise ValueError("values: expected a tensor of shape [N, ...], got a 0-D tensor")
    device = values.device
    check_cu_seqlens("cu_seqlens", cu_seqlens, values.shape[0], device=device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    longest = int(lengths.max())
    if T is None:
        T = longest
    elif isinstance(T, bool) or not isinstance(T, int):
        raise TypeError(f"T: expected an int or None, got {type(T).__name__}")
    elif T < longest:
        raise ValueError(f"T: padded length {T} is shorter than the longest sequence ({longest})")
    num_seqs = lengths.numel()
    out = torch.full((num_seqs * T, *values.shape[1:]), fill, dtype=values.dtype, device=device)
    total = values.shape[0]
    seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths, output_size=total)
    pos = torch.arange(total, device=device) - cu_seqlens[:-1].to(torch.int64)[seq]
    out[seq * T + pos] = values
    return out.view(num_seqs, T, *values.shape[1:])


def padded_to_packed(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gather the masked positions of [B, T, *rest] into packed rows [N, *rest] (row-major order).

    Args:
        values: [B, T, *rest] any dtype.
        mask: bool or integer (0/1) [B, T], same device; True/1 = keep.
    Returns:
        [N, *rest], N = number of True entries, rows of b = 0 first then b = 1, …; with a
        right-padded mask this inverts ``packed_to_padded`` (cu_seqlens from ``mask_to_cu_seqlens``).
    """
    check_tensor("values", values)
    if values.dim() < 2:
        raise ValueError(f"values: expected a tensor of shape [B, T, ...], got shape {tuple(values.shape)}")
    m = _check_mask("mask", mask, tuple(values.shape[:2]), values.device)
    return values[m]


def mask_to_cu_seqlens(mask: torch.Tensor) -> torch.Tensor:
    """int32 [B+1] cumulative counts of True/1 entries per row of a bool/0-1 integer mask [B, T]."""
    check_tensor("mask", mask, ndim=2)
    m = _check_mask("mask", mask, tuple(mask.shape), mask.device)
    cu = torch.zeros(m.shape[0] + 1, dtype=torch.int32, device=m.device)
    cu[1:] = torch.cumsum(m.sum(dim=1), 0).to(torch.int32)
    return cu


def _check_mask(name: str, mask, shape: tuple, device: torch.device) -> torch.Tensor:
    """Validate a bool / 0-1 integer mask of ``shape`` on ``device``; return it as bool."""
    check_tensor(name, mask, dtypes=(torch.bool, torch.uint8, torch.int8, torch.int16) + INDEX_DTYPES,
                 device=device)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name}: integer masks must hold only 0 and 1")
    return mask != 0

