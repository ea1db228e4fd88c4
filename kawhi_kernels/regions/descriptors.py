"""Per-patch structure descriptors for SGUF (DESIGN.md section 1, step 1), in PyTorch.

Pipeline, on CPU or CUDA tensors, in float32 (default) or float64:

1. lightness L of CIELab from sRGB uint8, as ``skimage.color.rgb2lab`` (D65, 2° observer;
   only Y is needed: L = 116 f(Y) - 16, range 0..100);
2. ``scipy.ndimage.gaussian_filter(L, sigma, mode="reflect", truncate=4.0)``;
3. ``scipy.ndimage.sobel(., axis=1)`` (gx) and ``axis=0`` (gy), mode "reflect", unnormalised;
4. per P x P patch: structure tensor J = mean([[gx², gx·gy], [gx·gy, gy²]]), its eigenvalues
   λmax ≥ λmin ≥ 0 (closed form), and the mean smoothed lightness.

scipy's "reflect" mode is the half-sample symmetric extension (d c b a | a b c d | d c b a).
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .._validation import check_real

_DESCRIPTOR_DTYPES = (torch.float32, torch.float64)

# sRGB (D65) -> XYZ, row Y, as skimage.color.colorconv.xyz_from_rgb[1].
_Y_FROM_LINEAR_RGB = (0.212671, 0.715160, 0.072169)
_LAB_EPSILON = 0.008856  # skimage's threshold of the CIELab f() branch
_LAB_KAPPA = 7.787
_GAUSSIAN_TRUNCATE = 4.0


# ----------------------------------------------------------------------------- validation

def check_image(value, name: str = "image", *, allow_batch: bool = False) -> torch.Tensor:
    """Check an RGB image, [H, W, 3] (or [B, H, W, 3] when ``allow_batch``); return it as a uint8
    tensor.

    Accepted: uint8 torch tensors and numpy arrays (numpy is wrapped, not copied); PIL images
    (converted to RGB); float tensors/arrays with values in [0, 1] (converted as
    ``round(255 · x)``, so an image read as floats gives the same regions as its uint8 file).
    """
    if _is_pil_image(value):
        value = np.asarray(value.convert("RGB"))
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            value = torch.from_numpy(np.ascontiguousarray(value))
        elif value.dtype != np.uint8:
            raise TypeError(f"{name}: expected dtype uint8 (or floats in [0, 1]), got numpy "
                            f"{value.dtype}; for 16-bit images divide by 65535 first")
        else:
            if not value.flags.writeable:  # torch warns on read-only buffers (e.g. PIL arrays)
                value = value.copy()
            value = torch.from_numpy(np.ascontiguousarray(value))
    elif not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected an RGB image as a uint8 torch.Tensor / numpy array "
                        f"[H, W, 3], a PIL image, or floats in [0, 1]; got {type(value).__name__}")
    if value.is_floating_point():
        value = _float_image_to_uint8(name, value)
    if value.dtype != torch.uint8:
        raise TypeError(f"{name}: expected dtype uint8 (or floats in [0, 1]), got {value.dtype}")
    ranks = (3, 4) if allow_batch else (3,)
    if value.dim() not in ranks:
        want = "[H, W, 3] or [B, H, W, 3]" if allow_batch else "[H, W, 3]"
        raise ValueError(f"{name}: expected an RGB image {want}, got shape {tuple(value.shape)}")
    if value.shape[-1] != 3:
        raise ValueError(f"{name}: expected 3 channels (RGB) in the last dimension, "
                         f"got shape {tuple(value.shape)}")
    if value.shape[-2] == 0 or value.shape[-3] == 0:
        raise ValueError(f"{name}: image is empty, shape {tuple(value.shape)}")
    return value


def _is_pil_image(value) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(value, Image.Image)


def _float_image_to_uint8(name: str, value: torch.Tensor) -> torch.Tensor:
    """round(255 · x) for a float image with every value in [0, 1]; ValueError otherwise."""
    if value.numel():
        lo, hi = float(value.min()), float(value.max())
        if not (0.0 <= lo and hi <= 1.0):          # also false for NaN
            raise ValueError(f"{name}: float images must hold values in [0, 1], got range "
                             f"[{lo}, {hi}]; pass uint8 for 0-255 data")
    return torch.round(value.to(torch.float64) * 255.0).to(torch.uint8)


def check_grid_hw(value, name: str = "grid_hw") -> tuple[int, int]:
    """Check a token-grid size (gh, gw) of two positive ints; return it as a tuple."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name}: expected a pair (gh, gw) of positive ints, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name}: expected a pair (gh, gw) of positive ints, got {value!r}")
        if int(v) < 1:
            raise ValueError(f"{name}: expected positive grid sizes, got {tuple(value)}")
        out.append(int(v))
    return out[0], out[1]


def patch_size(image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> int:
    """Square patch size P with image_hw == (gh*P, gw*P); raise ValueError otherwise."""
    (h, w), (gh, gw) = image_hw, grid_hw
    if h % gh == 0 and w % gw == 0 and h // gh == w // gw:
        return h // gh
    raise ValueError(
        f"image: size {h}x{w} (HxW) is not (gh*P) x (gw*P) for grid_hw={grid_hw} with one "
        f"square patch size P; resize the image to a multiple of the patch size first")


def check_dtype(dtype) -> torch.dtype:
    """Check the descriptor computation dtype: torch.float32 or torch.float64; return it."""
    if dtype not in _DESCRIPTOR_DTYPES:
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype!r}")
    return dtype


# ----------------------------------------------------------------------------- stages

def _check_uint8_rgb(image) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() < 3 \
            or image.shape[-1] != 3:
        got = (f"{image.dtype} tensor of shape {tuple(image.shape)}"
               if isinstance(image, torch.Tensor) else type(image).__name__)
        raise TypeError(f"image: expected a uint8 tensor [..., H, W, 3], got {got}")


def luminance_tables(device, dtype: torch.dtype) -> torch.Tensor:
    """[3, 256] per-channel lookup tables: linearised sRGB value × the Y row of the sRGB→XYZ
    matrix, computed in float64 and rounded once to ``dtype`` (shared by every backend)."""
    v = torch.arange(256, dtype=torch.float64) / 255.0
    linear = torch.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
    return torch.stack([linear * c for c in _Y_FROM_LINEAR_RGB]).to(device, dtype)


def srgb_to_lightness(image: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CIELab lightness of an sRGB uint8 image, as ``skimage.color.rgb2lab(image)[..., 0]``.

    image: uint8 [..., H, W, 3] (CPU or CUDA). Returns ``dtype`` [..., H, W] in [0, 100].
    """
    _check_uint8_rgb(image)
    check_dtype(dtype)
    luts = luminance_tables(image.device, dtype)
    y = luts[0][image[..., 0].long()]  # one channel at a time keeps int64 temporaries small
    y = y + luts[1][image[..., 1].long()]
    y = y + luts[2][image[..., 2].long()]
    # Reference white Y = 1 for D65/2°, so no scaling of Y.
    f = torch.where(y > _LAB_EPSILON,
                    y.clamp_min(_LAB_EPSILON).pow(1.0 / 3.0),
                    _LAB_KAPPA * y + 16.0 / 116.0)
    return 116.0 * f - 16.0


def gaussian_kernel1d(sigma: float, *, truncate: float = _GAUSSIAN_TRUNCATE) -> torch.Tensor:
    """Normalised 1-D Gaussian weights as scipy.ndimage uses them: radius int(truncate*sigma+0.5),
    float64 [2*radius + 1]."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 / (float(sigma) ** 2) * x * x)
    return phi / phi.sum()


def reflect_indices(n: int, radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices into a length-``n`` axis for positions -radius .. n-1+radius under scipy's
    "reflect" (half-sample symmetric) extension; int64 [n + 2*radius]. Valid for any n >= 1."""
    pos = torch.arange(-radius, n + radius, device=device, dtype=torch.int64)
    period = 2 * n
    pos = torch.remainder(pos, period)
    return torch.where(pos >= n, period - 1 - pos, pos)


def correlate1d(x: torch.Tensor, weights, dim: int) -> torch.Tensor:
    """1-D correlation along ``dim`` with an odd-length kernel, scipy "reflect" boundary,
    centred (origin 0): out[i] = sum_k weights[k] * x[i + k - radius]. Same shape as ``x``."""
    weights = [float(w) for w in weights]
    if len(weights) % 2 != 1:
        raise ValueError(f"weights: expected an odd number of taps, got {len(weights)}")
    radius = len(weights) // 2
    n = x.shape[dim]
    padded = x.index_select(dim, reflect_indices(n, radius, x.device))
    out = None
    for k, w in enumerate(weights):
        if w == 0.0:
            continue
        term = padded.narrow(dim, k, n)
        out = term * w if out is None else out.add_(term, alpha=w)
    return out if out is not None else torch.zeros_like(x)


def gaussian_smooth(lightness: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(L, sigma, mode="reflect", truncate=4.0)`` over the last two
    dims of ``lightness`` [..., H, W] (rows first, then columns, as scipy). Same shape/dtype."""
    sigma = check_real("sigma", sigma, low=0.0, low_inclusive=False)
    kernel = gaussian_kernel1d(sigma).tolist()
    return correlate1d(correlate1d(lightness, kernel, -2), kernel, -1)


def sobel_gradients(smoothed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised Sobel gradients over the last two dims of [..., H, W], mode "reflect":
    gx = ``scipy.ndimage.sobel(., axis=1)`` (along columns), gy = ``axis=0`` (along rows)."""
    diff, smooth = (-1.0, 0.0, 1.0), (1.0, 2.0, 1.0)
    gx = correlate1d(correlate1d(smoothed, diff, -1), smooth, -2)
    gy = correlate1d(correlate1d(smoothed, diff, -2), smooth, -1)
    return gx, gy


def _patch_mean(x: torch.Tensor, grid_hw: tuple[int, int], p: int) -> torch.Tensor:
    """Mean over P x P patches of [..., gh*P, gw*P] -> [..., gh*gw] in raster order."""
    gh, gw = grid_hw
    lead = x.shape[:-2]
    return x.reshape(*lead, gh, p, gw, p).mean(dim=(-3, -1)).reshape(*lead, gh * gw)


def structure_eigenvalues(jxx: torch.Tensor, jxy: torch.Tensor,
                          jyy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (λmax, λmin) of symmetric 2x2 matrices [[jxx, jxy], [jxy, jyy]] in closed
    form, clamped to >= 0 (structure tensors are positive semi-definite)."""
    half_trace = 0.5 * (jxx + jyy)
    radius = torch.hypot(0.5 * (jxx - jyy), jxy)
    lam_max = (half_trace + radius).clamp_min(0.0)
    lam_min = (half_trace - radius).clamp_min(0.0)
    return lam_max, lam_min


# ----------------------------------------------------------------------------- public entry

def patch_descriptors(image, grid_hw, *, sigma: float = 1.0,
                      dtype: torch.dtype = torch.float32
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch SGUF descriptors of an RGB image on its gh x gw token grid.

    Args:
        image: uint8 RGB [H, W, 3] (or a batch [B, H, W, 3] of same-size images), torch tensor
            (CPU or CUDA) or numpy array, with H = gh*P and W = gw*P for one square patch size
            P >= 1 (inferred).
        grid_hw: (gh, gw) positive ints; patch (r, c) is token r*gw + c.
        sigma: Gaussian smoothing of the lightness (> 0; truncate 4.0 as scipy).
        dtype: torch.float32 (default) or torch.float64 for every computation after the uint8
            lookup.

    Returns:
        (lam_max, lam_min, lightness), each ``dtype`` [N] (or [B, N]) with N = gh*gw, on the
        image's device: eigenvalues λmax >= λmin >= 0 of the patch-mean structure tensor of the
        Sobel gradients of smoothed CIELab L, and the patch-mean smoothed L (0..100).
        CPU images take the fast path of :mod:`.descriptors_cpu` (same values; L may differ from
        :func:`patch_descriptors_reference` by an ulp, the cube root being exact there).
    """
    image = check_image(image, allow_batch=True)
    grid = check_grid_hw(grid_hw)
    sigma = check_real("sigma", sigma, low=0.0, low_inclusive=False)
    check_dtype(dtype)
    p = patch_size((image.shape[-3], image.shape[-2]), grid)
    if image.device.type == "cpu":
        from .descriptors_cpu import patch_descriptors_cpu
        return patch_descriptors_cpu(image, grid, p, sigma, dtype)
    return _patch_descriptors_staged(image, grid, p, sigma, dtype)


def patch_descriptors_reference(image, grid_hw, *, sigma: float = 1.0,
                                dtype: torch.dtype = torch.float32
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`patch_descriptors` stage by stage (lightness, Gaussian, Sobel, patch means) on the
    image's device, CPU included: the readable reference the fast CPU path
    (:mod:`.descriptors_cpu`) is tested against. Same arguments and results."""
    image = check_image(image, allow_batch=True)
    grid = check_grid_hw(grid_hw)
    sigma = check_real("sigma", sigma, low=0.0, low_inclusive=False)
    check_dtype(dtype)
    p = patch_size((image.shape[-3], image.shape[-2]), grid)
    return _patch_descriptors_staged(image, grid, p, sigma, dtype)


def _patch_descriptors_staged(image: torch.Tensor, grid: tuple[int, int], p: int, sigma: float,
                              dtype: torch.dtype):
    smoothed = gaussian_smooth(srgb_to_lightness(image, dtype=dtype), sigma)
    gx, gy = sobel_gradients(smoothed)
    jxx = _patch_mean(gx * gx, grid, p)
    jxy = _patch_mean(gx * gy, grid, p)
    jyy = _patch_mean(gy * gy, grid, p)
    lam_max, lam_min = structure_eigenvalues(jxx, jxy, jyy)
    return lam_max, lam_min, _patch_mean(smoothed, grid, p)
