"""KAWHI pipeline: composition of the ops vs the paper's equations written out by hand."""
import math

import numpy as np
import pytest
import torch

from kawhi_kernels import KAWHI, select_key_regions, vision_critical_heads


def hand_alpha(q_row, k_seq, selected, heads, group):
    """Eq. 13: mean over heads and selected keys of cos(q_t^h, k_v^h)."""
    values = [torch.nn.functional.cosine_similarity(q_row[h].double(), k_seq[v, h // group].double(), dim=0)
              for h in heads for v in selected]
    return float(torch.stack(values).mean())


def hand_weights(alpha_tokens, para, tau, lam, w_min, w_max):
    """Eq. 14-15 for one response (paragraph ids 0..M-1 per token)."""
    m = max(para) + 1
    abar = np.array([np.mean([a for a, p in zip(alpha_tokens, para) if p == j]) for j in range(m)])
    soft = np.exp(abar / tau - np.max(abar / tau))
    soft /= soft.sum()
    wt = (1 - lam) * soft + lam / m
    w = w_min + (w_max - w_min) * wt
    return [w[p] for p in para]


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hq, hk, d = 8, 2, 32
    texts = ["First look at the bars.\n\nJune is tallest.", "Only one paragraph here.",
             "No image for this one.\n\nStill two paragraphs."]
    offsets, lengths = [], []
    for text in texts:
        spans = [(m.start(), m.end()) for m in __import__("re").finditer(r"\S+|\n\n", text)]
        offsets.append(spans)
        lengths.append(len(spans))
    key_lens = [12, 10, 7]
    q = torch.randn(sum(lengths), hq, d, generator=g)
    k = torch.randn(sum(key_lens), hk, d, generator=g)
    cu_q = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(np.cumsum(key_lens)), dtype=torch.int32)
    key_region = torch.full((sum(key_lens),), -1, dtype=torch.int32)
    key_region[[1, 2, 5, 7]] = 0          # sequence 0: four selected image keys
    key_region[[12 + 3, 12 + 4]] = 0      # sequence 1: two; sequence 2: none (no image)
    mask = torch.zeros(3, max(lengths), dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    return q, k, cu_q, cu_k, key_region, texts, offsets, mask, lengths


def test_reweight_matches_equations_by_hand():
    q, k, cu_q, cu_k, key_region, texts, offsets, mask, lengths = make_batch()
    heads = [0, 3, 5]
    kawhi = KAWHI(heads=heads, tau=0.05, lam=0.1, seed=0)
    advantages = torch.tensor([0.8, -1.2, 0.5])
    out = kawhi.reweight(advantages, q, k, cu_q, cu_k, key_region, texts, offsets, mask)
    for b in range(3):
        q0, k0, k1 = int(cu_q[b]), int(cu_k[b]), int(cu_k[b + 1])
        selected = [j for j in range(k1 - k0) if int(key_region[k0 + j]) == 0]
        n = lengths[b]
        para = out.paragraph_ids[q0:q0 + n].tolist()
        if not selected:  # no image: plain GRPO
            assert torch.all(out.token_weights[b, :n] == 1)
            torch.testing.assert_close(out.advantages[b, :n], torch.full((n,), float(advantages[b])))
            continue
        alpha = [hand_alpha(q[q0 + t], k[k0:k1], selected, heads, 4) for t in range(n)]
        torch.testing.assert_close(out.alpha[q0:q0 + n].double(), torch.tensor(alpha, dtype=torch.float64),
                                   atol=1e-6, rtol=1e-5)
        # "\n\n" is token 5 and joins the preceding paragraph.
        expected_para = [0] * n if b == 1 else [0] * 6 + [1] * (n - 6)
        assert para == expected_para
        want = hand_weights(alpha, para, 0.05, 0.1, 0.1, 1.0)
        torch.testing.assert_close(out.token_weights[b, :n].double(), torch.tensor(want), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.advantages[b, :n].double(), float(advantages[b]) * torch.tensor(want),
                                   atol=1e-6, rtol=1e-5)
    assert out.advantages[1, lengths[1]:].abs().sum() == 0     # padding stays 0
    # A single paragraph always gets weight w_min + (w_max - w_min) * 1 = 1.
    assert torch.allclose(out.token_weights[1, :lengths[1]], torch.ones(lengths[1]))


def test_reweight_rejects_mismatched_layouts():
    q, k, cu_q, cu_k, key_region, texts, offsets, mask, lengths = make_batch()
    kawhi = KAWHI(heads=None)
    bad_mask = mask.clone()
    bad_mask[0, lengths[0] - 1] = False
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        kawhi.reweight(torch.zeros(3), q, k, cu_q, cu_k, key_region, texts, offsets, bad_mask)
    with pytest.raises(ValueError, match="texts"):
        kawhi.reweight(torch.zeros(3), q, k, cu_q, cu_k, key_region, texts[:2], offsets, mask)


def test_key_region_for_batch_shares_selection_across_responses():
    image = torch.from_numpy((np.random.default_rng(0).random((56, 84, 3)) * 255).astype(np.uint8))
    kawhi = KAWHI(heads=None, seed=3)
    regions = kawhi.select_regions([image], [(2, 3)])
    n = 6
    # Two responses of the same prompt: keys [text, image×6, text] each.
    is_image = torch.tensor(([False] + [True] * n + [False]) * 2)
    owner = torch.zeros(16, dtype=torch.int64)
    key_region = kawhi.key_region_for_batch(is_image, owner, regions)
    first, second = key_region[1:1 + n], key_region[9:9 + n]
    assert torch.equal(first, second)
    assert torch.equal(first == 0, regions[0].selected.cpu())
    assert key_region[0] == -1 and key_region[8] == -1


def test_seeded_pipeline_selection_is_reproducible():
    image = torch.from_numpy((np.random.default_rng(1).random((112, 112, 3)) * 255).astype(np.uint8))
    a = KAWHI(seed=7, skip_ratio=0.5).select_regions([image], [(4, 4)])[0]
    b = KAWHI(seed=7, skip_ratio=0.5).select_regions([image], [(4, 4)])[0]
    assert torch.equal(a.selected, b.selected)
    direct = select_key_regions(image, (4, 4), skip_ratio=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.selected, direct.selected)


def test_head_presets_and_unknown_model():
    assert vision_critical_heads("Qwen/Qwen2.5-VL-7B-Instruct") == [0, 1, 3, 22, 23, 24, 25, 26, 27]
    assert vision_critical_heads("qwen3-vl-4b") == [2, 3, 4, 12, 13, 19, 25, 27]
    assert KAWHI(heads="Qwen/Qwen3-VL-4B-Instruct").heads == [2, 3, 4, 12, 13, 19, 25, 27]
    with pytest.raises(ValueError, match="no vision-critical head preset"):
        vision_critical_heads("llava-1.5-7b")


def test_demo_runs_end_to_end(tmp_path):
    from kawhi_kernels.demo import run_demo

    summary = run_demo(device="cpu", out_dir=tmp_path, seed=0)
    assert (tmp_path / "kawhi_demo.png").stat().st_size > 10_000
    assert (tmp_path / "kawhi_demo.json").exists()
    assert summary["image_tokens"] == 12 * 16
    assert len(summary["responses"]) == 5
    for resp in summary["responses"]:
        m = len(resp["paragraphs"])
        assert m >= 3
        weights = [p["weight"] for p in resp["paragraphs"]]
        assert all(0.1 <= w <= 1.0 for w in weights)
        assert math.isclose(sum(weights) / m, 0.1 + 0.9 / m, rel_tol=1e-5)  # literal Eq. 15 mean
