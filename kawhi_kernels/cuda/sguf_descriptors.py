"""CUDA SGUF per-patch descriptors (csrc/sguf_descriptors.cu), thin wrapper.

Same pipeline and result as :func:`kawhi_kernels.regions.patch_descriptors` in float32: CIELab
lightness through the reference's per-channel lookup tables, Gaussian smoothing (scipy
``gaussian_filter``, mode "reflect", truncate 4), Sobel gradients, patch-mean structure tensor,
its eigenvalues and the patch-mean lightness. One fused kernel for the whole batch, one thread
block per patch (halo staged in shared memory).
"""
from __future__ import annotations

import torch

from .._validation import check_real
from ..regions.descriptors import check_grid_hw, check_image, gaussian_kernel1d, luminance_tables, patch_size
from ._launch import device_index, extension_for, make_args, ptr, stream_handle


def patch_descriptors_cuda(image, grid_hw, sigma: float = 1.0):
    """Per-patch SGUF descriptors of one image or a batch on the GPU.

    Args:
        image: uint8 RGB CUDA tensor [H, W, 3] or [B, H, W, 3], H = gh·P and W = gw·P for one
            square patch size P.
        grid_hw: (gh, gw) token grid; patch (r, c) is token r·gw + c.
        sigma: Gaussian smoothing of the lightness (> 0; truncate 4.0 as scipy). The kernel
            stages a (P + 2·(radius + 1))² tile in shared memory: a ValueError says when a large
            P or sigma does not fit the device.

    Returns:
        (lam_max, lam_min, lightness): fp32 [N] each (N = gh·gw), or [B, N] for a batch.
    """
    image = check_image(image, allow_batch=True)
    gh, gw = check_grid_hw(grid_hw)
    sigma = check_real("sigma", sigma, low=0.0, low_inclusive=False)
    patch = patch_size((image.shape[-3], image.shape[-2]), (gh, gw))
    ext = extension_for(image.device, "sguf_descriptors")
    batched = image.dim() == 4
    images = (image if batched else image.unsqueeze(0)).contiguous()
    num_images, device = images.shape[0], image.device
    outs = [torch.empty(num_images, gh * gw, dtype=torch.float32, device=device) for _ in range(3)]
    weights = gaussian_kernel1d(sigma).to(device=device, dtype=torch.float32)
    luts = luminance_tables(device, torch.float32)
    stride_b, stride_y, stride_x, stride_c = images.stride()
    lam_max, lam_min, lightness = (ptr(o) for o in outs)
    a = make_args(
        ext, "sguf_descriptors", image=ptr(images), num_images=num_images,
        height=images.shape[1], width=images.shape[2], stride_b=stride_b, stride_y=stride_y,
        stride_x=stride_x, stride_c=stride_c, grid_h=gh, grid_w=gw, patch=patch, lut=ptr(luts),
        weights=ptr(weights), radius=(weights.numel() - 1) // 2, lam_max=lam_max,
        lam_min=lam_min, lightness=lightness, stream=stream_handle(device),
        device=device_index(device))
    ext.sguf_descriptors(a)
    del weights, luts  # stream-ordered reuse only (see attention_mass_cuda)
    return tuple(o if batched else o[0] for o in outs)
