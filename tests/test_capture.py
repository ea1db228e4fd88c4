"""transformers Q/K capture: bit-identical logits, captured Q/K equal the layer's own post-RoPE
Q/K (recomputed independently and checked against eager attention weights), varlen layout for
padded / packed batches, query selection, callback mode, restoration and argument errors."""
import importlib.util

import pytest
import torch

from kawhi_kernels.integrations import (
    CAPTURE_PREFIX,
    QKRecord,
    capture_qk,
    tiny_qwen2_5_vl,
    tiny_qwen3_vl,
    tiny_vl_inputs,
)
from kawhi_kernels._compat import enable_activation_checkpointing, text_rotary_cos_sin
from kawhi_kernels.integrations import transformers_capture as tc

IMAGES = [1, 2]
TEXT_LENS = [9, 4]


def text_model(model):
    return model.model.language_model


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LayerInputs:
    """Records each decoder layer's input hidden states and position embeddings (pre-hooks)."""

    def __init__(self, model):
        self.model, self.store, self.handles = model, {}, []
        for i, layer in enumerate(text_model(model).layers):
            self.handles.append(layer.register_forward_pre_hook(self._hook(i), with_kwargs=True))

    def _hook(self, i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.store[i] = (hidden.detach().clone(), kwargs["position_embeddings"])
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def post_rope_qk(self, layer_idx):
        """Recompute the layer's post-RoPE q [B, Hq, L, D], k [B, Hk, L, D] from its input:
        input RMSNorm, q/k projections, (Qwen3: q_norm/k_norm), rotate-half RoPE with the
        model's (multimodal) cos/sin."""
        layer = text_model(self.model).layers[layer_idx]
        attn = layer.self_attn
        hidden, (cos, sin) = self.store[layer_idx]
        with torch.no_grad():
            h = layer.input_layernorm(hidden)
            b, length, _ = h.shape
            q = attn.q_proj(h).view(b, length, -1, attn.head_dim)
            k = attn.k_proj(h).view(b, length, -1, attn.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            cos, sin = text_rotary_cos_sin(cos, sin, text_model(self.model).config)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def check_record_against(record: QKRecord, q_full, k_full, atol=0.0):
    """record.q / record.k must equal the dense [B, H, L, D] tensors at the recorded positions."""
    q_ref = q_full[record.q_batch, :, record.q_pos]
    k_ref = k_full[record.k_batch, :, record.k_pos]
    assert record.q.shape == q_ref.shape and record.k.shape == k_ref.shape
    torch.testing.assert_close(record.q, q_ref, atol=atol, rtol=0 if atol == 0 else 1e-5)
    torch.testing.assert_close(record.k, k_ref, atol=atol, rtol=0 if atol == 0 else 1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("capture_lse", [False, True])
def test_logits_bit_identical_and_restored(tiny_vl_family, impl, side, capture_lse):
    _, build = tiny_vl_family
    model = build(attn_implementation=impl)
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS, padding_side=side)
    with torch.no_grad():
        ref = model(**inputs).logits
        with capture_qk(model, [0, -1], capture_lse=capture_lse) as cap:
            assert text_model(model).config._attn_implementation == CAPTURE_PREFIX + impl
            assert model.model.visual.config._attn_implementation == impl
            out = model(**inputs).logits
    assert torch.equal(ref, out)
    assert sorted(cap.records) == [0, len(text_model(model).layers) - 1]
    # The lse only with capture_lse (tests/test_capture_lse.py checks its values).
    want_source = ({"sdpa": "sdpa_flash_cpu", "eager": "eager_scores"}[impl] if capture_lse else None)
    assert all(r.lse_source == want_source and (r.lse is None) == (not capture_lse) for r in cap.records.values())
    assert text_model(model).config._attn_implementation == impl
    assert all(layer.self_attn.config._attn_implementation == impl for layer in text_model(model).layers)
    assert not tc._ACTIVE_LAYERS


@pytest.mark.parametrize("side", ["right", "left"])
def test_captured_qk_equal_recomputed_post_rope(tiny_vl_family, side):
    _, build = tiny_vl_family
    model = build()
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS, padding_side=side)
    mask = inputs["attention_mask"].bool()
    with torch.no_grad(), LayerInputs(model) as li, capture_qk(model, [0, -1]) as cap:
        model(**inputs)
    last = len(text_model(model).layers) - 1
    for layer in (0, last):
        rec = cap.records[layer]
        q_full, k_full = li.post_rope_qk(layer)
        check_record_against(rec, q_full, k_full, atol=1e-6)
        assert rec.q.dtype == torch.float32 and not rec.q.requires_grad
        assert rec.softmax_scale == pytest.approx(rec.q.shape[-1] ** -0.5)
    # Layout: keys = every non-pad token, row-major; default queries = keys.
    rec = cap.records[0]
    valid_b, valid_p = mask.nonzero(as_tuple=True)
    assert torch.equal(rec.k_batch, valid_b) and torch.equal(rec.k_pos, valid_p)
    assert torch.equal(rec.q_batch, valid_b) and torch.equal(rec.q_pos, valid_p)
    counts = mask.sum(1)
    expected_cu = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    assert rec.cu_seqlens_k.dtype == torch.int32 and torch.equal(rec.cu_seqlens_k, expected_cu)
    assert torch.equal(rec.cu_seqlens_q, expected_cu)
    assert rec.num_sequences == 2 and rec.queries_are_suffix()


def test_captured_qk_reproduce_eager_attention_weights():
    model = tiny_qwen3_vl(attn_implementation="eager")
    inputs = tiny_vl_inputs(model, [2, 1], [5, 8], padding_side="left", seed=3)
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True)
        with capture_qk(model, [0, 1]) as cap:
            out = model(**inputs, output_attentions=True)
    for a, b in zip(ref.attentions, out.attentions):
        assert torch.equal(a, b)
    for layer in (0, 1):
        rec, weights = cap.records[layer], out.attentions[layer]      # weights [B, Hq, L, L]
        group = rec.q.shape[1] // rec.k.shape[1]
        cq, ck = rec.cu_seqlens_q.tolist(), rec.cu_seqlens_k.tolist()
        for s in range(rec.num_sequences):
            q, k = rec.q[cq[s]:cq[s + 1]], rec.k[ck[s]:ck[s + 1]]
            kpos = rec.k_pos[ck[s]:ck[s + 1]]
            scores = torch.einsum("ihd,jhd->hij", q, k.repeat_interleave(group, 1)) * rec.softmax_scale
            causal = kpos[None, :] <= rec.q_pos[cq[s]:cq[s + 1], None]
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
            b = int(rec.q_batch[cq[s]])
            eager = weights[b][:, rec.q_pos[cq[s]:cq[s + 1]]][:, :, kpos]
            torch.testing.assert_close(probs, eager, atol=1e-6, rtol=1e-5)
            # The eager row puts no mass outside the sequence's keys (pads).
            row_mass = weights[b][:, rec.q_pos[cq[s]:cq[s + 1]]].sum(-1)
            torch.testing.assert_close(eager.sum(-1), row_mass)


def test_query_mask_selects_rows_and_keeps_all_keys():
    model = tiny_qwen2_5_vl()
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS, padding_side="right")
    mask = inputs["attention_mask"].bool()
    lengths = mask.sum(1).tolist()
    response = torch.zeros_like(mask)
    n_resp = [3, 2]
    for b, (n, length) in enumerate(zip(n_resp, lengths)):
        response[b, length - n:length] = True
    assert not mask[0, -1]                      # right padding: row 0 (fewer tokens) ends in pads
    response[0, -1] = True                      # a pad position: never selected
    with torch.no_grad():
        with capture_qk(model, [-1]) as full:
            model(**inputs)
        with capture_qk(model, [-1], query_mask=response) as sub:
            model(**inputs)
    rec, ref = sub.records[1], full.records[1]
    assert rec.cu_seqlens_q.tolist() == [0, 3, 5]
    assert torch.equal(rec.cu_seqlens_k, ref.cu_seqlens_k) and torch.equal(rec.k, ref.k)
    keep = response[ref.q_batch, ref.q_pos]
    assert torch.equal(rec.q, ref.q[keep]) and torch.equal(rec.q_pos, ref.q_pos[keep])
    assert rec.queries_are_suffix()
    prompt = mask.clone()
    prompt[:, 1:] = False                       # first token of each row: not a suffix
    with torch.no_grad(), capture_qk(model, [-1], query_mask=prompt) as first:
        model(**inputs)
    assert first.records[1].q.shape[0] == 2 and not first.records[1].queries_are_suffix()


@pytest.mark.parametrize("side", ["right", "left"])
def test_query_mask_marking_pads_is_intersected_with_attention_mask(side):
    """A query_mask that is True at pad positions must select exactly query_mask & attention_mask:
    same q rows (batch, position, count, per-sequence offsets) and same q values as the capture
    with the already-intersected mask; pads never become q rows."""
    model = tiny_qwen2_5_vl()
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS, padding_side=side)
    mask = inputs["attention_mask"].bool()
    assert (~mask).any()                        # the batch has pads to select wrongly
    response = torch.zeros_like(mask)
    for b, length in enumerate(mask.sum(1).tolist()):
        cols = mask[b].nonzero().squeeze(1)
        response[b, cols[length - 2:]] = True   # last 2 tokens of each row
    query_masks = {"all_true": torch.ones_like(mask), "response_and_pads": response | ~mask}
    with torch.no_grad():
        for name, query_mask in query_masks.items():
            selected = query_mask & mask
            with capture_qk(model, [0, -1], query_mask=query_mask) as cap:
                model(**inputs)
            with capture_qk(model, [0, -1], query_mask=selected) as ref:
                model(**inputs)
            sel_b, sel_p = selected.nonzero(as_tuple=True)
            counts = selected.sum(1)
            expected_cu = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
            for layer in (0, 1):
                rec, rec_ref = cap.records[layer], ref.records[layer]
                assert rec.q.shape[0] == int(selected.sum()), name
                assert torch.equal(rec.q_batch, sel_b) and torch.equal(rec.q_pos, sel_p), name
                assert mask[rec.q_batch, rec.q_pos].all(), name            # no pad is a q row
                assert torch.equal(rec.cu_seqlens_q, expected_cu), name
                assert torch.equal(rec.q_batch, rec_ref.q_batch) and torch.equal(rec.q_pos, rec_ref.q_pos)
                assert torch.equal(rec.cu_seqlens_q, rec_ref.cu_seqlens_q)
                assert torch.equal(rec.q, rec_ref.q), name
                # Keys are unaffected by the query mask: every non-pad token.
                assert torch.equal(rec.k, rec_ref.k) and torch.equal(rec.cu_seqlens_k, rec_ref.cu_seqlens_k)
                assert rec.queries_are_suffix(), name


def _packed_from_padded(model, inputs):
    """verl-style remove-padding: concatenate the non-pad tokens of each row into [1, T] with
    4-row position ids (text positions restarting at 0, then the model's 3-D M-RoPE ids)."""
    mask = inputs["attention_mask"].bool()
    pos3, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    lengths = mask.sum(1).tolist()
    ids = torch.cat([inputs["input_ids"][b][mask[b]] for b in range(len(lengths))])[None]
    mm = torch.cat([inputs["mm_token_type_ids"][b][mask[b]] for b in range(len(lengths))])[None]
    p3 = torch.cat([pos3[:, b][:, mask[b]] for b in range(len(lengths))], 1)[:, None]
    text = torch.cat([torch.arange(n) for n in lengths])[None, None]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packed = dict(input_ids=ids, mm_token_type_ids=mm, position_ids=torch.cat([text, p3], 0),
                  pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], use_cache=False)
    return packed, cu


@pytest.mark.parametrize("how", ["position_ids", "cu_seqlens", "flash_kwargs"])
def test_packed_sequences_match_padded_batch(how):
    model = tiny_qwen2_5_vl()
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS, padding_side="left")
    packed, cu = _packed_from_padded(model, inputs)
    kwargs = {}
    if how == "cu_seqlens":
        kwargs["cu_seqlens"] = cu
    if how == "flash_kwargs":
        m = int((cu[1:] - cu[:-1]).max())
        packed.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
    with torch.no_grad():
        with capture_qk(model, [0, 1]) as padded:
            model(**inputs)
        ref_logits = model(**packed).logits
        with LayerInputs(model) as li, capture_qk(model, [0, 1], **kwargs) as cap:
            logits = model(**packed).logits
    assert torch.equal(ref_logits, logits)
    for layer in (0, 1):
        rec, ref = cap.records[layer], padded.records[layer]
        assert torch.equal(rec.cu_seqlens_q, cu) and torch.equal(rec.cu_seqlens_k, cu)
        assert torch.equal(rec.k_batch, torch.zeros_like(rec.k_batch))
        assert torch.equal(rec.k_pos, torch.arange(int(cu[-1])))
        q_full, k_full = li.post_rope_qk(layer)
        check_record_against(rec, q_full, k_full, atol=1e-6)
        # Same sequences as the padded batch (attention stays inside each packed sequence).
        torch.testing.assert_close(rec.q, ref.q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rec.k, ref.k, atol=1e-5, rtol=1e-5)
    # Logits of the packed sequences equal the padded batch's (cross-sequence attention would break this).
    with torch.no_grad():
        padded_logits = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[0], torch.cat([padded_logits[b][mask[b]] for b in range(2)]),
                               atol=1e-5, rtol=1e-5)


def test_on_layer_callback_once_per_layer_with_gradient_checkpointing():
    model = tiny_qwen2_5_vl(text_config=dict(num_hidden_layers=3))
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS)
    model.train()
    enable_activation_checkpointing(model, use_reentrant=False)
    torch.manual_seed(0)
    ref = model(**inputs, use_cache=False).logits
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    seen = []
    with capture_qk(model, "all", on_layer=lambda i, r: seen.append((i, r.q.shape, r.q.requires_grad))) as cap:
        out = model(**inputs, use_cache=False).logits
        out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.equal(ref, out)
    assert all(torch.equal(a, b) for a, b in zip(ref_grads, grads))
    n_tokens = int(inputs["attention_mask"].sum())
    assert seen == [(i, torch.Size([n_tokens, 4, 16]), False) for i in range(3)]
    assert cap.records == {} and cap.num_forwards == 1


def test_bf16_dtype_and_bit_identity():
    model = tiny_qwen2_5_vl(dtype=torch.bfloat16)
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS, padding_side="left")
    with torch.no_grad():
        ref = model(**inputs).logits
        with LayerInputs(model) as li, capture_qk(model, [-1]) as cap:
            out = model(**inputs).logits
    assert torch.equal(ref, out)
    rec = cap.records[1]
    assert rec.q.dtype == rec.k.dtype == torch.bfloat16
    q_full, k_full = li.post_rope_qk(1)
    check_record_against(rec, q_full, k_full, atol=1e-2)


def test_restored_after_exception_and_failed_forward():
    model = tiny_qwen2_5_vl()
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS)
    cfg = text_model(model).config
    with pytest.raises(KeyError):
        with capture_qk(model, [0]):
            raise KeyError("boom")
    assert cfg._attn_implementation == "sdpa" and not tc._ACTIVE_LAYERS
    assert not text_model(model)._forward_pre_hooks
    bad = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="query_mask"):
        with torch.no_grad(), capture_qk(model, [0], query_mask=bad):
            model(**inputs)
    assert cfg._attn_implementation == "sdpa" and not tc._ACTIVE_LAYERS
    assert not text_model(model)._forward_pre_hooks
    with torch.no_grad():
        model(**inputs)                           # still works after the failures


def test_bad_arguments():
    model = tiny_qwen2_5_vl()
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS)
    with pytest.raises(ValueError, match="layers"):
        capture_qk(model, [2])
    with pytest.raises(ValueError, match="layers"):
        capture_qk(model, [-3])
    with pytest.raises(ValueError, match="layers"):
        capture_qk(model, [])
    with pytest.raises(ValueError, match="layers"):
        capture_qk(model, [1, -1])
    with pytest.raises(TypeError, match="layers"):
        capture_qk(model, 1)
    with pytest.raises(TypeError, match="model"):
        capture_qk(torch.nn.Linear(2, 2), [0])
    with pytest.raises(TypeError, match="query_mask"):
        capture_qk(model, [0], query_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="query_mask"):
        capture_qk(model, [0], query_mask=torch.ones(6, dtype=torch.bool))
    with pytest.raises(TypeError, match="on_layer"):
        capture_qk(model, [0], on_layer=3)
    with pytest.raises(ValueError, match="cu_seqlens"):
        with torch.no_grad(), capture_qk(model, [0], cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)):
            model(**inputs)
    with pytest.raises(ValueError, match="attn_implementation"):
        capture_qk(tiny_qwen2_5_vl(attn_implementation="flex_attention"), [0])
    with capture_qk(model, [0]):
        with pytest.raises(RuntimeError, match="already"):
            capture_qk(model, [0])
    assert text_model(model).config._attn_implementation == "sdpa"


def test_accepts_inner_models():
    model = tiny_qwen2_5_vl()
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS)
    with torch.no_grad():
        with capture_qk(model, [1]) as outer:
            model(**inputs)
        with capture_qk(model.model, [1]) as inner:
            model.model(**inputs)
    assert torch.equal(outer.records[1].q, inner.records[1].q)


def test_flash_code_path_with_stand_in_kernel(monkeypatch):
    """CPU check of the flash_attention_2 path: a stand-in registered as "flash_attention_2"
    computes masked attention from the 2-D flash mask. The wrapper must call it (with the config
    naming "flash_attention_2" while it runs, as the real one picks its kernel from it) and the
    flash mask function must be the one registered for the capture name."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    calls = []

    def stand_in(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.config._attn_implementation, None if attention_mask is None else attention_mask.dim()))
        mask = None
        if attention_mask is not None:                    # flash gets the 2-D padding mask
            length = query.shape[2]
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            mask = causal[None, None] & attention_mask[:, None, None, :].bool()
        return sdpa_attention_forward(module, query, key, value, mask, scaling=kwargs.get("scaling"))

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", stand_in)
    model = tiny_qwen2_5_vl()
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS, padding_side="left")
    with torch.no_grad():
        sdpa_logits = model(**inputs).logits
        text_model(model).config._attn_implementation_internal = "flash_attention_2"
        ref = model(**inputs).logits
        calls.clear()
        with LayerInputs(model) as li, capture_qk(model, [-1]) as cap:
            out = model(**inputs).logits
        assert text_model(model).config._attn_implementation == "flash_attention_2"
    assert torch.equal(ref, out)
    torch.testing.assert_close(out[inputs["attention_mask"].bool()], sdpa_logits[inputs["attention_mask"].bool()])
    assert calls == [("flash_attention_2", 2)] * len(text_model(model).layers)
    q_full, k_full = li.post_rope_qk(1)
    check_record_against(cap.records[1], q_full, k_full, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="flash_attention_2 needs CUDA and the flash_attn package")
def test_flash_attention_2_bit_identical_and_qk():
    model = tiny_qwen2_5_vl(attn_implementation="flash_attention_2", dtype=torch.bfloat16).cuda()
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS, padding_side="left")
    with torch.no_grad():
        ref = model(**inputs).logits
        with LayerInputs(model) as li, capture_qk(model, [0, -1]) as cap:
            out = model(**inputs).logits
    assert torch.equal(ref, out)
    q_full, k_full = li.post_rope_qk(1)
    check_record_against(cap.records[1], q_full, k_full, atol=1e-2)
