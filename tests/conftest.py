"""Shared pytest fixtures."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def tiny_vl_family(request):
    """(family name, builder) for each tiny random Qwen-VL model: builder(seed=0,
    attn_implementation="sdpa", dtype=torch.float32, **overrides) -> model in eval mode."""
    from kawhi_kernels.integrations import tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl

    builders = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}
    return request.param, builders[request.param]
