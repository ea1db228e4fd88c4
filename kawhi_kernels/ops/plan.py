"""Plan once per batch, run per layer: validated execution plans of ``attention_mass`` and
``cosine_alignment``.

A plan is built from the batch *layout* — cumulative lengths, key regions, query segments, the
head selection, causal/scale and the backend — which is the same for every layer of a forward.
Building it validates everything once, values included, with a single batched device→host
transfer, resolves the backend and builds the kernels' tables on the device. ``run(q, k)``
then checks only shapes, dtypes and devices (Python attributes) and launches:

* Triton backend: no host sync and no data-dependent shape — one launch for ``attention_mass``
  (two with ``deterministic=True`` and segments), two for ``cosine_alignment``, plus the zero
  fill of the output; capturable in a CUDA graph;
* torch backend (the reference, and fp64 inputs on any backend): correct, not sync-free (it walks
  the sequences in Python);
* CUDA backend: runs the functional CUDA path (its own host preparation per call).

The functional ops (:func:`kawhi_kernels.attention_mass`, :func:`kawhi_kernels.cosine_alignment`)
build a plan and run it inside their custom op, so value checks also run under
``torch.compile`` (custom ops execute eagerly) and bad values never reach a kernel.

Example (one plan, every captured layer)::

    plan = AttentionMassPlan(cu_q, cu_k, key_region, R, num_heads=28, num_kv_heads=4,
                             head_dim=128, dtype=torch.bfloat16, heads=[0, 1, 3])
    masses = {layer: plan.run(rec.q, rec.k) for layer, rec in records.items()}
"""
from __future__ import annotations

import torch

from .. import _validation as V
from .._backend import BACKENDS, resolve_backend, triton_mass_head_dim_limit
from ._dispatch import load_implementation

__all__ = ["AttentionMassPlan", "CosineAlignmentPlan", "check_layout_structure"]

# Backend → implementation ("module:function"), imported only when a plan runs on it.
MASS_IMPLEMENTATIONS = {
    "torch": "kawhi_kernels.reference.attention_mass:attention_mass_reference",
    "triton": "kawhi_kernels.triton.attention_mass:attention_mass_triton",
    "cuda": "kawhi_kernels.cuda.attention_mass:attention_mass_cuda",
}
COSINE_IMPLEMENTATIONS = {
    "torch": "kawhi_kernels.reference.cosine_alignment:cosine_alignment_reference",
    "triton": "kawhi_kernels.triton.cosine_alignment:cosine_alignment_triton",
    "cuda": "kawhi_kernels.cuda.cosine_alignment:cosine_alignment_cuda",
}


def _host_layout(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, key_region: torch.Tensor,
                 query_segment: torch.Tensor | None):
    """One batched device→host copy of what validation and the tables need: both cumulative
    length vectors, the key-region range and the query segments (all int64 on the CPU)."""
    parts = [cu_seqlens_q.reshape(-1).to(torch.int64), cu_seqlens_k.reshape(-1).to(torch.int64)]
    if key_region.numel():
        parts.append(torch.stack([key_region.min(), key_region.max()]).to(torch.int64))
    else:
        parts.append(torch.zeros(2, dtype=torch.int64, device=key_region.device))
    if query_segment is not None:
        parts.append(query_segment.reshape(-1).to(torch.int64))
    host = torch.cat([p.to(key_region.device) for p in parts]).cpu()
    nq, nk = cu_seqlens_q.numel(), cu_seqlens_k.numel()
    cu_q, cu_k = host[:nq], host[nq:nq + nk]
    region_range = host[nq + nk:nq + nk + 2]
    segment = host[nq + nk + 2:] if query_segment is not None else None
    return cu_q, cu_k, region_range, segment


def check_layout_structure(cu_seqlens_q, cu_seqlens_k, key_region, num_regions: int,
                           query_segment=None, num_segments: int | None = None, *,
                           device: torch.device | None = None) -> None:
    """Kinds, ranks, dtypes and devices of a layout (no value is read, so this traces under
    torch.compile): int [B+1] cumulative lengths with B ≥ 1, int key_region [total_k], an int
    num_regions ≥ 0, and query_segment/num_segments together or not at all. ``device``
    defaults to key_region's."""
    if device is None and isinstance(key_region, torch.Tensor):
        device = key_region.device
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        V.check_tensor(name, cu, ndim=1, dtypes=V.INDEX_DTYPES, device=device)
        if cu.numel() < 2:
            raise ValueError(f"{name}: expected length B+1 with B >= 1 sequences, got length {cu.numel()}")
    V.check_positive_int("num_regions", num_regions, allow_zero=True)
    V.check_tensor("key_region", key_region, ndim=1, dtypes=V.INDEX_DTYPES, device=device)
    if (query_segment is None) != (num_segments is None):
        raise ValueError("query_segment/num_segments: pass both or neither")
    if query_segment is not None:
        V.check_positive_int("num_segments", num_segments, allow_zero=True)
        V.check_tensor("query_segment", query_segment, ndim=1, dtypes=V.INDEX_DTYPES, device=device)


def _check_layout(cu_seqlens_q, cu_seqlens_k, key_region, num_regions, query_segment,
                  num_segments, total_q=None):
    """Structural and value checks of a layout; returns the host copies (cu_q, cu_k, segment)."""
    check_layout_structure(cu_seqlens_q, cu_seqlens_k, key_region, num_regions, query_segment,
                           num_segments)
    cu_q, cu_k, region_range, segment = _host_layout(cu_seqlens_q, cu_seqlens_k, key_region,
                                                     query_segment)
    V.check_cumulative_lengths("cu_seqlens_q", cu_q, total_q)
    V.check_cumulative_lengths("cu_seqlens_k", cu_k, key_region.numel())
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_k: expected {cu_q.numel()} entries (as cu_seqlens_q), "
                         f"got {cu_k.numel()}")
    if key_region.numel():
        V.check_id_range("key_region", int(region_range[0]), int(region_range[1]), num_regions)
    if segment is not None:
        if segment.numel() != int(cu_q[-1]):
            raise ValueError(f"query_segment: expected {int(cu_q[-1])} entries (cu_seqlens_q[-1]), "
                             f"got {segment.numel()}")
        if segment.numel():
            V.check_id_range("query_segment", int(segment.min()), int(segment.max()), num_segments)
    return cu_q, cu_k, segment


def _rows_with_keys(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool) -> torch.Tensor:
    """bool [total_q] on the CPU: whether each query row sees at least one key (bottom-right
    aligned causal mask: local row i of a sequence with Lq rows and Lk keys sees j ≤ i + Lk − Lq)."""
    lens_q, lens_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    seq = torch.repeat_interleave(torch.arange(lens_q.numel()), lens_q)
    local = torch.arange(int(cu_q[-1])) - cu_q[:-1][seq]
    visible = lens_k[seq] > 0
    if causal:
        visible &= local + lens_k[seq] - lens_q[seq] >= 0
    return visible


def _check_head_layout(num_heads: int, num_kv_heads: int, head_dim: int, dtype) -> None:
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
        V.check_positive_int(name, value)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: ({num_kv_heads}) must divide num_heads ({num_heads})")
    if dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {V.FLOAT_DTYPES}, got {dtype!r}")


def _check_qk_for(plan, q, k) -> None:
    """q/k must have the plan's dtype, device and [total, heads, D] shapes (no value access)."""
    V.check_tensor("q", q, ndim=3, dtypes=(plan.dtype,), device=plan.device)
    V.check_tensor("k", k, ndim=3, dtypes=(plan.dtype,), device=plan.device)
    want_q = (plan.total_q, plan.num_heads, plan.head_dim)
    want_k = (plan.total_k, plan.num_kv_heads, plan.head_dim)
    if tuple(q.shape) != want_q:
        raise ValueError(f"q: expected shape {want_q} (the plan's layout), got {tuple(q.shape)}")
    if tuple(k.shape) != want_k:
        raise ValueError(f"k: expected shape {want_k} (the plan's layout), got {tuple(k.shape)}")


def _plan_backend(backend, device, op_name: str, implementations: dict, head_dim: int, dtype,
                  triton_head_dim=None) -> str:
    """The concrete backend of a plan: fp64 inputs always run the reference (the fused kernels
    compute in fp32; fp64 is for checks), others as :func:`resolve_backend` decides."""
    V.check_backend(backend, BACKENDS)
    if dtype == torch.float64:
        return "torch"
    return resolve_backend(backend, device, op_name, tuple(implementations), head_dim=head_dim,
                           triton_head_dim=triton_head_dim)


class AttentionMassPlan:
    """Validated ``attention_mass`` for one batch layout, reusable across layers and calls.

    Args:
        cu_seqlens_q, cu_seqlens_k: int32/int64 [B+1] cumulative lengths (same device as
            ``key_region``; any strides).
        key_region: int32/int64 [total_k] region id in [0, num_regions) or −1, on the device the
            q/k will be on.
        num_regions: R ≥ 0.
        num_heads, num_kv_heads, head_dim: Hq, Hk (Hq % Hk == 0), D of the q/k to come.
        dtype: their dtype (fp16/bf16/fp32/fp64).
        query_segment: optional int [total_q] in [0, num_segments) or −1, with ``num_segments``.
        heads: optional query-head subset (output order).
        causal, softmax_scale, deterministic, backend: as :func:`kawhi_kernels.attention_mass`.
        total_q: optional number of query rows, checked against cu_seqlens_q[-1].

    ``run(q, k, lse=None, check_finite=False)`` returns fp32 (fp64 for fp64) [S or total_q,
    len(heads), R].
    """

    def __init__(self, cu_seqlens_q, cu_seqlens_k, key_region, num_regions: int, *,
                 num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 query_segment=None, num_segments: int | None = None, heads=None,
                 causal: bool = True, softmax_scale: float | None = None,
                 deterministic: bool = False, backend: str = "auto", total_q: int | None = None):
        _check_head_layout(num_heads, num_kv_heads, head_dim, dtype)
        V.check_bool("causal", causal)
        V.check_bool("deterministic", deterministic)
        softmax_scale = V.check_softmax_scale(softmax_scale, head_dim)
        cu_q, cu_k, segment = _check_layout(cu_seqlens_q, cu_seqlens_k, key_region, num_regions,
                                            query_segment, num_segments, total_q)
        self.device = key_region.device
        self.num_heads, self.num_kv_heads, self.head_dim, self.dtype = (
            num_heads, num_kv_heads, head_dim, dtype)
        self.heads = V.check_heads(heads, num_heads)
        self.num_regions = num_regions
        self.num_segments = num_segments
        self.causal, self.deterministic = causal, deterministic
        self.softmax_scale = float(softmax_scale)
        self.total_q, self.total_k = int(cu_q[-1]), int(cu_k[-1])
        self.backend = _plan_backend(backend, self.device, "attention_mass", MASS_IMPLEMENTATIONS,
                                     head_dim, dtype, triton_mass_head_dim_limit(dtype))
        self._host_cu = (cu_q, cu_k)
        self._rows_with_keys = None          # built by check_finite, the only reader
        # The reference and the CUDA path take contiguous int tensors on the device.
        self._cu_q = cu_q.to(self.device)
        self._cu_k = cu_k.to(self.device)
        self._key_region = key_region
        self._segment = None if segment is None else query_segment.contiguous()
        self._triton = None
        if self.backend == "triton":
            from ..triton.attention_mass import plan_attention_mass_triton

            self._triton = plan_attention_mass_triton(
                cu_q, cu_k, key_region, num_regions, dtype=dtype, num_heads=num_heads,
                num_kv_heads=num_kv_heads, head_dim=head_dim, query_segment_host=segment,
                num_segments=num_segments or 0, heads=self.heads, causal=causal,
                softmax_scale=self.softmax_scale, deterministic=deterministic)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        rows = self.total_q if self.num_segments is None else self.num_segments
        return rows, len(self.heads), self.num_regions

    def _check_inputs(self, q, k, lse) -> None:
        _check_qk_for(self, q, k)
        if lse is not None:
            V.check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,), device=self.device)
            if tuple(lse.shape) != (self.num_heads, self.total_q):
                raise ValueError(f"lse: expected shape {(self.num_heads, self.total_q)} = "
                                 f"[Hq, total_q], got {tuple(lse.shape)}")

    def check_finite(self, q, k, lse=None) -> None:
        """Raise if q or k hold NaN/Inf, if lse holds NaN, or if lse is ±inf on a row that sees
        keys (±inf is how FlashAttention marks a row without any visible key). Syncs."""
        V.check_finite("q", q)
        V.check_finite("k", k)
        if lse is not None and lse.numel():
            sel = lse[self.heads]
            if bool(torch.isnan(sel).any()):
                raise ValueError("lse: contains NaN values")
            if self._rows_with_keys is None:
                self._rows_with_keys = _rows_with_keys(*self._host_cu, self.causal).to(self.device)
            bad = torch.isinf(sel) & self._rows_with_keys[None, :]
            if bool(bad.any()):
                raise ValueError("lse: ±inf on a row that sees keys (only rows without any "
                                 "visible key may have an infinite normaliser)")

    def run(self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None = None, *,
            check_finite: bool = False) -> torch.Tensor:
        """Attention mass of this layout for one layer's q [total_q, Hq, D] and k [total_k, Hk, D]
        (post-RoPE, the plan's dtype and device); optional fp32 ``lse`` [Hq, total_q]."""
        self._check_inputs(q, k, lse)
        V.check_bool("check_finite", check_finite)
        if check_finite:
            self.check_finite(q, k, lse)
        with torch.no_grad():
            q, k = q.detach(), k.detach()
            lse = None if lse is None else lse.detach()
            if self.backend == "triton":
                from ..triton.attention_mass import run_attention_mass_triton

                return run_attention_mass_triton(self._triton, q, k, lse)
            kwargs = dict(query_segment=self._segment, num_segments=self.num_segments or 0,
                          heads=self.heads, lse=lse, causal=self.causal,
                          softmax_scale=self.softmax_scale)
            if self.backend == "cuda":
                kwargs["deterministic"] = self.deterministic
            impl = load_implementation(MASS_IMPLEMENTATIONS[self.backend])
            return impl(q, k, self._cu_q, self._cu_k, self._key_region, self.num_regions, **kwargs)


class CosineAlignmentPlan:
    """Validated ``cosine_alignment`` for one batch layout, reusable across layers and calls.

    Args:
        cu_seqlens_q, cu_seqlens_k: int32/int64 [B+1] (same device as ``key_region``).
        key_region: int32/int64 [total_k] in [0, num_regions) or −1 (key not selected).
        num_regions: R ≥ 0.
        num_heads, num_kv_heads, head_dim, dtype: of the q/k to come.
        heads: optional query-head subset (the mean is over these); per_head: keep the head axis.
        backend: "auto" | "torch" | "triton" | "cuda".
        total_q: optional number of query rows, checked against cu_seqlens_q[-1].

    ``run(q, k)`` returns fp32 (fp64 for fp64) [total_q, R], or [total_q, len(heads), R].
    """

    def __init__(self, cu_seqlens_q, cu_seqlens_k, key_region, num_regions: int = 1, *,
                 num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 heads=None, per_head: bool = False, backend: str = "auto",
                 total_q: int | None = None):
        _check_head_layout(num_heads, num_kv_heads, head_dim, dtype)
        V.check_bool("per_head", per_head)
        cu_q, cu_k, _ = _check_layout(cu_seqlens_q, cu_seqlens_k, key_region, num_regions, None,
                                      None, total_q)
        self.device = key_region.device
        self.num_heads, self.num_kv_heads, self.head_dim, self.dtype = (
            num_heads, num_kv_heads, head_dim, dtype)
        self.heads = V.check_heads(heads, num_heads)
        self.num_regions, self.per_head = num_regions, per_head
        self.total_q, self.total_k = int(cu_q[-1]), int(cu_k[-1])
        self.backend = _plan_backend(backend, self.device, "cosine_alignment",
                                     COSINE_IMPLEMENTATIONS, head_dim, dtype)
        self._cu_q, self._cu_k = cu_q.to(self.device), cu_k.to(self.device)
        self._key_region = key_region
        self._triton = None
        if self.backend == "triton":
            from ..triton.cosine_alignment import plan_cosine_alignment_triton

            self._triton = plan_cosine_alignment_triton(
                cu_q, cu_k, key_region, num_regions, num_heads=num_heads,
                num_kv_heads=num_kv_heads, head_dim=head_dim, heads=self.heads, per_head=per_head)

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.per_head:
            return self.total_q, len(self.heads), self.num_regions
        return self.total_q, self.num_regions

    def run(self, q: torch.Tensor, k: torch.Tensor, *, check_finite: bool = False) -> torch.Tensor:
        """Mean cosine of this layout for q [total_q, Hq, D] and k [total_k, Hk, D]."""
        _check_qk_for(self, q, k)
        V.check_bool("check_finite", check_finite)
        if check_finite:
            V.check_finite("q", q)
            V.check_finite("k", k)
        with torch.no_grad():
            q, k = q.detach(), k.detach()
            if self.backend == "triton":
                from ..triton.cosine_alignment import run_cosine_alignment_triton

                return run_cosine_alignment_triton(self._triton, q, k)
            impl = load_implementation(COSINE_IMPLEMENTATIONS[self.backend])
            return impl(q, k, self._cu_q, self._cu_k, self._key_region, self.num_regions,
                        heads=self.heads, per_head=self.per_head)
