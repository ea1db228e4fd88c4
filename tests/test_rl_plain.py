"""Plain PyTorch helpers: layout masks, text offsets, advantages from the policy forward, losses,
and the runnable example."""
import importlib.util
import types
from pathlib import Path

import pytest
import torch

from kawhi_kernels import KAWHI, paragraph_ids
from kawhi_kernels.integrations import capture_qk, tiny_qwen2_5_vl
from kawhi_kernels.integrations import tiny_models as tm
from kawhi_kernels.integrations.rl import (
    KAWHIStep,
    grpo_token_loss,
    gspo_token_loss,
    kawhi_advantages_from_forward,
    response_query_mask,
    response_texts_and_offsets,
    selected_image_key_mask,
)

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _regions(selected):
    """Stand-in for KeyRegions: selected_image_key_mask only reads ``selected``."""
    return types.SimpleNamespace(selected=torch.tensor(selected))


def test_response_query_mask_places_responses_last():
    resp = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    mask = response_query_mask(resp, 5)
    assert mask.tolist() == [[False, False, True, True, False], [False, False, True, False, False]]
    with pytest.raises(ValueError, match="seq_len"):
        response_query_mask(resp, 2)


def test_selected_image_key_mask_maps_images_in_order():
    img = tm.IMAGE_TOKEN_ID
    ids = torch.tensor([[7, img, img, img, 9, img, img], [img, img, img, 8, 8, 8, 8]])
    first, second = _regions([True, False, True]), _regions([False, True])
    mask = selected_image_key_mask(ids, img, [[first, second], [first]])
    assert mask.tolist() == [[False, True, False, True, False, False, True],
                             [True, False, True, False, False, False, False]]
    with pytest.raises(ValueError, match="row_regions: row 1 has 3 image tokens"):
        selected_image_key_mask(ids, img, [[first, second], [second]])


class _PieceTokenizer:
    """Byte-level-like: decode is the concatenation of the pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return "".join(self.pieces[i] for i in ids)


class _JoinTokenizer(_PieceTokenizer):
    """Word-level: decode joins pieces with spaces, so single-token pieces do not concatenate."""

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return " ".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize("tokenizer_cls", [_PieceTokenizer, _JoinTokenizer])
def test_response_texts_and_offsets_are_exact_spans(tokenizer_cls):
    pieces = ["The", " bar", ".\n\n", "So", " 79", "<eos>", "<pad>"]
    tok = tokenizer_cls(pieces)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [3, 4, 6, 6, 6, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    texts, offsets = response_texts_and_offsets(tok, ids, mask)
    assert texts[0] == tok.decode([0, 1, 2, 3, 4, 5]) and texts[1] == tok.decode([3, 4])
    assert [len(o) for o in offsets] == [6, 2]
    for text, spans, row in zip(texts, offsets, ([0, 1, 2, 3, 4, 5], [3, 4])):
        for (start, end), i in zip(spans, row):
            assert text[start:end].strip() == pieces[i].strip()
    assert paragraph_ids(texts[0], offsets[0]).tolist() == [0, 0, 0, 1, 1, 1]


@pytest.fixture(scope="module")
def policy_batch():
    """Tiny Qwen2.5-VL, 2 prompts x G=2 responses, one 4x6-patch image per prompt (6 tokens)."""
    model = tiny_qwen2_5_vl(seed=0)
    inputs = tm.tiny_vl_inputs(model, images_per_sample=(1, 1, 1, 1), text_lens=(9, 9, 9, 9), image_grid=(4, 6),
                               seed=1)
    b, seq_len = inputs["input_ids"].shape
    width = 6
    response_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0], [1] * 6], dtype=torch.bool)
    # right-pad the shorter responses
    for row in range(b):
        n = int(response_mask[row].sum())
        inputs["attention_mask"][row, seq_len - width + n:] = 0
    texts = ["a b\n\nc d e f", "a\n\nb c d", "a b c\n\nd e", "a\n\nb\n\nc d e f"]
    offsets = []
    for text, n in zip(texts, response_mask.sum(1).tolist()):
        spans, pos = [], 0
        for word in text.replace("\n\n", " \n\n ").split(" "):
            if word == "\n\n":
                continue
            pos = text.index(word, pos)
            spans.append((pos, pos + len(word)))
            pos += len(word)
        assert len(spans) == n
        offsets.append(spans)
    return model, inputs, response_mask, texts, offsets


def test_advantages_from_forward_match_independent_alpha(policy_batch):
    model, inputs, response_mask, texts, offsets = policy_batch
    kawhi = KAWHI(seed=0)
    step = KAWHIStep(kawhi, image_token_id=tm.IMAGE_TOKEN_ID)
    images = [torch.randint(0, 255, (56, 84, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(s))
              for s in (0, 1)]
    key_mask = step.key_mask(inputs["input_ids"], images, [(2, 3), (2, 3)], row_images=[[0], [0], [1], [1]])
    assert torch.equal(key_mask[0], key_mask[1]) and torch.equal(key_mask[2], key_mask[3])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    seq_len = inputs["input_ids"].shape[1]
    with torch.no_grad(), step.capture(model, response_mask, seq_len) as cap:
        model(**inputs)
    out = step.advantages(cap, key_mask=key_mask, response_mask=response_mask, texts=texts, offsets=offsets,
                          rewards=rewards, group_size=2)
    assert out.advantages.shape == response_mask.shape
    # independent α: mean cosine over heads and selected keys, by einsum on the record
    record = cap.records[1]
    cu_q, cu_k = record.cu_seqlens_q.tolist(), record.cu_seqlens_k.tolist()
    for b in range(4):
        q = record.q[cu_q[b]:cu_q[b + 1]].double()
        k = record.k[cu_k[b]:cu_k[b + 1]].double()[key_mask[b, record.k_pos[cu_k[b]:cu_k[b + 1]]]]
        k = k.repeat_interleave(2, dim=1)
        cos = torch.einsum("thd,vhd->thv", q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True))
        torch.testing.assert_close(out.alpha[cu_q[b]:cu_q[b + 1]].double(), cos.mean(dim=(1, 2)), atol=1e-6, rtol=1e-5)
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    torch.testing.assert_close(out.advantages, advantages[:, None] * out.token_weights * response_mask, atol=1e-5, rtol=1e-5)
    assert float(out.token_weights[response_mask].std()) > 0


def test_advantages_from_forward_rejects_wrong_query_rows(policy_batch):
    model, inputs, response_mask, texts, offsets = policy_batch
    key_mask = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    with torch.no_grad(), capture_qk(model, [-1]) as cap:        # no query_mask: every token is a query row
        model(**inputs)
    with pytest.raises(ValueError, match="response_query_mask"):
        kawhi_advantages_from_forward(cap.records[1], kawhi=KAWHI(), key_mask=key_mask, response_mask=response_mask,
                                      texts=texts, offsets=offsets, advantages=torch.zeros(4))
    query_mask = response_query_mask(response_mask, key_mask.shape[1])
    with torch.no_grad(), capture_qk(model, [-1], query_mask=query_mask) as cap:
        model(**inputs)
    with pytest.raises(ValueError, match="advantages"):
        kawhi_advantages_from_forward(cap.records[1], kawhi=KAWHI(), key_mask=key_mask, response_mask=response_mask,
                                      texts=texts, offsets=offsets)
    out = kawhi_advantages_from_forward(cap.records[1], kawhi=KAWHI(), key_mask=key_mask, response_mask=response_mask,
                                        texts=texts, offsets=offsets, advantages=torch.tensor([1.0, -1.0, 0.5, 2.0]))
    # no selected image key anywhere: plain GRPO (weight 1)
    torch.testing.assert_close(out.token_weights[response_mask], torch.ones(int(response_mask.sum())))


def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 5, generator=g) * 0.1 - 1.0).requires_grad_(True)
    old = logp.detach() + torch.randn(3, 5, generator=g) * 0.3
    adv = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    return logp, old, adv, mask


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_grpo_token_loss_matches_formula(agg):
    logp, old, adv, mask = _loss_inputs()
    loss = grpo_token_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, agg=agg)
    expected_terms = torch.zeros(3, 5)
    for b in range(3):
        for t in range(5):
            r = float(torch.exp(logp[b, t] - old[b, t]))
            a = float(adv[b, t])
            expected_terms[b, t] = -min(r * a, min(max(r, 0.8), 1.28) * a)
    m = mask.float()
    if agg == "token-mean":
        expected = (expected_terms * m).sum() / m.sum()
    else:
        expected = ((expected_terms * m).sum(1) / m.sum(1)).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-5)


def test_gspo_token_loss_value_and_per_token_gradient():
    logp, old, adv, mask = _loss_inputs()
    m = mask.float()
    loss = gspo_token_loss(logp, old, adv, mask, eps_low=10.0, eps_high=10.0)   # wide clip: unclipped branch
    s = torch.exp(((logp - old) * m).sum(1) / m.sum(1)).detach()              # sequence ratio s_g
    expected = ((-(s[:, None] * adv) * m).sum(1) / m.sum(1)).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-5)
    loss.backward()
    # ∂/∂logp_{g,t} of −s_g Â_{g,t} π/sg[π] averaged: −s_g Â_{g,t} / (T_g · B): each token keeps its own Â
    grad = -(s[:, None] * adv * m) / m.sum(1, keepdim=True) / 3
    torch.testing.assert_close(logp.grad, grad, atol=1e-6, rtol=1e-5)
    # with [B] advantages the GSPO-token value equals GSPO's
    logp2 = logp.detach().requires_grad_(True)
    seq_adv = adv[:, 0]
    value = gspo_token_loss(logp2, old, seq_adv, mask, eps_low=10.0, eps_high=10.0)
    torch.testing.assert_close(value.detach(), -(s * seq_adv).mean(), atol=1e-6, rtol=1e-5)


def test_loss_argument_errors():
    logp, old, adv, mask = _loss_inputs()
    with pytest.raises(ValueError, match="agg"):
        grpo_token_loss(logp, old, adv, mask, agg="sum")
    with pytest.raises(ValueError, match="advantages"):
        grpo_token_loss(logp, old, adv[:, :2], mask)
    with pytest.raises(ValueError, match="old_logp"):
        gspo_token_loss(logp, old[:2], adv, mask)


def test_plain_pytorch_example_runs():
    example = _load(ROOT / "examples" / "plain_pytorch_grpo.py", "kawhi_plain_example")
    summary = example.run("dapo", iterations=2, verbose=False)
    assert len(summary["losses"]) == 2 and all(torch.isfinite(torch.tensor(summary["losses"])))
    mask = summary["response_mask"]
    weights = summary["token_weights"]
    assert float(weights[mask].min()) >= 0.1 - 1e-6 and float(weights[mask].max()) <= 1.0 + 1e-6
    assert summary["advantages"].shape == mask.shape
    assert bool((summary["advantages"][~mask] == 0).all())
