"""Keep the softmax normaliser (log-sum-exp, "lse") that a layer's own attention computed.

:func:`capture_qk` with ``capture_lse=True`` runs each *captured* layer's attention call inside an
:class:`LSEWatcher` (a ``TorchDispatchMode`` that is active for that one call only and passes
every op through unchanged, so the outputs are bit-identical). The watcher recognises the ops that
hold the normaliser and turns it, on the spot, into the layout ``attention_mass(lse=...)`` takes:
fp32 [Hq, total_q], natural log, one column per captured query row (record order), over the keys
the model let that row see.

Recognised ops and their contracts:

============================================================ ======================== ==========
op (schema name)                                             lse as returned          units
============================================================ ======================== ==========
``aten::_scaled_dot_product_flash_attention`` (CUDA SDPA)    ``logsumexp`` [B, Hq, L] natural
``aten::_scaled_dot_product_flash_attention_for_cpu``        ``logsumexp`` [B, Hq, L] natural
``flash_attn::_flash_attn_forward`` (flash-attn 2 ≥ 2.6)     ``softmax_lse`` [B,Hq,L] natural
``flash_attn::_flash_attn_varlen_forward``                   ``softmax_lse`` [Hq, T]  natural
                                                             (≤ 2.4: [S, Hq, max_L])
``aten::_softmax`` (eager attention only)                    its input, the masked    natural
                                                             scores [B, Hq, L, L]     (computed)
============================================================ ======================== ==========

For eager attention the lse is computed from the scores the attention weights are the softmax
of (``logsumexp`` of the ``_softmax`` input over the keys, selected rows only), i.e. exactly the
normaliser of the weights the model used, in fp32 even for bf16 scores.

Anything else gives **no** lse, with the reason in :attr:`LSEResult.source` (``"none: …"``): SDPA's
math / memory-efficient / cuDNN kernels (PyTorch's CUDA SDPA takes them for padded batches, as
flash does not accept a mask), flash-attn builds whose forward is not a registered torch op
(flash-attn < 2.6), several candidate ops in one call (ambiguous), or shapes that do not match
the layer. ``attention_mass`` then computes its own normaliser; nothing is guessed.

The varlen layout is mapped to the capture's rows by requiring that the kernel's tokens are the
capture's keys in the same order, which is how transformers unpads (row-major non-pad tokens) and
packs: ``T`` = total keys, equal ``cu_seqlens``, and the kernel's q at the captured rows equal to
the captured q (bit for bit, after a cast to the kernel's dtype); anything else is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LN2", "LSE_OPS", "LSEResult", "LSETargets", "LSEWatcher", "to_natural_log", "lse_units",
           "reference_lse"]

LN2 = math.log(2.0)

# schema name -> (short source name, units of the lse it returns)
LSE_OPS: dict[str, tuple[str, str]] = {
    "aten::_scaled_dot_product_flash_attention": ("sdpa_flash", "natural"),
    "aten::_scaled_dot_product_flash_attention_for_cpu": ("sdpa_flash_cpu", "natural"),
    "flash_attn::_flash_attn_forward": ("flash_attn", "natural"),
    "flash_attn::_flash_attn_varlen_forward": ("flash_attn_varlen", "natural"),
}
_EAGER_SOFTMAX = "aten::_softmax"
# Attention kernels that ran but hand back no usable normaliser (named in the fallback reason).
_NO_LSE_OPS = (
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "aten::_efficient_attention_forward",
    "aten::_flash_attention_forward",
)


def to_natural_log(lse: torch.Tensor, units: str) -> torch.Tensor:
    """fp32 natural-log lse from ``units`` ("natural" or "log2"); same shape."""
    if units == "natural":
        return lse.float()
    if units == "log2":
        return (lse.double() * LN2).float()
    raise ValueError(f"units: expected 'natural' or 'log2', got {units!r}")


def lse_units(lse: torch.Tensor, reference_natural: torch.Tensor) -> tuple[str, float]:
    """Which units ``lse`` is in, judged against a natural-log reference of the same rows:
    ("natural" | "log2", max abs error of that reading). Only finite reference entries count."""
    keep = torch.isfinite(reference_natural)
    got, ref = lse[keep].double(), reference_natural[keep].double()
    if got.numel() == 0:
        return "natural", 0.0
    err_nat = float((got - ref).abs().max())
    err_log2 = float((got * LN2 - ref).abs().max())
    return ("natural", err_nat) if err_nat <= err_log2 else ("log2", err_log2)


def reference_lse(q: torch.Tensor, k: torch.Tensor, q_seq: torch.Tensor, q_pos: torch.Tensor,
                  k_seq: torch.Tensor, k_pos: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """fp64 [Hq, total_q] natural-log normaliser recomputed from packed q [total_q, Hq, D] and
    k [total_k, Hk, D] (GQA: head h reads KV head h // (Hq/Hk)): row i sees the keys j of its
    sequence (``q_seq[i] == k_seq[j]``) at or before its position (``k_pos[j] <= q_pos[i]``), the
    model's causal mask. Materialises [Hq, total_q, total_k]: for tests and checks only."""
    hq, hk = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * softmax_scale
    visible = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])
    scores = scores.masked_fill(~visible.to(scores.device)[None], float("-inf"))
    return torch.logsumexp(scores, dim=-1)


@dataclass(frozen=True)
class LSEResult:
    """What one attention call left: ``lse`` fp32 [Hq, total_q] natural log (None when none was
    usable) and ``source``: the short op name from :data:`LSE_OPS` or ``"eager_scores"``, or
    ``"none: <reason>"``."""

    lse: torch.Tensor | None
    source: str


@dataclass(frozen=True)
class LSETargets:
    """Where the captured query rows sit, for converting an op's lse (all on the model device).

    batch, length, num_heads: the layer's B, L, Hq. q_batch, q_pos: int64 [total_q] row/column of
    each captured query. q_in_k: int64 [total_q] index of each query among the capture's keys
    (row-major non-pad tokens), which is the token order of a varlen kernel. cu_seqlens_k: int32
    [S+1] of those keys. q_rows: optional [total_q, Hq, D] the layer's captured q (per call), to
    check a varlen kernel's token order against."""

    batch: int
    length: int
    num_heads: int
    q_batch: torch.Tensor
    q_pos: torch.Tensor
    q_in_k: torch.Tensor
    cu_seqlens_k: torch.Tensor
    q_rows: torch.Tensor | None = None


def _bind(func, args, kwargs) -> dict:
    names = [a.name for a in func._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs or {})
    return bound


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


# Rows of eager scores reduced at a time: bounds the gathered copy (and logsumexp's temporaries)
# to about 2^24 fp32 values, whatever the sequence length.
_EAGER_CHUNK_ELEMENTS = 1 << 24


def _eager_rows_lse(x: torch.Tensor, t: "LSETargets") -> torch.Tensor:
    """fp32 [Hq, total_q] logsumexp over the keys of the eager scores x [B, Hq, L, L] at the
    captured rows, in row chunks."""
    qb, qp = t.q_batch.to(x.device), t.q_pos.to(x.device)
    out = torch.empty(qb.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    step = max(1, _EAGER_CHUNK_ELEMENTS // max(1, x.shape[1] * x.shape[3]))
    for i in range(0, qb.numel(), step):
        rows = x[qb[i:i + step], :, qp[i:i + step]]                          # [chunk, Hq, L]
        out[i:i + step] = torch.logsumexp(rows.float(), dim=-1)
    return out.t().contiguous()


def _dense_rows(lse: torch.Tensor, t: LSETargets) -> torch.Tensor:
    """[B, Hq, ≥L] -> [Hq, total_q] at the captured rows."""
    idx_b, idx_p = t.q_batch.to(lse.device), t.q_pos.to(lse.device)
    return lse[idx_b, :, idx_p].t()


class LSEWatcher(TorchDispatchMode):
    """Dispatch mode around one layer's attention call; see the module doc.

    Args:
        targets: :class:`LSETargets` of the captured rows.
        eager: also read ``aten::_softmax`` (only for the eager implementation, whose one softmax
            is the attention's; in the SDPA math path a softmax is an internal detail).

    After the call, :meth:`result` gives the :class:`LSEResult`. Ops are run exactly as called;
    conversion happens right after the op, on the selected rows only, under ``no_grad``."""

    def __init__(self, targets: LSETargets, *, eager: bool = False):
        super().__init__()
        self.targets = targets
        self.eager = eager
        self._found: list[tuple[str, torch.Tensor | None, str]] = []   # (source, lse, why-not)
        self._other: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name in LSE_OPS or (self.eager and name == _EAGER_SOFTMAX):
            with torch.no_grad():
                self._found.append(self._convert(name, func, args, kwargs, out))
        elif name in _NO_LSE_OPS:
            self._other.append(name)
        elif name in ("aten::_softmax", "aten::_safe_softmax"):
            self._other.append(f"{name} (SDPA's math path, which is decomposed into plain ops)")
        return out

    # -- per op ----------------------------------------------------------------------------------
    def _convert(self, name, func, args, kwargs, out) -> tuple[str, torch.Tensor | None, str]:
        t = self.targets
        a = _bind(func, args, kwargs)
        if name == _EAGER_SOFTMAX:
            x, dim = a["self"], a["dim"]
            if x.dim() != 4 or dim % 4 != 3 or tuple(x.shape[:3]) != (t.batch, t.num_heads, t.length):
                return "eager_scores", None, f"aten::_softmax input {_shape(x)}, expected [{t.batch}, {t.num_heads}, {t.length}, L]"
            return "eager_scores", _eager_rows_lse(x, t), ""
        source, units = LSE_OPS[name]
        lse = out[1]
        q = a["q"] if "q" in a else a["query"]
        if source in ("sdpa_flash", "sdpa_flash_cpu", "flash_attn"):
            # SDPA: query [B, Hq, L, D]; flash-attn: q [B, L, Hq, D]; both: lse [B, Hq, ≥L].
            want_q = (t.batch, t.num_heads, t.length) if source != "flash_attn" else (t.batch, t.length, t.num_heads)
            if tuple(q.shape[:3]) != want_q or lse.dim() != 3 or tuple(lse.shape[:2]) != (t.batch, t.num_heads) \
                    or lse.shape[2] < t.length:
                return source, None, f"{name}: query {_shape(q)} / lse {_shape(lse)} do not match the layer"
            return source, to_natural_log(_dense_rows(lse, t), units).contiguous(), ""
        # varlen: q [T, Hq, D], cu_seqlens_q [S+1]; lse [Hq, T] (flash-attn ≥ 2.5) or [S, Hq, max_L].
        cu = a.get("cu_seqlens_q")
        total = int(t.cu_seqlens_k[-1]) if t.cu_seqlens_k.numel() else 0
        if q.dim() != 3 or q.shape[0] != total or q.shape[1] != t.num_heads or cu is None \
                or cu.numel() != t.cu_seqlens_k.numel() \
                or not torch.equal(cu.to(torch.int64), t.cu_seqlens_k.to(device=cu.device, dtype=torch.int64)):
            return source, None, (f"{name}: its tokens (q {_shape(q)}, cu_seqlens_q {_shape(cu)}) are not the "
                                  f"capture's {total} keys in order")
        if t.q_rows is not None and not torch.equal(q[t.q_in_k.to(q.device)], t.q_rows.to(q.dtype)):
            return source, None, f"{name}: its q at the captured rows differs from the captured q (token order)"
        if lse.dim() == 2 and tuple(lse.shape) == (t.num_heads, total):
            rows = lse[:, t.q_in_k.to(lse.device)]
        elif lse.dim() == 3 and lse.shape[0] == cu.numel() - 1 and lse.shape[1] == t.num_heads:
            cu64 = t.cu_seqlens_k.to(device=lse.device, dtype=torch.int64)
            q_in_k = t.q_in_k.to(lse.device)
            seq = torch.searchsorted(cu64[1:], q_in_k, right=True)
            rows = lse[seq, :, q_in_k - cu64[seq]].t()
        else:
            return source, None, f"{name}: softmax_lse {_shape(lse)} has no known layout"
        return source, to_natural_log(rows, units).contiguous(), ""

    def result(self) -> LSEResult:
        """The lse of this call, or the reason there is none."""
        if len(self._found) == 1:
            source, lse, why = self._found[0]
            return LSEResult(lse, source) if lse is not None else LSEResult(None, f"none: {why}")
        if len(self._found) > 1:
            names = [f[0] for f in self._found]
            return LSEResult(None, f"none: ambiguous, {len(names)} candidate ops ran ({', '.join(names)})")
        if self._other:
            return LSEResult(None, f"none: {self._other[0]} ran, which returns no lse here")
        return LSEResult(None, "none: no attention op that returns an lse ran (e.g. flash-attn < 2.6, "
                               "whose forward is not a registered torch op)")


def run_watched(fn: Callable, targets: LSETargets, *, eager: bool, args: tuple, kwargs: dict):
    """``fn(*args, **kwargs)`` under an :class:`LSEWatcher`; returns (fn's output, LSEResult)."""
    watcher = LSEWatcher(targets, eager=eager)
    with watcher:
        out = fn(*args, **kwargs)
    return out, watcher.result()
