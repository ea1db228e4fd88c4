"""Shared pytest fixtures, and the Triton interpreter switch for machines without a GPU."""
import os
import sys

import pytest
import torch

# Without a CUDA device the Triton tests run in Triton's interpreter, and TRITON_INTERPRET=1 must
# be set before *anything* imports triton: ``@triton.jit`` picks interpreted or compiled when it
# decorates, and ``import triton`` decorates triton.language's own helpers (``tl.zeros``,
# ``tl.sum``'s combine function, …). Setting it only in each Triton test module was too late when
# another module imported triton first at collection — e.g. tests/test_cuda_static_sass.py calls
# ``cuobjdump_path()`` (``import triton``) at import — and the interpreter then failed with
# "Cannot call @triton.jit'd outside of the scope of a kernel" (regression test:
# tests/test_capture_lse.py::test_triton_language_is_interpreted_whatever_the_collection_order).
# A full-suite run already had it set for every test (an early module sets it at collection), so
# this only makes subsets behave like the full suite. Compilation checks run in subprocesses
# without it (tests/test_triton_static_builds.py).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def tiny_vl_family(request):
    """(family name, builder) for each tiny random Qwen-VL model: builder(seed=0,
    attn_implementation="sdpa", dtype=torch.float32, **overrides) -> model in eval mode."""
    from kawhi_kernels.integrations import tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl

    builders = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}
    return request.param, builders[request.param]
