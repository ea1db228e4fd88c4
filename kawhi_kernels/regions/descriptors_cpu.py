"""Fast CPU path of the SGUF patch descriptors (same results as :mod:`.descriptors`).

SGUF runs in dataloader workers, often on one core, so this path removes the work the
stage-by-stage reference in :mod:`.descriptors` does for clarity, while keeping its arithmetic:

* lightness: Y from two table lookups (a 64 Ki-entry table of the red+green sum, indexed by a
  16-bit view of each pixel's (R, G) bytes, then the blue table): the same float additions in
  the same order as the three per-channel lookups, so Y is bit-identical; f(Y) with ``np.cbrt``
  (the exact cube root, as scikit-image) instead of ``pow(Y, 1/3)``, which differs by at most
  an ulp or so; a*, b* are never computed;
* one reflect padding of L up front (radius of the Gaussian), then "valid" 1-D correlations,
  each tap one fused multiply-add pass in torch, written straight into a buffer with a 1-pixel
  rim that becomes the Sobel padding (a copy of the edge rows and columns, as scipy's reflect);
  no per-stage padding copies;
* Sobel, the products and the patch means with the same torch operations, in the same order,
  as the reference, so for identical L the values agree to rounding (mostly bit for bit: torch
  may use FMA in the vectorised body of an add and not in its tail, and the rows here are
  laid out at other widths);
* every full-image temporary lives in a per-thread workspace that is reused from call to call
  (a dataloader worker sees one image size after another): fresh multi-megabyte allocations
  cost page faults that, on one core, took longer than the arithmetic. A batch is processed
  image by image, so the workspace stays the size of one image (about 5 float images).

When the native module ``kawhi_kernels._C`` has ``sguf_descriptors_cpu_f32``/``_f64``
(csrc/sguf_cpu.cpp), each image goes through that fused single-threaded C++ loop instead: the
same arithmetic stage for stage (same tables, Gaussian taps, tap order, padding, Sobel order),
row by row in cache, with the patch sums accumulated in float64 (torch's float32 mean rounds
differently, so the descriptors agree to rounding, not bit for bit). Without the module (a pure
wheel) the NumPy/torch path below runs.

Images: uint8 [..., H, W, 3] on the CPU; every computation in float32 or float64.
"""
from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from .._extension import load_extension
from .descriptors import (
    _LAB_EPSILON,
    _LAB_KAPPA,
    _patch_mean,
    gaussian_kernel1d,
    luminance_tables,
    structure_eigenvalues,
)

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@functools.lru_cache(maxsize=4)
def _lookup_tables(dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(red+green table [65536] indexed by r + 256*g, blue table [256]) in ``dtype``; the sum is
    rounded once in ``dtype``, exactly as adding the per-channel table entries."""
    luts = luminance_tables("cpu", dtype).numpy()
    red_green = (luts[1][:, None] + luts[0][None, :]).reshape(-1)  # [g, r] -> index 256*g + r
    red_green.flags.writeable = False
    blue = luts[2].copy()
    blue.flags.writeable = False
    return red_green, blue


class _Workspace(threading.local):
    """Named flat buffers, grown on demand and reused by later calls in the same thread."""

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype`` on buffer ``name`` (which it
        overwrites: callers give arrays that are alive at the same time different names)."""
        size = int(np.prod(shape, dtype=np.int64))
        dtype = np.dtype(dtype)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = self.buffers[name] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)


_WORKSPACE = _Workspace()


def _luminance(image: np.ndarray, dtype: torch.dtype, ws: _Workspace = _WORKSPACE) -> np.ndarray:
    """Y (D65) of one uint8 image [H, W, 3] as ``dtype`` numpy [H, W] (a workspace buffer)."""
    red_green, blue = _lookup_tables(dtype)
    h, w, _ = image.shape
    # A little-endian uint16 read at every pixel's first byte is r + 256*g. The last pixel's
    # read stays in bounds because the buffer holds the image's bytes plus one spare byte.
    flat = ws.get("bytes", (image.size + 1,), np.uint8)
    flat[:-1] = image.reshape(-1)
    rg = np.ndarray((h * w,), dtype="<u2", buffer=flat, strides=(3,))
    y = ws.get("a", (h * w,), _NUMPY_DTYPES[dtype])
    b = ws.get("b", (h * w,), _NUMPY_DTYPES[dtype])
    np.take(red_green, rg, out=y, mode="wrap")  # indices are in range: "wrap" only avoids a copy
    np.take(blue, flat[2:-1:3], out=b, mode="wrap")
    y += b
    return y.reshape(h, w)


def _lightness_into(out: np.ndarray, y: np.ndarray, ws: _Workspace | None = None) -> None:
    """CIELab L = 116 f(Y) - 16 of Y [H, W] (reference white Y = 1) into ``out`` [H, W]; ``y``
    (contiguous) is overwritten with f(Y)."""
    ws = _WORKSPACE if ws is None else ws
    t = y.dtype.type
    flat = y.reshape(-1)
    dark = np.less_equal(flat, t(_LAB_EPSILON), out=ws.get("mask", flat.shape, np.bool_))
    linear = None
    if dark.any():  # the linear branch of f (L < 8), computed where needed and blended in
        linear = np.multiply(flat, t(_LAB_KAPPA), out=ws.get("b", flat.shape, y.dtype))
        linear += t(16.0 / 116.0)
    np.cbrt(flat, out=flat)
    if linear is not None:
        np.copyto(flat, linear, where=dark)
    np.multiply(y, t(116.0), out=out)
    out -= t(16.0)


def _reflect(n: int, radius: int) -> np.ndarray:
    """scipy "reflect" source index of each position -radius .. n-1+radius (any n >= 1)."""
    pos = np.arange(-radius, n + radius) % (2 * n)
    return np.where(pos >= n, 2 * n - 1 - pos, pos)


def _fill_rim(padded: np.ndarray, n_rows: int, n_cols: int, radius: int) -> None:
    """Fill the ``radius``-wide border of [n_rows + 2r, n_cols + 2r] from its interior by scipy's
    reflect rule (columns first on the interior rows, then whole rows: corners follow)."""
    if radius == 0:
        return
    cols = _reflect(n_cols, radius) + radius
    rows = _reflect(n_rows, radius) + radius
    border = np.r_[0:radius, n_cols + radius:n_cols + 2 * radius]
    padded[radius:radius + n_rows, border] = padded[radius:radius + n_rows, cols[border]]
    border = np.r_[0:radius, n_rows + radius:n_rows + 2 * radius]
    padded[border, :] = padded[rows[border], :]


def _correlate_valid(x: torch.Tensor, weights: list[float], dim: int, out: torch.Tensor) -> None:
    """out = sum_k weights[k] * x.narrow(dim, k, n_out): a "valid" correlation along ``dim``,
    with the reference's operation order (first tap multiplied, then one add_ per tap)."""
    n = out.shape[dim]
    first = True
    for k, wk in enumerate(weights):
        if wk == 0.0:
            continue
        term = x.narrow(dim, k, n)
        if first:
            torch.mul(term, wk, out=out)
            first = False
        else:
            out.add_(term, alpha=wk)


def _descriptors_one(pixels: np.ndarray, grid: tuple[int, int], p: int, kernel: list[float],
                     dtype: torch.dtype, ws: _Workspace = _WORKSPACE):
    """(lam_max, lam_min, lightness) ``dtype`` [gh*gw] of one uint8 image [gh*p, gw*p, 3]."""
    h, w = pixels.shape[0], pixels.shape[1]
    r = len(kernel) // 2
    np_dtype = _NUMPY_DTYPES[dtype]

    def tensor(name, shape):
        return torch.from_numpy(ws.get(name, shape, np_dtype))

    # Buffers: "a" Y then the smoothed L; "b" blue lookups, the row pass, then dx, dy, products;
    # "c" padded L then gx; "d" gy. Each name holds one live array at a time.
    y = _luminance(pixels, dtype, ws)
    light = ws.get("c", (h + 2 * r, w + 2 * r), np_dtype)
    _lightness_into(light[r:r + h, r:r + w], y, ws)
    _fill_rim(light, h, w, r)

    # Gaussian, rows first (as scipy), then columns, into the interior of a 1-pixel-rim buffer.
    rows_done = tensor("b", (h, w + 2 * r))
    _correlate_valid(torch.from_numpy(light), kernel, -2, rows_done)
    smoothed = tensor("a", (h + 2, w + 2))
    _correlate_valid(rows_done, kernel, -1, smoothed[1:h + 1, 1:w + 1])
    _fill_rim(smoothed.numpy(), h, w, 1)

    # Sobel (reference order: difference, then the [1, 2, 1] smoothing across it).
    dx = torch.sub(smoothed[:, 2:], smoothed[:, :-2], out=tensor("b", (h + 2, w)))
    gx = tensor("c", (h, w))
    _correlate_valid(dx, [1.0, 2.0, 1.0], -2, gx)
    dy = torch.sub(smoothed[2:, :], smoothed[:-2, :], out=tensor("b", (h, w + 2)))
    gy = tensor("d", (h, w))
    _correlate_valid(dy, [1.0, 2.0, 1.0], -1, gy)

    product = tensor("b", (h, w))
    jxx = _patch_mean(torch.mul(gx, gx, out=product), grid, p)
    jxy = _patch_mean(torch.mul(gx, gy, out=product), grid, p)
    jyy = _patch_mean(torch.mul(gy, gy, out=product), grid, p)
    lam_max, lam_min = structure_eigenvalues(jxx, jxy, jyy)
    # A contiguous copy: torch may sum a strided view in another order.
    interior = tensor("b", (h, w)).copy_(smoothed[1:h + 1, 1:w + 1])
    return lam_max, lam_min, _patch_mean(interior, grid, p)


def _native_descriptors(dtype: torch.dtype):
    """The C++ descriptor function of ``kawhi_kernels._C`` for ``dtype``, or None without it."""
    module = load_extension()
    name = "sguf_descriptors_cpu_f32" if dtype == torch.float32 else "sguf_descriptors_cpu_f64"
    return getattr(module, name, None) if module is not None else None


def _descriptors_native(native, pixels: np.ndarray, grid: tuple[int, int], p: int,
                        kernel: list[float], dtype: torch.dtype):
    """(lam_max, lam_min, lightness) ``dtype`` [gh*gw] of one uint8 image via the C++ loop."""
    red_green, blue = _lookup_tables(dtype)
    parts = native(np.ascontiguousarray(pixels), grid[0], grid[1], p,
                   np.asarray(kernel, dtype=np.float64), red_green, blue,
                   float(_LAB_EPSILON), float(_LAB_KAPPA))
    return tuple(torch.from_numpy(x) for x in parts)


def patch_descriptors_cpu(image: torch.Tensor, grid: tuple[int, int], p: int, sigma: float,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lam_max, lam_min, lightness), ``dtype`` [gh*gw] (or [B, gh*gw]), of a validated CPU
    uint8 image [gh*p, gw*p, 3] (or batch [B, gh*p, gw*p, 3]); see
    :func:`kawhi_kernels.regions.descriptors.patch_descriptors`. The results never alias the
    workspace."""
    kernel = gaussian_kernel1d(sigma).tolist()
    pixels = image.numpy()
    native = _native_descriptors(dtype)
    if native is not None:
        def one(im):
            return _descriptors_native(native, im, grid, p, kernel, dtype)
    else:
        def one(im):
            return _descriptors_one(im, grid, p, kernel, dtype)
    if pixels.ndim == 3:
        return one(pixels)
    per_image = [one(im) for im in pixels]
    return tuple(torch.stack(parts) for parts in zip(*per_image))
