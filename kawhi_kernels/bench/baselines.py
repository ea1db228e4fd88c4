"""Baselines and yardsticks the benchmark compares the ops against (not part of the product API).

* :func:`cosine_alignment_naive` — the paper's O(H·T·N·D) form: materialise every cosine.
* :class:`FlexAttentionMass` — attention mass with no new kernel: torch ``flex_attention`` with
  V = key→region one-hot indicator, causal + varlen expressed as a block mask over document ids.
* :class:`FlashForward` — a FlashAttention forward over the same rows and keys (speed-of-light
  yardstick): flash-attn's ``flash_attn_varlen_func`` when installed, else torch's flash SDPA
  kernel on CUDA (plain SDPA on CPU).
* :func:`sguf_numpy` — SGUF as a NumPy / scikit-image / SciPy pipeline (rgb2lab, gaussian_filter,
  sobel, patch structure tensors, union-find via ``scipy.sparse.csgraph.connected_components``).
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from .inputs import PackedInputs

# flex_attention's value head dim is padded to a power of two >= 16; larger region counts than
# this are not a sensible use of it (the value tile would not fit the kernel's shared memory).
FLEX_MAX_REGIONS = 256


class BaselineUnavailable(RuntimeError):
    """A baseline cannot run here (missing package, device or unsupported shape); the message
    says why."""


# ----------------------------------------------------------------------------- cosine

def cosine_alignment_naive(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, key_region: torch.Tensor, num_regions: int,
                           heads: list[int]) -> torch.Tensor:
    """Mean cosine per region computed the direct way: repeat K for GQA, normalise, materialise
    cos [H, n, Lk] per sequence, then average the region columns and the heads.

    q [total_q, Hq, D], k [total_k, Hk, D]; key_region int [total_k] (−1: no region).
    Returns fp32 (fp64 for fp64 input) [total_q, R]; 0 for a region without keys.
    """
    hq, hk = q.shape[1], k.shape[1]
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape[0], num_regions, dtype=cdtype, device=q.device)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        qh = torch.nn.functional.normalize(q[q0:q1, heads].to(cdtype), dim=-1)           # [n, H, D]
        kh = k[k0:k1].repeat_interleave(hq // hk, dim=1)[:, heads].to(cdtype)
        kh = torch.nn.functional.normalize(kh, dim=-1)                                    # [m, H, D]
        cos = torch.einsum("nhd,mhd->hnm", qh, kh)                                        # [H, n, m]
        region = key_region[k0:k1].to(torch.int64)
        keep = region >= 0
        indicator = torch.zeros(k1 - k0, num_regions, dtype=cdtype, device=q.device)
        indicator[keep.nonzero().squeeze(1), region[keep]] = 1.0
        counts = indicator.sum(0).clamp_min(1.0)
        out[q0:q1] = (cos @ indicator).mean(0) / counts
    return out


# ----------------------------------------------------------------------------- flex attention

@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """``torch.compile(flex_attention)``, with dynamo's recompile limits raised: a sweep compiles
    it once per shape, and past the default limit (8) dynamo would silently fall back to the
    unfused eager path and time that instead."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    for name, floor in (("recompile_limit", 64), ("cache_size_limit", 64),
                        ("accumulated_recompile_limit", 1024), ("accumulated_cache_size_limit", 1024)):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), floor))
    return torch.compile(flex_attention, dynamic=False)


class FlexAttentionMass:
    """``attention_mass`` through torch ``flex_attention``: softmax(scale·QKᵀ + mask) @ V with
    V[j] = one-hot(region(j)) (zero row for region −1), so the output row is the mass per region.

    Packed varlen + bottom-right causal is a ``mask_mod`` over precomputed per-row key bounds
    (the document-id trick, on B = 1 packed tensors). The block mask is built here, once (not
    timed). Compiled with ``torch.compile`` on CUDA; eager (unfused, materialising) elsewhere.
    Output: fp32 [total_q or num_segments, Hq, R] (accumulated by flex in fp32, stored in the
    input dtype, then summed per segment in fp32).
    """

    def __init__(self, inputs: PackedInputs, device: torch.device):
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as exc:
            raise BaselineUnavailable(f"torch {torch.__version__} has no flex_attention ({exc})") from None
        r = inputs.num_regions
        if r > FLEX_MAX_REGIONS:
            raise BaselineUnavailable(f"flex_attention value dim would be R={r} > {FLEX_MAX_REGIONS}; "
                                      "the one-hot V trick only suits coarse regions")
        self.inputs = inputs
        self.num_regions = r
        width = max(16, 1 << max(0, r - 1).bit_length())
        total_k = inputs.ks[0].shape[0]
        hk = inputs.ks[0].shape[1]
        value = torch.zeros(total_k, width, dtype=inputs.ks[0].dtype, device=device)
        keep = (inputs.key_region >= 0).nonzero().squeeze(1)
        value[keep, inputs.key_region[keep].long()] = 1
        self.value = value[None, None].expand(1, hk, total_k, width).contiguous()

        cu_q, cu_k = inputs.cu_seqlens_q.long(), inputs.cu_seqlens_k.long()
        total_q = inputs.qs[0].shape[0]
        rows = torch.arange(total_q, device=device)
        seq = torch.searchsorted(cu_q[1:], rows, right=True)
        lq, lk = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
        first = cu_k[seq]
        if inputs.causal:
            last = first + (rows - cu_q[seq]) + lk[seq] - lq[seq]
        else:
            last = cu_k[seq + 1] - 1

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx >= first[q_idx]) & (kv_idx <= last[q_idx])

        self.block_mask = create_block_mask(mask_mod, None, None, total_q, total_k, device=device)
        self.flex = _compiled_flex() if device.type == "cuda" else flex_attention
        self.compiled = device.type == "cuda"

    def __call__(self, copy_index: int) -> torch.Tensor:
        inputs = self.inputs
        q = inputs.qs[copy_index].permute(1, 0, 2).unsqueeze(0)          # [1, Hq, total_q, D]
        k = inputs.ks[copy_index].permute(1, 0, 2).unsqueeze(0)          # [1, Hk, total_k, D]
        with warnings.catch_warnings():  # eager flex warns that it is unfused: the note says so
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = self.flex(q, k, self.value, block_mask=self.block_mask, scale=inputs.softmax_scale,
                            enable_gqa=True)
        per_row = out[0, :, :, :self.num_regions].permute(1, 0, 2).float()   # [total_q, Hq, R]
        if inputs.query_segment is None:
            return per_row
        result = torch.zeros(inputs.num_segments, per_row.shape[1], self.num_regions,
                             dtype=torch.float32, device=per_row.device)
        keep = inputs.query_segment >= 0
        return result.index_add_(0, inputs.query_segment[keep].long(), per_row[keep])


# ----------------------------------------------------------------------------- flash yardstick

class FlashForward:
    """A FlashAttention forward (output O = softmax(scale·QKᵀ)V, V random [total_k, Hk, D]) over
    exactly the rows and keys of ``inputs`` — the yardstick a fused statistic should approach.

    CUDA: flash-attn's ``flash_attn_varlen_func`` if importable (GQA and bottom-right causal
    native), else ``torch.ops.aten._scaled_dot_product_flash_attention`` on [B, H, L, D] views
    (needs equal-length sequences; its causal flag is bottom-right aligned; K/V are repeated
    to Hq beforehand, untimed, if the kernel refuses GQA). CPU: SDPA with a lower-right causal
    bias (whatever CPU kernel torch picks). ``impl`` says which ran.
    """

    def __init__(self, inputs: PackedInputs, device: torch.device):
        self.inputs = inputs
        gen = torch.Generator(device=device).manual_seed(1234)
        k0 = inputs.ks[0]
        self.values = [torch.randn(k0.shape, generator=gen, device=device, dtype=torch.float32).to(k0.dtype)
                       for _ in inputs.ks]
        lq = (inputs.cu_seqlens_q[1:] - inputs.cu_seqlens_q[:-1]).tolist()
        lk = (inputs.cu_seqlens_k[1:] - inputs.cu_seqlens_k[:-1]).tolist()
        self.max_q, self.max_k = max(lq), max(lk)
        self.uniform = len(set(lq)) == 1 and len(set(lk)) == 1
        self.batch = len(lq)
        self.keys = list(inputs.ks)
        self.varlen = False
        if device.type == "cuda":
            try:
                import flash_attn
                from flash_attn import flash_attn_varlen_func
            except ImportError:
                self.impl = "torch sdpa flash kernel (aten._scaled_dot_product_flash_attention)"
                self._fn = self._sdpa_flash
                self._check_sdpa_gqa()
            else:
                self.impl = f"flash_attn_varlen_func (flash-attn {getattr(flash_attn, '__version__', '?')})"
                self._varlen = flash_attn_varlen_func
                self._fn = self._flash_attn
                self.varlen = True
        else:
            self.impl = "torch sdpa on CPU (no flash kernel), lower-right causal bias"
            self._fn = self._sdpa_cpu
        if not self.varlen and not self.uniform:
            raise BaselineUnavailable("the SDPA yardstick needs equal-length sequences")

    def _dense(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """[B·L, H, D] → [B, H, L, D] view."""
        return x.view(self.batch, length, x.shape[1], x.shape[2]).transpose(1, 2)

    def _flash_attn(self, i: int) -> torch.Tensor:
        inp = self.inputs
        return self._varlen(inp.qs[i], inp.ks[i], self.values[i], inp.cu_seqlens_q, inp.cu_seqlens_k,
                            self.max_q, self.max_k, softmax_scale=inp.softmax_scale, causal=inp.causal)

    def _sdpa_flash(self, i: int) -> torch.Tensor:
        inp = self.inputs
        q = self._dense(inp.qs[i], self.max_q)
        k = self._dense(self.keys[i], self.max_k)
        v = self._dense(self.values[i], self.max_k)
        return torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal=inp.causal, return_debug_mask=False, scale=inp.softmax_scale)[0]

    def _check_sdpa_gqa(self) -> None:
        """Use K/V with Hk heads if the flash kernel takes them, else repeat them (untimed)."""
        inp = self.inputs
        hq, hk = inp.qs[0].shape[1], inp.ks[0].shape[1]
        if hq == hk:
            return
        try:
            self._sdpa_flash(0)
        except RuntimeError:
            self.keys = [k.repeat_interleave(hq // hk, dim=1) for k in inp.ks]
            self.values = [v.repeat_interleave(hq // hk, dim=1) for v in self.values]
            self.impl += ", K/V repeated to Hq beforehand, untimed (the kernel refused GQA)"

    def _sdpa_cpu(self, i: int) -> torch.Tensor:
        from torch.nn.attention.bias import causal_lower_right

        inp = self.inputs
        q = self._dense(inp.qs[i], self.max_q)
        k = self._dense(inp.ks[i], self.max_k)
        v = self._dense(self.values[i], self.max_k)
        mask = causal_lower_right(self.max_q, self.max_k) if inp.causal else None
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=inp.softmax_scale, enable_gqa=True)

    def __call__(self, copy_index: int) -> torch.Tensor:
        return self._fn(copy_index)


# ----------------------------------------------------------------------------- SGUF

def _canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber components 0..C-1 in order of their first token (raster order)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.shape[0], dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.shape[0])
    return rank[inverse.reshape(-1)]


def sguf_descriptors_numpy(image: np.ndarray, grid_hw: tuple[int, int], sigma: float = 1.0
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 (λmax, λmin, lightness) per patch [gh·gw] with scikit-image and SciPy:
    ``rgb2lab`` L, ``gaussian_filter`` (reflect, truncate 4), ``sobel`` x/y, patch-mean
    structure tensor and its closed-form eigenvalues, patch-mean smoothed L."""
    from scipy import ndimage
    from skimage.color import rgb2lab

    gh, gw = grid_hw
    p = image.shape[0] // gh
    light = ndimage.gaussian_filter(rgb2lab(image)[..., 0], sigma, mode="reflect", truncate=4.0)
    gx = ndimage.sobel(light, axis=1, mode="reflect")
    gy = ndimage.sobel(light, axis=0, mode="reflect")

    def patch_mean(x: np.ndarray) -> np.ndarray:
        return x.reshape(gh, p, gw, p).mean(axis=(1, 3)).reshape(-1)

    jxx, jxy, jyy = patch_mean(gx * gx), patch_mean(gx * gy), patch_mean(gy * gy)
    centre = 0.5 * (jxx + jyy)
    spread = np.hypot(0.5 * (jxx - jyy), jxy)
    return np.maximum(centre + spread, 0.0), np.maximum(centre - spread, 0.0), patch_mean(light)


def sguf_numpy(image: np.ndarray, grid_hw: tuple[int, int], *, sigma: float = 1.0,
               delta_s: float = 0.5, delta_l: float = 30.0, beta: float = 0.1,
               skip_ratio: float = 0.7, rng: np.random.Generator | None = None) -> dict:
    """SGUF key regions of one uint8 RGB image [gh·P, gw·P, 3] as a NumPy/scikit-image/SciPy
    pipeline (the baseline). Returns dict of numpy arrays: labels int64 [N] (canonical: numbered
    by first token), energy [C], is_key bool [C], selected bool [N], lam_max, lam_min, lightness
    float64 [N]."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(0) if rng is None else rng
    gh, gw = grid_hw
    lmax, lmin, light = sguf_descriptors_numpy(image, grid_hw, sigma)
    trace = lmax + lmin
    eps = 1e-6 + 1e-3 * float(np.median(trace))
    ids = np.arange(gh * gw).reshape(gh, gw)
    grids = [a.reshape(gh, gw) for a in (lmax, lmin, light)]
    heads, tails = [], []
    for a_sl, b_sl in (((slice(None), slice(0, gw - 1)), (slice(None), slice(1, gw))),
                       ((slice(0, gh - 1), slice(None)), (slice(1, gh), slice(None)))):
        amax, amin, alight = (g[a_sl] for g in grids)
        bmax, bmin, blight = (g[b_sl] for g in grids)
        structure = np.hypot(amax - bmax, amin - bmin) / np.maximum(np.maximum(amax, bmax), eps)
        ok = (structure < delta_s) & (np.abs(alight - blight) < delta_l)
        heads.append(ids[a_sl][ok])
        tails.append(ids[b_sl][ok])
    src, dst = np.concatenate(heads), np.concatenate(tails)
    graph = coo_matrix((np.ones(src.shape[0]), (src, dst)), shape=(gh * gw, gh * gw))
    _, labels = connected_components(graph, directed=False)
    labels = _canonical_labels(labels)
    counts = np.bincount(labels)
    energy = np.bincount(labels, weights=trace) / counts
    is_key = energy > beta * float(np.median(energy))
    selected = is_key[labels].copy()
    members_of = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
    for comp in np.flatnonzero(~is_key):
        members = members_of[comp]
        keep = round((1.0 - skip_ratio) * members.shape[0])
        selected[rng.choice(members, size=keep, replace=False)] = True
    return dict(labels=labels, energy=energy, is_key=is_key, selected=selected,
                lam_max=lmax, lam_min=lmin, lightness=light)
