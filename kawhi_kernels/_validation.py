"""Argument checks shared by every public op.

Each helper raises ``TypeError`` (wrong kind of object / dtype) or ``ValueError`` (wrong shape,
range or consistency) with a message that names the argument and states what was expected.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _tracing() -> bool:
    """Value checks need a device→host copy; they are skipped while torch.compile traces (shape,
    dtype and device checks still run), so the ops stay inside one graph."""
    return torch.compiler.is_compiling()


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor with the given rank, dtype and device; return it.

    Tensors on the ``meta`` device (shape only, no data) are rejected: the ops read their inputs.
    (torch.compile's fake tensors report their real device and pass.)"""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in ({_dtype_names(dtypes)}), got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")
    if value.device.type == "meta":
        raise ValueError(f"{name}: expected a tensor with data, got a meta tensor")
    return value


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise if ``value`` holds NaN or Inf (used when ``check_finite=True``)."""
    if value.numel() and not _tracing() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: contains NaN or Inf values")


def check_cu_seqlens(
    name: str, cu_seqlens, total: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """Check a cumulative sequence-length vector: int32/int64 [B+1], starts at 0, non-decreasing,
    ends at ``total``."""
    check_tensor(name, cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name}: expected length B+1 with B >= 1 sequences, got length {cu_seqlens.numel()}")
    if _tracing():
        return cu_seqlens
    check_cumulative_lengths(name, cu_seqlens.detach().to("cpu", torch.int64), total)
    return cu_seqlens


def check_cumulative_lengths(name: str, host: torch.Tensor, total: int | None = None) -> None:
    """Values of a cumulative-length vector already on the CPU: starts at 0, non-decreasing,
    ends at ``total`` (when given)."""
    if int(host[0]) != 0:
        raise ValueError(f"{name}: must start at 0, got {int(host[0])}")
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{name}: must be non-decreasing (monotone cumulative lengths)")
    if total is not None and int(host[-1]) != total:
        raise ValueError(f"{name}: last entry must equal the number of rows ({total}), got {int(host[-1])}")


def check_id_range(name: str, lo: int, hi: int, upper: int, *, allow_negative_one: bool = True) -> None:
    """An id vector's range [lo, hi] must lie in [0, upper) (or -1 when allowed)."""
    floor = -1 if allow_negative_one else 0
    if lo < floor or hi >= upper:
        allowed = f"[0, {upper})" + (" or -1" if allow_negative_one else "")
        raise ValueError(f"{name}: values must be in {allowed}, got range [{lo}, {hi}]")


def check_ids(name: str, ids, length: int, upper: int, *, device: torch.device | None = None,
              allow_negative_one: bool = True) -> torch.Tensor:
    """Check an id vector of ``length`` entries with values in [0, upper) (or -1 when allowed)."""
    check_tensor(name, ids, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if ids.numel() != length:
        raise ValueError(f"{name}: expected {length} entries, got {ids.numel()}")
    if ids.numel() and not _tracing():
        check_id_range(name, int(ids.min()), int(ids.max()), upper,
                       allow_negative_one=allow_negative_one)
    return ids


def check_heads(heads, num_heads: int) -> list[int]:
    """Normalise a head subset (None, list/tuple of ints or 1-D int tensor) to a list of indices."""
    if heads is None:
        return list(range(num_heads))
    if isinstance(heads, torch.Tensor):
        if heads.dim() != 1 or heads.dtype not in INDEX_DTYPES:
            raise TypeError(f"heads: expected a 1-D integer tensor or a list of ints, got {heads.dtype} "
                            f"tensor of shape {tuple(heads.shape)}")
        heads = heads.tolist()
    if not isinstance(heads, (list, tuple)) or not all(isinstance(h, int) and not isinstance(h, bool)
                                                      for h in heads):
        raise TypeError(f"heads: expected a list of ints, got {heads!r}")
    if len(heads) == 0:
        raise ValueError("heads: expected at least one head index, got an empty list")
    bad = [h for h in heads if h < 0 or h >= num_heads]
    if bad:
        raise ValueError(f"heads: indices must be in [0, {num_heads}), got {bad}")
    if len(set(heads)) != len(heads):
        raise ValueError(f"heads: indices must be distinct, got {list(heads)}")
    return list(heads)


def check_real(name: str, value, *, low: float | None = None, low_inclusive: bool = True,
               high: float | None = None) -> float:
    """Check a finite real number (not a bool), optionally in [low or (low, high]; return a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    if low is None and high is None:
        if not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number, got {v}")
        return v
    below = low is not None and (v < low if low_inclusive else v <= low)
    if not math.isfinite(v) or below or (high is not None and v > high):
        lo = "(-inf" if low is None else (f"[{low}" if low_inclusive else f"({low}")
        hi = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name}: expected a finite value in {lo}, {hi}, got {value!r}")
    return v


def check_bool(name: str, value) -> bool:
    """Check a flag that must be a Python bool (truthy values such as 1 or "yes" are rejected)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def check_softmax_scale(softmax_scale, head_dim: int) -> float:
    """``softmax_scale`` as a positive finite float; None means 1/√head_dim."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
            or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"softmax_scale: expected a positive finite float, got {softmax_scale!r}")
    return float(softmax_scale)


def check_positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} int, got {value}")
    return value


def check_qk_pair(q, k, *, head_dim_limit: int | None = None) -> tuple[int, int, int]:
    """Check q [total_q, Hq, D] and k [total_k, Hk, D]: same float dtype and device, Hq % Hk == 0.

    Returns (Hq, Hk, D)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    if k.dtype != q.dtype:
        raise TypeError(f"k: expected the same dtype as q ({q.dtype}), got {k.dtype}")
    hq, d = q.shape[1], q.shape[2]
    hk = k.shape[1]
    if k.shape[2] != d:
        raise ValueError(f"k: expected head dim {d} (as q), got shape {tuple(k.shape)}")
    if hq == 0 or hk == 0 or d == 0:
        raise ValueError(f"q/k: head counts and head dim must be positive, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if hq % hk != 0:
        raise ValueError(f"k: number of KV heads ({hk}) must divide the number of query heads ({hq})")
    if head_dim_limit is not None and d > head_dim_limit:
        raise ValueError(f"q: head dim {d} exceeds the backend limit {head_dim_limit}")
    return hq, hk, d


def check_backend(backend, choices: Sequence[str]) -> str:
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"backend: expected one of {list(choices)}, got {backend!r}")
    return backend
