"""capture_qk(capture_lse=...): the softmax normaliser the model's own attention computed.

On tiny random Qwen2.5-VL models (sdpa = CPU flash kernel, eager = its softmax scores; fp32 and
bf16; right/left padded, unpadded, packed): logits (and gradients) stay bit-identical, the captured
lse equals an lse recomputed in fp64 from the captured q/k with the model's causal mask, and
``attention_mass`` with it equals ``attention_mass`` computing its own normaliser on the torch and
Triton-interpreter backends. Without a usable kernel (SDPA's math path) the record says so and
``profile_heads`` falls back explicitly. flash-attn 2's ops are exercised through stand-ins
registered under their real names when flash_attn is not installed (it is not on CPU machines);
the CUDA flash paths have GPU-only tests.
"""
import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported anywhere below

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel

from kawhi_kernels.heads.profile import profile_heads, text_after_image_mask
from kawhi_kernels.integrations import capture_qk, tiny_qwen2_5_vl, tiny_vl_inputs
from kawhi_kernels.integrations import attention_lse as al
from kawhi_kernels.integrations.tiny_models import IMAGE_TOKEN_ID
from kawhi_kernels.ops.attention_mass import attention_mass

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
IMAGES = [1, 2]
TEXT_LENS = [9, 4]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Captured lse vs the fp64 recomputation from the captured (model-dtype) q/k. The CPU flash kernel
# accumulates bf16 scores in fp32; eager rounds its scores to bf16 before the fp32 softmax, so its
# normaliser is that of the rounded scores.
LSE_ATOL = {("sdpa", "fp32"): 2e-6, ("eager", "fp32"): 2e-6, ("sdpa", "bf16"): 5e-4, ("eager", "bf16"): 1e-3}
# attention_mass(lse=captured) vs attention_mass computing its own normaliser.
MASS_TOL = {("sdpa", "fp32"): dict(atol=1e-6, rtol=1e-5), ("eager", "fp32"): dict(atol=1e-6, rtol=1e-5),
            ("sdpa", "bf16"): dict(atol=2e-4, rtol=1e-3), ("eager", "bf16"): dict(atol=2e-4, rtol=1e-3)}
EXPECTED_SOURCE = {"sdpa": "sdpa_flash_cpu", "eager": "eager_scores"}


def text_model(model):
    return model.model.language_model


def make_inputs(model, layout):
    """(forward inputs, bool [B, L] response-suffix query mask, cu_seqlens or None) for a layout:
    "right"/"left" padded, "unpadded" (equal rows), "packed" ([1, T], restarting position ids)."""
    if layout == "unpadded":
        inputs = tiny_vl_inputs(model, [1, 1], [5, 5])
        assert bool(inputs["attention_mask"].all())
    else:
        inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS, padding_side="left" if layout == "left" else "right")
    qmask = text_after_image_mask(inputs["input_ids"], inputs["attention_mask"], IMAGE_TOKEN_ID)
    if layout != "packed":
        return inputs, qmask, None
    return packed_from_padded(model, inputs, qmask)


def packed_from_padded(model, inputs, qmask):
    """Remove-padding packing into [1, T] with 4-row position ids (text positions restarting)."""
    mask = inputs["attention_mask"].bool()
    pos3, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    lengths = mask.sum(1).tolist()
    rows = range(len(lengths))
    ids = torch.cat([inputs["input_ids"][b][mask[b]] for b in rows])[None]
    mm = torch.cat([inputs["mm_token_type_ids"][b][mask[b]] for b in rows])[None]
    p3 = torch.cat([pos3[:, b][:, mask[b]] for b in rows], 1)[:, None]
    text = torch.cat([torch.arange(n) for n in lengths])[None, None]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packed = dict(input_ids=ids, mm_token_type_ids=mm, position_ids=torch.cat([text, p3], 0),
                  pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], use_cache=False)
    pq = torch.cat([qmask[b][mask[b]] for b in rows])[None]
    return packed, pq, cu


def sequence_ids(cu, n):
    return torch.searchsorted(cu.long()[1:], torch.arange(n), right=True)


def record_reference_lse(rec):
    """fp64 [Hq, total_q] from the record's own q/k and index maps (the model's causal mask)."""
    q_seq = sequence_ids(rec.cu_seqlens_q, rec.q.shape[0])
    k_seq = sequence_ids(rec.cu_seqlens_k, rec.k.shape[0])
    return al.reference_lse(rec.q, rec.k, q_seq, rec.q_pos, k_seq, rec.k_pos, rec.softmax_scale)


def capture(model, inputs, qmask, *, capture_lse, layers=(0, -1), **kwargs):
    with torch.no_grad(), capture_qk(model, list(layers), query_mask=qmask, capture_lse=capture_lse, **kwargs) as cap:
        logits = model(**inputs).logits
    return cap, logits


def image_text_regions(rec, input_ids):
    """key_region int32 [total_k]: 0 = image token, 1 = other tokens (so the two masses sum to 1)."""
    ids = input_ids[rec.k_batch, rec.k_pos]
    return torch.where(ids == IMAGE_TOKEN_ID, 0, 1).to(torch.int32)


# --------------------------------------------------------------------------- logits / lse values
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["right", "left", "unpadded", "packed"])
def test_captured_lse_equals_recomputed_and_logits_bit_identical(impl, dtype, layout):
    model = tiny_qwen2_5_vl(attn_implementation=impl, dtype=DTYPES[dtype])
    inputs, qmask, _ = make_inputs(model, layout)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    plain, plain_logits = capture(model, inputs, qmask, capture_lse=False)
    cap, logits = capture(model, inputs, qmask, capture_lse=True)
    assert torch.equal(ref_logits, logits) and torch.equal(ref_logits, plain_logits)
    assert sorted(cap.records) == [0, 1]
    for layer, rec in cap.records.items():
        assert rec.lse_source == EXPECTED_SOURCE[impl], rec.lse_source
        assert rec.lse.dtype == torch.float32 and tuple(rec.lse.shape) == (rec.q.shape[1], rec.q.shape[0])
        assert rec.lse.is_contiguous() and not rec.lse.requires_grad
        # Same q/k as without the lse (only the extra fields differ).
        assert torch.equal(rec.q, plain.records[layer].q) and torch.equal(rec.k, plain.records[layer].k)
        assert plain.records[layer].lse is None and plain.records[layer].lse_source is None
        ref = record_reference_lse(rec)
        err = float((rec.lse.double() - ref).abs().max())
        assert err <= LSE_ATOL[impl, dtype], (layer, err)
        # The check can fail: the lse over all keys of the sequence (no causal mask) is far off.
        no_causal = al.reference_lse(rec.q, rec.k, sequence_ids(rec.cu_seqlens_q, rec.q.shape[0]),
                                     torch.full_like(rec.q_pos, 10**9),
                                     sequence_ids(rec.cu_seqlens_k, rec.k.shape[0]), rec.k_pos, rec.softmax_scale)
        assert float((no_causal - ref).abs().max()) > 20 * LSE_ATOL[impl, dtype]


def test_all_rows_and_gqa_heads():
    """Default query rows (every non-pad token) and Hq=6 over Hk=2 (three q heads per KV head)."""
    model = tiny_qwen2_5_vl(text_config=dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96))
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS, padding_side="left")
    cap, _ = capture(model, inputs, None, capture_lse=True)
    rec = cap.records[1]
    assert rec.q.shape[1] == 6 and rec.k.shape[1] == 2 and rec.q.shape[0] == int(inputs["attention_mask"].sum())
    torch.testing.assert_close(rec.lse.double(), record_reference_lse(rec), atol=1e-5, rtol=0)


def test_gradients_bit_identical_in_training_with_checkpointing():
    from kawhi_kernels._compat import enable_activation_checkpointing

    model = tiny_qwen2_5_vl(text_config=dict(num_hidden_layers=3))
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS)
    model.train()
    enable_activation_checkpointing(model, use_reentrant=False)
    ref = model(**inputs, use_cache=False).logits
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    seen = []
    with capture_qk(model, "all", capture_lse=True, on_layer=lambda i, r: seen.append((i, r.lse_source))):
        out = model(**inputs, use_cache=False).logits
        out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.equal(ref, out) and all(torch.equal(a, b) for a, b in zip(ref_grads, grads))
    assert seen == [(i, "sdpa_flash_cpu") for i in range(3)]          # once per layer despite recomputation


# --------------------------------------------------------------------------- attention_mass with the lse
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["left", "packed"])
def test_attention_mass_with_captured_lse_equals_own_normaliser(backend, impl, dtype, layout):
    model = tiny_qwen2_5_vl(attn_implementation=impl, dtype=DTYPES[dtype])
    inputs, qmask, _ = make_inputs(model, layout)
    cap, _ = capture(model, inputs, qmask, capture_lse=True)
    for rec in cap.records.values():
        assert rec.queries_are_suffix()
        region = image_text_regions(rec, inputs["input_ids"])
        args = (rec.q, rec.k, rec.cu_seqlens_q, rec.cu_seqlens_k, region, 2)
        kw = dict(softmax_scale=rec.softmax_scale, backend=backend)
        own = attention_mass(*args, **kw)
        got = attention_mass(*args, lse=rec.lse, **kw)
        torch.testing.assert_close(got, own, **MASS_TOL[impl, dtype])
        torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]), **MASS_TOL[impl, dtype])
        # The lse is used: a normaliser one nat too large scales every mass by 1/e.
        shifted = attention_mass(*args, lse=rec.lse + 1.0, **kw)
        torch.testing.assert_close(shifted, own * torch.exp(torch.tensor(-1.0)), **MASS_TOL[impl, dtype])


# --------------------------------------------------------------------------- explicit fallbacks
def test_sdpa_math_path_gives_no_lse_and_says_why():
    model = tiny_qwen2_5_vl()
    inputs, qmask, _ = make_inputs(model, "left")
    with torch.no_grad():
        ref = model(**inputs).logits
    with sdpa_kernel([SDPBackend.MATH]):
        cap, logits = capture(model, inputs, qmask, capture_lse=True)
        assert torch.equal(capture(model, inputs, qmask, capture_lse=False)[1], logits)
        with pytest.raises(RuntimeError, match="capture_lse='require': layer 0 .*gave no lse"):
            capture(model, inputs, qmask, capture_lse="require")
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    for rec in cap.records.values():
        assert rec.lse is None and rec.lse_source.startswith("none: ") and "math path" in rec.lse_source, rec.lse_source
    cap2, _ = capture(model, inputs, qmask, capture_lse="require")
    assert all(r.lse_source == "sdpa_flash_cpu" for r in cap2.records.values())


def test_profile_heads_uses_captured_lse_and_falls_back_explicitly():
    model = tiny_qwen2_5_vl()
    batches = [tiny_vl_inputs(model, IMAGES, TEXT_LENS, padding_side=side, seed=s)
               for s, side in enumerate(["left", "right"])]
    own = profile_heads(model, batches, backend="torch", use_model_lse=False)
    got = profile_heads(model, batches, backend="torch")
    assert own.meta["lse_sources"] == {"attention_mass": 4}
    assert got.meta["lse_sources"] == {"sdpa_flash_cpu": 4}
    torch.testing.assert_close(got.mass, own.mass, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.entropy, own.entropy, atol=1e-6, rtol=1e-5)
    with sdpa_kernel([SDPBackend.MATH]):
        fallback = profile_heads(model, batches, backend="torch")
    (reason, count), = fallback.meta["lse_sources"].items()
    assert reason.startswith("none: ") and count == 4
    torch.testing.assert_close(fallback.mass, own.mass, atol=1e-6, rtol=1e-5)
    with pytest.raises(TypeError, match="use_model_lse"):
        profile_heads(model, batches, use_model_lse="yes")


def test_default_is_off_and_costs_nothing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("LSEWatcher constructed without capture_lse")

    monkeypatch.setattr(al.LSEWatcher, "__init__", boom)
    model = tiny_qwen2_5_vl()
    inputs, qmask, _ = make_inputs(model, "left")
    cap, _ = capture(model, inputs, qmask, capture_lse=False)
    assert all(r.lse is None and r.lse_source is None for r in cap.records.values())
    with capture_qk(model, [0]) as default:
        assert default.capture_lse is False
    with pytest.raises(ValueError, match="capture_lse"):
        capture_qk(model, [0], capture_lse="yes")


def test_watcher_refuses_mismatched_and_ambiguous_calls():
    """Direct LSEWatcher checks: a flash call whose shape is not the layer's, two candidate calls."""
    b, h, length, d = 2, 4, 7, 8
    targets = al.LSETargets(b, length, h, torch.tensor([0, 1]), torch.tensor([6, 3]), torch.tensor([6, 10]),
                            torch.tensor([0, 7, 14], dtype=torch.int32))
    q = torch.randn(b, h, length, d)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def one(x):
        return flash(x, x, x, 0.0, True)[0]

    _, res = al.run_watched(one, targets, eager=False, args=(q,), kwargs={})
    ref = flash(q, q, q, 0.0, True)[1]
    assert res.source == "sdpa_flash_cpu" and torch.equal(res.lse, torch.stack([ref[0, :, 6], ref[1, :, 3]], 1))
    _, res = al.run_watched(one, targets, eager=False, args=(q[:, :, :5],), kwargs={})
    assert res.lse is None and "do not match the layer" in res.source
    _, res = al.run_watched(lambda x: one(x) + one(x), targets, eager=False, args=(q,), kwargs={})
    assert res.lse is None and res.source.startswith("none: ambiguous, 2 candidate ops")
    _, res = al.run_watched(torch.softmax, targets, eager=False, args=(q @ q.transpose(-1, -2), -1), kwargs={})
    assert res.lse is None and res.source.startswith("none: aten::_softmax (SDPA's math path")
    _, res = al.run_watched(torch.matmul, targets, eager=False, args=(q, q.transpose(-1, -2)), kwargs={})
    assert res.lse is None and res.source.startswith("none: no attention op")
    scores = q @ q.transpose(-1, -2)
    _, res = al.run_watched(torch.softmax, targets, eager=True, args=(scores, -1), kwargs={})
    torch.testing.assert_close(res.lse, torch.logsumexp(scores, -1)[[0, 1], :, [6, 3]].t())


def test_units_helpers_shared_with_the_benchmark():
    from kawhi_kernels.bench import flash_lse

    assert flash_lse.to_natural_log is al.to_natural_log and flash_lse.lse_units is al.lse_units
    x = torch.tensor([[1.0, 2.0]])
    assert al.lse_units(x / al.LN2, x) == ("log2", pytest.approx(0.0, abs=1e-6))
    torch.testing.assert_close(al.to_natural_log(x / al.LN2, "log2"), x)
    with pytest.raises(ValueError, match="units"):
        al.to_natural_log(x, "log10")


# --------------------------------------------------------------------------- flash-attn 2 (stand-ins on CPU)
_FAKE = {"old_layout": False}


def _fake_flash_attention(q, k, v, cu, scale):
    """Causal attention per packed sequence: q [T, Hq, D], k/v [T, Hk, D] -> out, lse [Hq, T]."""
    hq, hk = q.shape[1], k.shape[1]
    kk, vv = (t.float().repeat_interleave(hq // hk, dim=1) for t in (k, v))
    seq = sequence_ids(cu, q.shape[0])
    pos = torch.arange(q.shape[0])
    visible = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    s = torch.einsum("qhd,khd->hqk", q.float(), kk) * scale
    s = s.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv).to(q.dtype)
    return out, lse


def _register_fake_flash_attn_ops():
    """Stand-ins for flash-attn 2's registered ops (same schema names, leading arguments and
    (out, softmax_lse, S_dmask, rng_state) outputs), for machines without flash_attn."""
    if _FAKE.get("registered"):
        return
    _FAKE["registered"] = True

    @torch.library.custom_op("flash_attn::_flash_attn_varlen_forward", mutates_args=())
    def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
               softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out, lse = _fake_flash_attention(q, k, v, cu_seqlens_q, softmax_scale)
        if _FAKE["old_layout"]:          # flash-attn ≤ 2.4: [S, Hq, max_seqlen_q], padded per sequence
            cu = cu_seqlens_q.long().tolist()
            old = lse.new_full((len(cu) - 1, q.shape[1], max_seqlen_q), float("inf"))
            for s in range(len(cu) - 1):
                old[s, :, :cu[s + 1] - cu[s]] = lse[:, cu[s]:cu[s + 1]]
            lse = old
        return out, lse, q.new_empty(0), q.new_empty(0)

    @torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=())
    def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float,
              causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length = q.shape[:2]
        cu = torch.arange(b + 1, dtype=torch.int32) * length
        out, lse = _fake_flash_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, softmax_scale)
        return out.view(q.shape), lse.view(-1, b, length).transpose(0, 1).contiguous(), q.new_empty(0), q.new_empty(0)


def _stand_in_flash_attention_2(order):
    """An attention function shaped like transformers' flash path: dense kernel without a mask,
    else unpad (row-major non-pad tokens, or with ``order="reversed"`` the rows swapped) and the
    varlen kernel; packed inputs use the forward's ``cu_seq_lens_q``."""
    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))                 # [B, L, H, D]
        b, length = q.shape[:2]
        if attention_mask is None and kwargs.get("cu_seq_lens_q") is None:
            out = torch.ops.flash_attn._flash_attn_forward(q, k, v, 0.0, scaling, True)[0]
            return out, None
        mask = torch.ones(b, length, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = list(range(b))[::-1] if order == "reversed" else list(range(b))
        flat = torch.cat([r * length + mask[r].nonzero().squeeze(1) for r in rows])
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            cu = torch.tensor([0] + mask[rows].sum(1).cumsum(0).tolist(), dtype=torch.int32)
        unpad = lambda t: t.reshape(b * length, *t.shape[2:])[flat]  # noqa: E731
        m = int((cu[1:] - cu[:-1]).max())
        out = torch.ops.flash_attn._flash_attn_varlen_forward(unpad(q), unpad(k), unpad(v), cu, cu, m, m, 0.0,
                                                             scaling, True)[0]
        full = out.new_zeros(b * length, *out.shape[1:])
        full[flat] = out
        return full.view(b, length, *out.shape[1:]), None

    return attention


@pytest.fixture
def flash_attention_2_stand_in(monkeypatch):
    if HAS_FLASH_ATTN:
        pytest.skip("flash_attn is installed: its real ops are tested on CUDA below, stand-ins would clash")
    from transformers.modeling_utils import AttentionInterface

    _register_fake_flash_attn_ops()

    def use(model, order="rowmajor"):
        monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", _stand_in_flash_attention_2(order))
        text_model(model).config._attn_implementation_internal = "flash_attention_2"
        return model

    return use


@pytest.mark.parametrize("layout,source", [("left", "flash_attn_varlen"), ("right", "flash_attn_varlen"),
                                           ("unpadded", "flash_attn"), ("packed", "flash_attn_varlen"),
                                           ("old_varlen_layout", "flash_attn_varlen")])
def test_flash_attn_2_ops_stand_in(flash_attention_2_stand_in, monkeypatch, layout, source):
    model = flash_attention_2_stand_in(tiny_qwen2_5_vl())
    monkeypatch.setitem(_FAKE, "old_layout", layout == "old_varlen_layout")
    inputs, qmask, cu = make_inputs(model, "left" if layout == "old_varlen_layout" else layout)
    if cu is not None:
        m = int((cu[1:] - cu[:-1]).max())
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
    with torch.no_grad():
        ref = model(**inputs).logits
    cap, logits = capture(model, inputs, qmask, capture_lse="require")
    assert torch.equal(ref, logits)
    for rec in cap.records.values():
        assert rec.lse_source == source
        torch.testing.assert_close(rec.lse.double(), record_reference_lse(rec), atol=1e-5, rtol=0)


def test_flash_attn_2_stand_in_other_token_order_is_refused(flash_attention_2_stand_in):
    model = flash_attention_2_stand_in(tiny_qwen2_5_vl(), order="reversed")
    inputs = tiny_vl_inputs(model, [1, 1], [5, 6])                # row 0 has one pad at the end
    inputs["attention_mask"][1, -1] = 0                          # now both rows have as many tokens
    assert int(inputs["attention_mask"][0].sum()) == int(inputs["attention_mask"][1].sum())
    qmask = text_after_image_mask(inputs["input_ids"], inputs["attention_mask"], IMAGE_TOKEN_ID)
    cap, _ = capture(model, inputs, qmask, capture_lse=True)
    for rec in cap.records.values():
        assert rec.lse is None and "token order" in rec.lse_source, rec.lse_source


# --------------------------------------------------------------------------- GPU only
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
def test_cuda_sdpa_flash_lse():
    model = tiny_qwen2_5_vl(dtype=torch.bfloat16).cuda()
    inputs, qmask, _ = make_inputs(model, "unpadded")
    with torch.no_grad():
        ref = model(**inputs).logits
    cap, logits = capture(model, inputs, qmask.cuda(), capture_lse=True)
    assert torch.equal(ref, logits)
    for rec in cap.records.values():
        assert rec.lse_source == "sdpa_flash" and rec.lse.is_cuda
        torch.testing.assert_close(rec.lse.double().cpu(), record_reference_lse(_to_cpu(rec)), atol=2e-3, rtol=0)
        region = image_text_regions(rec, inputs["input_ids"])
        args = (rec.q, rec.k, rec.cu_seqlens_q, rec.cu_seqlens_k, region, 2)
        for backend in ("torch", "triton"):
            torch.testing.assert_close(attention_mass(*args, lse=rec.lse, backend=backend),
                                       attention_mass(*args, backend=backend), atol=5e-4, rtol=2e-3)


@CUDA
def test_cuda_sdpa_padded_batch_falls_back_explicitly():
    model = tiny_qwen2_5_vl(dtype=torch.bfloat16).cuda()
    inputs, qmask, _ = make_inputs(model, "left")
    cap, _ = capture(model, inputs, qmask.cuda(), capture_lse=True)
    for rec in cap.records.values():
        # CUDA flash takes no mask, so efficient/math/cuDNN ran: no lse, and the record says so. Should
        # a future PyTorch route this to a kernel we read, its lse must still be right.
        if rec.lse is None:
            assert rec.lse_source.startswith("none: "), rec.lse_source
        else:
            torch.testing.assert_close(rec.lse.double().cpu(), record_reference_lse(_to_cpu(rec)), atol=2e-3, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_FLASH_ATTN, reason="needs CUDA and flash_attn")
@pytest.mark.parametrize("layout", ["left", "unpadded"])
def test_cuda_flash_attn_2_lse(layout):
    model = tiny_qwen2_5_vl(attn_implementation="flash_attention_2", dtype=torch.bfloat16).cuda()
    inputs, qmask, _ = make_inputs(model, layout)
    with torch.no_grad():
        ref = model(**inputs).logits
    cap, logits = capture(model, inputs, qmask.cuda(), capture_lse="require")
    assert torch.equal(ref, logits)
    for rec in cap.records.values():
        assert rec.lse_source == ("flash_attn_varlen" if layout == "left" else "flash_attn")
        torch.testing.assert_close(rec.lse.double().cpu(), record_reference_lse(_to_cpu(rec)), atol=2e-3, rtol=0)


def _to_cpu(rec):
    import dataclasses

    return dataclasses.replace(rec, **{f: getattr(rec, f).cpu() for f in
                                       ("q", "k", "cu_seqlens_q", "cu_seqlens_k", "q_batch", "q_pos", "k_batch", "k_pos")})


# --------------------------------------------------------------------------- test-order regression
@pytest.mark.skipif(torch.cuda.is_available() or not HAS_TRITON, reason="interpreter check for CPU machines")
def test_triton_language_is_interpreted_whatever_the_collection_order():
    """Collecting tests/test_cuda_static_sass.py first imports triton (``cuobjdump_path()``) at
    module level; before tests/conftest.py set TRITON_INTERPRET=1, triton.language's helpers were
    then decorated as compiled JITFunctions and every interpreter test run after it in the same
    process failed ("Cannot call @triton.jit'd outside of the scope of a kernel"). Replays that
    collection order in a fresh process (conftest first, as pytest loads it)."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    script = ("import os, sys, runpy; sys.path.insert(0, sys.argv[1]); "
              "runpy.run_path(os.path.join(sys.argv[1], 'conftest.py')); import test_cuda_static_sass; "
              "import triton.language.standard as s; print(type(s.zeros).__name__)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script, tests], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(tests))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "InterpretedFunction", out.stdout
    # And in this process, whatever ran before.
    import triton.language.standard as standard

    assert type(standard.zeros).__name__ == "InterpretedFunction"


def test_eager_lse_in_row_chunks(monkeypatch):
    """The eager reduction works in row chunks (bounded memory); chunk size 3 gives the same lse."""
    model = tiny_qwen2_5_vl(attn_implementation="eager")
    inputs, qmask, _ = make_inputs(model, "left")
    whole, _ = capture(model, inputs, None, capture_lse=True)
    monkeypatch.setattr(al, "_EAGER_CHUNK_ELEMENTS", 3 * 4 * inputs["input_ids"].shape[1])
    chunked, _ = capture(model, inputs, None, capture_lse=True)
    for layer, rec in chunked.records.items():
        assert rec.q.shape[0] > 3
        assert torch.equal(rec.lse, whole.records[layer].lse)
