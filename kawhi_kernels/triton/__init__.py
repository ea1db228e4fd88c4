"""Fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

Importing this package imports Triton; the public ops in :mod:`kawhi_kernels.ops` load these
functions lazily, so ``import kawhi_kernels`` never needs Triton.
"""
from .attention_mass import attention_mass_triton
from .cosine_alignment import cosine_alignment_triton
from .grid_pyramid import grid_pyramid_triton
from .sguf_descriptors import patch_descriptors_triton

__all__ = [
    "attention_mass_triton",
    "cosine_alignment_triton",
    "grid_pyramid_triton",
    "patch_descriptors_triton",
]
