"""Backend choice for the SGUF per-patch descriptor stage (λmax, λmin, patch lightness)."""
from __future__ import annotations

import torch

from .._backend import resolve_backend
from ._dispatch import load_implementation

IMPLEMENTATIONS = {
    "torch": "kawhi_kernels.regions.descriptors:patch_descriptors",
    "triton": "kawhi_kernels.triton.sguf_descriptors:patch_descriptors_triton",
    "cuda": "kawhi_kernels.cuda.sguf_descriptors:patch_descriptors_cuda",
}


def patch_descriptors_on_backend(image: torch.Tensor, grid_hw: tuple[int, int], *, sigma: float,
                                 dtype: torch.dtype, backend: str):
    """Descriptors of a validated uint8 image [H, W, 3] or batch [B, H, W, 3] on ``backend``.

    The fused backends compute in float32 only: ``auto`` uses them for float32 on CUDA images,
    and forcing one with ``dtype=torch.float64`` is an error. Returns (lam_max, lam_min,
    lightness), [N] or [B, N].
    """
    device = image.device if isinstance(image, torch.Tensor) else torch.device("cpu")
    if backend == "auto" and dtype != torch.float32:
        backend = "torch"
    resolved = resolve_backend(backend, device, "patch_descriptors", tuple(IMPLEMENTATIONS))
    if resolved == "torch":
        return load_implementation(IMPLEMENTATIONS["torch"])(image, grid_hw, sigma=sigma, dtype=dtype)
    if dtype != torch.float32:
        raise ValueError(f"dtype: backend={resolved!r} computes SGUF descriptors in float32 only, "
                         f"got {dtype}; use backend='torch' for float64")
    return load_implementation(IMPLEMENTATIONS[resolved])(image, grid_hw, sigma=sigma)
