"""Fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

Importing this package imports Triton; the public ops in :mod:`kawhi_kernels.ops` load these
functions lazily, so ``import kawhi_kernels`` never needs Triton.
"""
from .._compat import patch_triton_interpreter

patch_triton_interpreter()     # Triton < 3.7 interpreter + NumPy >= 2.4 (see _compat)

from .attention_mass import attention_mass_triton  # noqa: E402
from .cosine_alignment import cosine_alignment_triton  # noqa: E402
from .grid_pyramid import grid_pyramid_triton  # noqa: E402
from .sguf_descriptors import patch_descriptors_triton  # noqa: E402

__all__ = [
    "attention_mass_triton",
    "cosine_alignment_triton",
    "grid_pyramid_triton",
    "patch_descriptors_triton",
]
