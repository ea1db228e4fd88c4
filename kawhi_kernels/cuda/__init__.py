"""Hand-written CUDA backend: thin wrappers around the kernels of ``kawhi_kernels._C``.

Each wrapper passes raw device pointers, sizes, strides, a dtype code and torch's current stream
to the extension (which never links torch). They need a CUDA build of the extension and CUDA
tensors; :func:`kawhi_kernels._extension.cuda_backend_problem` says why the backend cannot run
where it cannot. The public ops send fp64 inputs to the torch reference.
"""
from .attention_mass import attention_mass_cuda
from .cosine_alignment import cosine_alignment_cuda
from .grid_pyramid import grid_pyramid_cuda
from .sguf_descriptors import patch_descriptors_cuda

__all__ = ["attention_mass_cuda", "cosine_alignment_cuda", "grid_pyramid_cuda",
           "patch_descriptors_cuda"]
