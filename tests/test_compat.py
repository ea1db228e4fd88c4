"""The version-compatibility layer (kawhi_kernels._compat) on the installed stack: each shim is
checked against the behaviour it papers over, so it fails when a release changes that."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported anywhere below

import pytest

from kawhi_kernels import _compat


def test_version_tuple_and_declared_minimums_match_the_installed_stack():
    assert _compat.version_tuple("3.6.0") == (3, 6, 0)
    assert _compat.version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert _compat.version_tuple("5.10.4.dev0") == (5, 10, 4)
    with pytest.raises(ValueError, match="version"):
        _compat.version_tuple("latest")
    transformers = _compat.package_version("transformers")
    assert transformers is not None and transformers >= _compat.TRANSFORMERS_MIN
    assert transformers != (5, 6, 0)
    triton = _compat.package_version("triton")
    if triton is not None:
        assert triton >= _compat.TRITON_MIN
    assert _compat.package_version("no-such-distribution-kawhi") is None


def test_pyproject_declares_the_same_minimums():
    text = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml")).read()
    assert '"triton>=%d.%d' % _compat.TRITON_MIN[:2] in text
    assert '"transformers>=%d.%d.%d,!=5.6.0' % _compat.TRANSFORMERS_MIN in text


def _mrope_by_hand(x, section):
    """Reference interleave: channel c belongs to chunk i of section*2 and takes axis i % 3."""
    bounds, start = [], 0
    for size in section * 2:
        bounds.append((start, start + size))
        start += size
    out = torch.empty_like(x[0])
    for i, (a, b) in enumerate(bounds):
        out[..., a:b] = x[i % 3][..., a:b]
    return out


def test_text_rotary_cos_sin_handles_both_layouts():
    from kawhi_kernels.integrations import tiny_qwen2_5_vl

    config = tiny_qwen2_5_vl().config.text_config
    section = _compat._mrope_section(config)
    d = 2 * sum(section)
    g = torch.Generator().manual_seed(0)
    cos, sin = torch.randn(3, 2, 5, d, generator=g), torch.randn(3, 2, 5, d, generator=g)
    got_cos, got_sin = _compat.text_rotary_cos_sin(cos, sin, config)
    assert got_cos.shape == (2, 5, d)
    assert torch.equal(got_cos, _mrope_by_hand(cos, section))
    assert torch.equal(got_sin, _mrope_by_hand(sin, section))
    flat = torch.randn(2, 5, d)
    assert _compat.text_rotary_cos_sin(flat, flat, config)[0] is flat
    with pytest.raises(ValueError, match="cos"):
        _compat.text_rotary_cos_sin(torch.randn(2, 2, 5, d), flat, config)


def test_text_rotary_cos_sin_matches_transformers_own_mrope_where_it_exists():
    """transformers <= 5.10 applies M-RoPE inside the attention layer; our interleave must give
    the same rotated q/k as its own function."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl

    apply_mrope = getattr(qwen2_vl, "apply_multimodal_rotary_pos_emb", None)
    if apply_mrope is None:
        pytest.skip("this transformers passes interleaved [B, L, D] position embeddings")
    from kawhi_kernels.integrations import tiny_qwen2_5_vl

    config = tiny_qwen2_5_vl().config.text_config
    section = _compat._mrope_section(config)
    d = 2 * sum(section)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 5, d, generator=g), torch.randn(2, 2, 5, d, generator=g)
    cos, sin = torch.randn(3, 2, 5, d, generator=g), torch.randn(3, 2, 5, d, generator=g)
    want_q, want_k = apply_mrope(q, k, cos, sin, section)
    c, s = (t.unsqueeze(1) for t in _compat.text_rotary_cos_sin(cos, sin, config))
    half = d // 2

    def rotate(x):
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    torch.testing.assert_close(q * c + rotate(q) * s, want_q)
    torch.testing.assert_close(k * c + rotate(k) * s, want_k)


def test_enable_activation_checkpointing_turns_it_on():
    from kawhi_kernels.integrations import tiny_qwen2_5_vl

    model = tiny_qwen2_5_vl(text_config={"num_hidden_layers": 2})
    assert not model.is_gradient_checkpointing
    _compat.enable_activation_checkpointing(model)
    assert model.is_gradient_checkpointing


triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402


@triton.jit
def _loop_over_loaded_bound(n_ptr, out_ptr):
    n = tl.load(n_ptr)
    total = 0
    for _ in range(0, tl.minimum(n, 100), 2):
        total += 1
    tl.store(out_ptr, total)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter behaviour")
def test_interpreter_accepts_loaded_loop_bounds():
    import kawhi_kernels.triton  # noqa: F401  (applies the patch on import)

    out = torch.zeros(1, dtype=torch.int32)
    _loop_over_loaded_bound[(1,)](torch.tensor([7], dtype=torch.int32), out)
    assert out.item() == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter behaviour")
def test_bf16_dot_operands_are_upcast_exactly_when_the_interpreter_needs_it():
    from kawhi_kernels.triton._utils import interpreter_dot_operands

    x = torch.randn(4, 8).to(torch.bfloat16)
    h = torch.randn(4, 8).to(torch.float16)
    up_x, same_h = interpreter_dot_operands(x, h)
    assert same_h is h
    if _compat.interpreter_computes_bf16_dot():
        assert up_x is x
    else:
        assert up_x.dtype == torch.float32 and torch.equal(up_x, x.float())
