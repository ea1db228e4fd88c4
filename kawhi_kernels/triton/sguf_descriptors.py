"""Fused Triton SGUF per-patch descriptors: structure-tensor eigenvalues and mean lightness.

For every P × P patch of a uint8 RGB image on a gh × gw token grid (DESIGN.md §1, step 1):
  L  = CIELab lightness as ``skimage.color.rgb2lab`` (sRGB linearised through a 256-entry table,
       Y = 0.212671 R + 0.715160 G + 0.072169 B, L = 116 f(Y) − 16),
  S  = ``scipy.ndimage.gaussian_filter(L, sigma, mode="reflect", truncate=4.0)``,
  gx = ``sobel(S, axis=1)``, gy = ``sobel(S, axis=0)`` (mode "reflect", unnormalised),
  J  = patch mean of [[gx², gx·gy], [gx·gy, gy²]] → eigenvalues λmax ≥ λmin ≥ 0 (closed form),
  lightness = patch mean of S.

One kernel launch per image batch; each program handles one patch at a time (persistent loop
over patches). It computes L on the patch plus a halo of radius + 1 pixels (half-sample
symmetric reflection at the image border, periodic beyond it as scipy's "reflect"), then the
separable Gaussian and the Sobel stencils through a per-program scratch tile in global memory
(two E × E fp32 tiles, E = next power of two of P + 2·(radius + 1)), with a CTA barrier between
stages. Because the reflected L is symmetric about the border and the Gaussian is symmetric,
the smoothed values on the halo equal scipy's reflected smoothed image, so the Sobel halo needs
no special case. fp32 throughout.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .._backend import triton_unavailable_reason
from ..regions.descriptors import (
    check_grid_hw,
    check_image,
    check_real,
    gaussian_kernel1d,
    patch_size,
)
from ._utils import device_guard, launch_options, next_pow2

# Programs launched at most (each loops over patches); bounds the scratch memory.
MAX_PROGRAMS = 1024


@triton.jit
def _patch_descriptor_kernel(
    img_ptr, lut_ptr, weight_ptr, scratch_ptr, lam_max_ptr, lam_min_ptr, light_ptr,
    stride_ib, stride_iy, stride_ix, stride_ic,
    height, width, grid_w, patches_per_image, total_patches, patch,
    RADIUS: tl.constexpr, E: tl.constexpr, PP: tl.constexpr,
):
    HALO: tl.constexpr = RADIUS + 1
    TAPS: tl.constexpr = 2 * RADIUS + 1
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tile_a = scratch_ptr + pid.to(tl.int64) * (2 * E * E)
    tile_b = tile_a + E * E
    ty = tl.arange(0, E)[:, None]
    tx = tl.arange(0, E)[None, :]
    span = patch + 2 * HALO                     # rows/cols of L needed
    inner = patch + 2                           # rows/cols of smoothed L needed by Sobel
    py = tl.arange(0, PP)[:, None]
    px = tl.arange(0, PP)[None, :]
    p_ok = (py < patch) & (px < patch)
    inv_area = 1.0 / (patch * patch)      # (an int argument equal to 1 arrives as a constexpr)
    for idx in range(pid, total_patches, nprog):
        b = idx // patches_per_image
        cell = idx % patches_per_image
        y0 = (cell // grid_w) * patch
        x0 = (cell % grid_w) * patch
        # stage 1: lightness on patch + halo, reflected indices
        y = y0 - HALO + ty
        x = x0 - HALO + tx
        y = (y % (2 * height) + 2 * height) % (2 * height)
        x = (x % (2 * width) + 2 * width) % (2 * width)
        y = tl.where(y >= height, 2 * height - 1 - y, y)
        x = tl.where(x >= width, 2 * width - 1 - x, x)
        ok = (ty < span) & (tx < span)
        pix = (img_ptr + b.to(tl.int64) * stride_ib + y.to(tl.int64) * stride_iy
               + x.to(tl.int64) * stride_ix)
        red = tl.load(lut_ptr + tl.load(pix, mask=ok, other=0).to(tl.int32))
        green = tl.load(lut_ptr + tl.load(pix + stride_ic, mask=ok, other=0).to(tl.int32))
        blue = tl.load(lut_ptr + tl.load(pix + 2 * stride_ic, mask=ok, other=0).to(tl.int32))
        lum = 0.212671 * red + 0.715160 * green + 0.072169 * blue
        cube_root = tl.exp2(tl.log2(tl.maximum(lum, 1e-30)) * (1.0 / 3.0))
        f = tl.where(lum > 0.008856, cube_root, 7.787 * lum + 16.0 / 116.0)
        tl.store(tile_a + ty * E + tx, 116.0 * f - 16.0, mask=ok)
        tl.debug_barrier()
        # stage 2: Gaussian along x (rows of the halo, columns of the Sobel region)
        ok = (ty < span) & (tx < inner)
        acc = tl.zeros([E, E], dtype=tl.float32)
        for j in tl.static_range(TAPS):
            acc += tl.load(weight_ptr + j) * tl.load(tile_a + ty * E + tx + j, mask=ok, other=0.0)
        tl.store(tile_b + ty * E + tx, acc, mask=ok)
        tl.debug_barrier()
        # stage 3: Gaussian along y → smoothed L on the patch plus a 1-pixel ring
        ok = (ty < inner) & (tx < inner)
        acc = tl.zeros([E, E], dtype=tl.float32)
        for i in tl.static_range(TAPS):
            acc += tl.load(weight_ptr + i) * tl.load(tile_b + (ty + i) * E + tx, mask=ok, other=0.0)
        tl.store(tile_a + ty * E + tx, acc, mask=ok)
        tl.debug_barrier()
        # stage 4: Sobel (central difference × [1, 2, 1] smoothing), structure tensor, means
        gx = tl.zeros([PP, PP], dtype=tl.float32)
        gy = tl.zeros([PP, PP], dtype=tl.float32)
        for t in tl.static_range(3):
            wt = 2.0 - (t - 1) * (t - 1)        # 1, 2, 1
            gx += wt * (tl.load(tile_a + (py + t) * E + px + 2, mask=p_ok, other=0.0)
                        - tl.load(tile_a + (py + t) * E + px, mask=p_ok, other=0.0))
            gy += wt * (tl.load(tile_a + (py + 2) * E + px + t, mask=p_ok, other=0.0)
                        - tl.load(tile_a + py * E + px + t, mask=p_ok, other=0.0))
        smooth = tl.load(tile_a + (py + 1) * E + px + 1, mask=p_ok, other=0.0)
        jxx = tl.sum(tl.sum(gx * gx, axis=1), axis=0) * inv_area
        jyy = tl.sum(tl.sum(gy * gy, axis=1), axis=0) * inv_area
        jxy = tl.sum(tl.sum(gx * gy, axis=1), axis=0) * inv_area
        half_trace = 0.5 * (jxx + jyy)
        half_diff = 0.5 * (jxx - jyy)
        disc = tl.sqrt_rn(half_diff * half_diff + jxy * jxy)
        tl.store(lam_max_ptr + idx, tl.maximum(half_trace + disc, 0.0))
        tl.store(lam_min_ptr + idx, tl.maximum(half_trace - disc, 0.0))
        tl.store(light_ptr + idx, tl.sum(tl.sum(smooth, axis=1), axis=0) * inv_area)
        tl.debug_barrier()


def _srgb_linear_table() -> torch.Tensor:
    """fp32 [256]: uint8 sRGB value → linear RGB in [0, 1] (``skimage.color.rgb2xyz``)."""
    v = np.arange(256, dtype=np.float64) / 255.0
    lin = np.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
    return torch.from_numpy(lin.astype(np.float32))


_NUM_WARPS = 8


def _launch_meta(patch: int, radius: int) -> dict:
    """Constexprs of a descriptor launch: Gaussian radius, scratch tile side E (patch plus the
    halo, a power of two) and the padded patch side."""
    return dict(RADIUS=radius, E=next_pow2(patch + 2 * (radius + 1)), PP=next_pow2(patch))


def kernel_builds():
    """Compiled configurations for the static GPU checks (:mod:`.builds`): the default σ = 1 at
    the patch sides of common vision towers (14, 16 px; 28, 32 px after a 2×2 merge)."""
    from .builds import KernelBuild

    radius = (gaussian_kernel1d(1.0).numel() - 1) // 2
    return [KernelBuild(name=f"sguf descriptors patch={p} sigma=1", kernel=_patch_descriptor_kernel,
                        pointer_types={"img_ptr": "*u8", "lut_ptr": "*fp32", "weight_ptr": "*fp32",
                                       "scratch_ptr": "*fp32", "lam_max_ptr": "*fp32",
                                       "lam_min_ptr": "*fp32", "light_ptr": "*fp32"},
                        float_args=(), constexprs=_launch_meta(p, radius), num_warps=_NUM_WARPS,
                        num_stages=3, tensor_cores=False)
            for p in (14, 16, 28, 32)]


def patch_descriptors_triton(image: torch.Tensor, grid_hw, sigma: float = 1.0):
    """Per-patch SGUF descriptors of one image or a batch, in one fused Triton kernel.

    Args:
        image: uint8 RGB [H, W, 3] or [B, H, W, 3] (tensor, or numpy on CPU), H = gh·P,
            W = gw·P (CUDA, or CPU under ``TRITON_INTERPRET=1``). Validated as
            :func:`kawhi_kernels.regions.patch_descriptors` validates it.
        grid_hw: (gh, gw) token grid; patch (r, c) is token r·gw + c.
        sigma: Gaussian smoothing of the lightness (truncate 4, as scipy).

    Returns:
        (lam_max, lam_min, lightness): fp32 [N] each (N = gh·gw), or [B, N] for a batch;
        λmax ≥ λmin ≥ 0 of the patch-mean structure tensor, and the patch-mean smoothed L (0–100).
    """
    image = check_image(image, allow_batch=True)
    gh, gw = check_grid_hw(grid_hw)
    sigma = check_real("sigma", sigma, low=0.0, low_inclusive=False)
    patch = patch_size((image.shape[-3], image.shape[-2]), (gh, gw))
    reason = triton_unavailable_reason(image.device)
    if reason is not None:
        raise RuntimeError(f"image: cannot run the Triton descriptor kernel: {reason}")
    batched = image.dim() == 4
    images = image if batched else image.unsqueeze(0)
    num_images, device = images.shape[0], image.device
    n = gh * gw
    outs = [torch.zeros(num_images, n, dtype=torch.float32, device=device) for _ in range(3)]
    total = num_images * n
    if total:
        weights = gaussian_kernel1d(sigma).to(device=device, dtype=torch.float32)
        radius = (weights.numel() - 1) // 2
        meta = _launch_meta(patch, radius)
        programs = min(total, MAX_PROGRAMS)
        scratch = torch.empty(programs * 2 * meta["E"] ** 2, dtype=torch.float32, device=device)
        extra = launch_options(_NUM_WARPS)
        lut = _srgb_linear_table().to(device)
        with device_guard(device):              # Triton launches on the current device
            _patch_descriptor_kernel[(programs,)](
                images, lut, weights, scratch, *outs,
                images.stride(0), images.stride(1), images.stride(2), images.stride(3),
                images.shape[1], images.shape[2], gw, n, total, patch,
                **meta, **extra)
    return tuple(o if batched else o[0] for o in outs)
