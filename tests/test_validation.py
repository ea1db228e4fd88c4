"""Every documented input rule of the tensor ops raises a clear error naming the argument."""
import pytest
import torch

from kawhi_kernels.ops.attention_mass import attention_mass
from kawhi_kernels.ops.cosine_alignment import cosine_alignment


def good_inputs():
    q = torch.randn(5, 4, 16)
    k = torch.randn(7, 2, 16)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 7], dtype=torch.int32)
    key_region = torch.tensor([0, 1, -1, 2, 0, -1, 1], dtype=torch.int32)
    return dict(q=q, k=k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, key_region=key_region, num_regions=3)


def call_mass(**overrides):
    args = good_inputs()
    kwargs = {name: overrides.pop(name) for name in list(overrides) if name not in args}
    args.update(overrides)
    return attention_mass(**args, backend=kwargs.pop("backend", "torch"), **kwargs)


def test_good_inputs_pass():
    assert call_mass().shape == (5, 4, 3)


BAD = [
    # (overrides, exception, message fragment)
    (dict(q=[[1.0]]), TypeError, "q: expected a torch.Tensor"),
    (dict(q=torch.randn(5, 4)), ValueError, "q: expected a 3-D"),
    (dict(q=torch.randint(0, 3, (5, 4, 16))), TypeError, "q: expected dtype"),
    (dict(k=torch.randn(7, 2, 16).half()), TypeError, "k: expected the same dtype"),
    (dict(k=torch.randn(7, 3, 16)), ValueError, "KV heads"),                       # wrong head ratio
    (dict(k=torch.randn(7, 2, 8)), ValueError, "k: expected head dim"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 5.0])), TypeError, "cu_seqlens_q: expected dtype"),
    (dict(cu_seqlens_q=torch.tensor([1, 2, 5], dtype=torch.int32)), ValueError, "cu_seqlens_q: must start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 3, 5], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, "cu_seqlens_k: last entry"),
    (dict(cu_seqlens_k=torch.tensor([0, 2, 3, 7], dtype=torch.int32)), ValueError, "cu_seqlens_k: expected 3 entries"),
    (dict(cu_seqlens_q=torch.tensor([0], dtype=torch.int32), q=torch.randn(0, 4, 16)), ValueError, "B >= 1"),
    (dict(key_region=torch.tensor([0, 1, -1, 3, 0, -1, 1], dtype=torch.int32)), ValueError, "key_region: values must be in"),
    (dict(key_region=torch.tensor([0, 1, -2, 2, 0, -1, 1], dtype=torch.int32)), ValueError, "key_region: values must be in"),
    (dict(key_region=torch.zeros(6, dtype=torch.int32)), ValueError, "key_region: expected 7 entries"),
    (dict(num_regions=-1), ValueError, "num_regions"),
    (dict(num_regions=2.0), TypeError, "num_regions"),
    (dict(query_segment=torch.zeros(5, dtype=torch.int32)), ValueError, "pass both or neither"),
    (dict(query_segment=torch.tensor([0, 1, 2, 0, 0], dtype=torch.int32), num_segments=2), ValueError, "query_segment: values"),
    (dict(heads=[0, 4]), ValueError, "heads: indices must be in"),
    (dict(heads=[1, 1]), ValueError, "heads: indices must be distinct"),
    (dict(heads=[]), ValueError, "heads: expected at least one"),
    (dict(heads=[0.5]), TypeError, "heads"),
    (dict(lse=torch.zeros(4, 4)), ValueError, "lse: expected shape"),
    (dict(lse=torch.zeros(4, 5, dtype=torch.float64)), TypeError, "lse: expected dtype"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(causal=1), TypeError, "causal"),
    (dict(backend="tpu"), ValueError, "backend: expected one of"),
]


@pytest.mark.parametrize("overrides,exc,fragment", BAD, ids=[b[2] for b in BAD])
def test_attention_mass_rejects(overrides, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call_mass(**overrides)


def test_check_finite_rejects_nan_and_inf():
    q = torch.randn(5, 4, 16)
    q[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="q: contains NaN or Inf"):
        call_mass(q=q, check_finite=True)
    k = torch.randn(7, 2, 16)
    k[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="k: contains NaN or Inf"):
        call_mass(k=k, check_finite=True)
    lse = torch.zeros(4, 5)
    lse[0, 0] = float("nan")
    with pytest.raises(ValueError, match="lse: contains NaN"):
        call_mass(lse=lse, check_finite=True)
    lse[0, 0] = float("-inf")  # on a row that sees keys: its mass would silently be 0
    with pytest.raises(ValueError, match="lse: ±inf on a row that sees keys"):
        call_mass(lse=lse, check_finite=True)
    # Rows with no visible key (sequence 0 has no keys here): FlashAttention writes ±inf; allowed.
    no_keys = torch.tensor([0, 0, 7], dtype=torch.int32)
    lse[1, 0] = float("inf")
    out = call_mass(lse=lse, cu_seqlens_k=no_keys, check_finite=True)
    assert torch.all(out[:2] == 0)


def test_device_mismatch_is_named():
    k = torch.randn(7, 2, 16, device="meta")  # the only second device on a CPU-only machine
    with pytest.raises(ValueError, match="k: expected a tensor on cpu, got one on meta"):
        call_mass(k=k)


def test_forced_backend_that_cannot_run_explains_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run attention_mass"):
        call_mass(backend="triton")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run attention_mass"):
        call_mass(backend="cuda")


def test_auto_backend_on_cpu_uses_torch_reference():
    from kawhi_kernels._backend import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), "attention_mass", ("torch", "triton")) == "torch"


def test_cosine_alignment_validates_like_attention_mass():
    args = good_inputs()
    with pytest.raises(ValueError, match="KV heads"):
        cosine_alignment(args["q"], torch.randn(7, 3, 16), args["cu_seqlens_q"], args["cu_seqlens_k"],
                         args["key_region"], 3)
    with pytest.raises(ValueError, match="key_region"):
        cosine_alignment(args["q"], args["k"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                         args["key_region"], 2)
    with pytest.raises(ValueError, match="heads"):
        cosine_alignment(args["q"], args["k"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                         args["key_region"], 3, heads=[9])


def test_head_dim_beyond_fused_kernels_is_named_and_auto_stays_on_torch():
    from kawhi_kernels._backend import resolve_backend

    args = good_inputs()
    args["q"], args["k"] = torch.randn(5, 4, 320), torch.randn(7, 2, 320)
    with pytest.raises(ValueError, match="head dim 320 exceeds the triton backend limit 256"):
        attention_mass(**args, backend="triton")
    assert resolve_backend("auto", torch.device("cuda"), "attention_mass", ("torch", "triton"),
                           head_dim=320) == "torch"
    assert attention_mass(**args, backend="auto").shape == (5, 4, 3)
