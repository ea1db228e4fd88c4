"""Tests for kawhi_kernels.credit.weights.paragraph_weights (paper Eq. 15)."""
from __future__ import annotations

import math
import random

import pytest
import torch

import kawhi_kernels.credit.weights as weights_module
from kawhi_kernels.credit import paragraph_weights


def _oracle(alpha, ids, cu, *, tau=0.05, lam=0.1, w_min=0.1, w_max=1.0, rescale=None):
    """float64 brute force with Python loops, straight from the formula."""
    alpha = [float(a) for a in alpha]
    ids = [int(i) for i in ids]
    cu = [int(c) for c in cu]
    out = [1.0] * len(alpha)
    for b in range(len(cu) - 1):
        toks = range(cu[b], cu[b + 1])
        paras = sorted({ids[t] for t in toks if ids[t] >= 0})
        m = len(paras)
        if m == 0:
            continue
        abar = {}
        for j in paras:
            vals = [alpha[t] for t in toks if ids[t] == j]
            abar[j] = sum(vals) / len(vals)
        top = max(abar.values())
        ex = {j: math.exp((abar[j] - top) / tau) for j in paras}
        z = sum(ex.values())
        w = {j: w_min + (w_max - w_min) * ((1 - lam) * ex[j] / z + lam / m) for j in paras}
        for t in toks:
            if ids[t] >= 0:
                out[t] = w[ids[t]]
        if rescale == "mean":
            members = [t for t in toks if ids[t] >= 0]
            mean = sum(out[t] for t in members) / len(members)
            for t in members:
                out[t] /= mean
    return torch.tensor(out, dtype=torch.float64)


def _random_batch(rng: random.Random, *, max_b=6, max_len=20, max_m=5, dtype=torch.float64,
                  skip_ids=True, scale=0.1):
    """Ragged packed batch: responses with M = 0, M = 1, ids -1, skipped and interleaved ids."""
    b = rng.randint(1, max_b)
    lengths = [rng.randint(0, max_len) for _ in range(b)]
    ids = []
    for n in lengths:
        m = rng.randint(0, max_m)
        labels = sorted(rng.sample(range(2 * max_m), m)) if skip_ids else list(range(m))
        if m == 0:
            seq = [-1] * n
        elif rng.random() < 0.5:  # contiguous paragraphs (the usual case)
            seq = sorted(rng.choice(labels) for _ in range(n))
        else:  # interleaved, with some -1 tokens
            seq = [rng.choice(labels + [-1]) for _ in range(n)]
        ids.extend(seq)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    alpha = (scale * torch.randn(cu[-1], generator=gen, dtype=torch.float64)).clamp(-1, 1).to(dtype)
    return alpha, torch.tensor(ids, dtype=torch.int32), torch.tensor(cu, dtype=torch.int32)


@pytest.mark.parametrize("rescale", [None, "mean"])
@pytest.mark.parametrize("tau,lam,w_min,w_max", [(0.05, 0.1, 0.1, 1.0), (0.01, 0.0, 0.0, 2.0),
                                                  (1.0, 0.5, 0.3, 0.3), (0.2, 1.0, 0.1, 1.0)])
def test_matches_oracle_fp64(rescale, tau, lam, w_min, w_max):
    rng = random.Random(f"{rescale}-{tau}-{lam}-{w_min}-{w_max}")
    for _ in range(40):
        alpha, ids, cu = _random_batch(rng)
        got = paragraph_weights(alpha, ids, cu, tau=tau, lam=lam, w_min=w_min, w_max=w_max, rescale=rescale)
        assert got.dtype == torch.float64
        want = _oracle(alpha, ids, cu, tau=tau, lam=lam, w_min=w_min, w_max=w_max, rescale=rescale)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rescale", [None, "mean"])
def test_sparse_slot_path_matches_oracle(monkeypatch, rescale):
    """Force the torch.unique slot path (used for large sparse ids) and compare with the oracle."""
    monkeypatch.setattr(weights_module, "DENSE_SLOTS_PER_TOKEN", 0)
    monkeypatch.setattr(weights_module, "DENSE_SLOTS_MIN", 0)
    rng = random.Random(f"sparse-{rescale}")
    for _ in range(40):
        alpha, ids, cu = _random_batch(rng)
        got = paragraph_weights(alpha, ids, cu, rescale=rescale)
        torch.testing.assert_close(got, _oracle(alpha, ids, cu, rescale=rescale), rtol=1e-12, atol=1e-12)


def test_huge_sparse_ids():
    alpha = torch.tensor([0.3, 0.1, -0.2, 0.4, 0.0], dtype=torch.float64)
    ids = torch.tensor([2**30, 5, 2**30, -1, 2**31 - 2], dtype=torch.int64)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    got = paragraph_weights(alpha, ids, cu)
    torch.testing.assert_close(got, _oracle(alpha, ids, cu), rtol=1e-12, atol=1e-12)
    assert got[3] == 1.0 and got[4] == 1.0  # -1 token; single-paragraph response 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rescale", [None, "mean"])
def test_matches_oracle_low_precision(dtype, rescale):
    rng = random.Random(7)
    for _ in range(30):
        alpha, ids, cu = _random_batch(rng, dtype=dtype)
        got = paragraph_weights(alpha, ids.long(), cu.long(), rescale=rescale)
        assert got.dtype == torch.float32
        want = _oracle(alpha.double(), ids, cu, rescale=rescale)  # oracle on the rounded inputs
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


def test_single_paragraph_is_exactly_one():
    alpha = torch.tensor([0.3, -0.2, 0.7, 0.1, 0.5])
    ids = torch.tensor([0, 0, 0, 0, 0], dtype=torch.int32)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    for rescale in (None, "mean"):
        out = paragraph_weights(alpha, ids, cu, rescale=rescale)
        assert torch.equal(out, torch.ones(5))
    # w_min + (w_max - w_min)·1 = w_max exactly, for other ranges too
    out = paragraph_weights(alpha, ids, cu, w_min=0.3, w_max=0.7, lam=0.37, tau=0.013)
    assert torch.equal(out, torch.full((5,), 0.7))


def test_no_paragraph_and_minus_one_get_one():
    alpha = torch.tensor([0.5, 0.1, 0.9, -0.3, 0.2, 0.4])
    ids = torch.tensor([-1, -1, 0, -1, 1, -1], dtype=torch.int32)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)  # response 0: M = 0
    for rescale in (None, "mean"):
        out = paragraph_weights(alpha, ids, cu, rescale=rescale)
        assert out[[0, 1, 3, 5]].tolist() == [1.0, 1.0, 1.0, 1.0]
        assert out[2] > out[4]  # paragraph with the larger mean alpha gets the larger weight


def test_all_minus_one_and_empty():
    out = paragraph_weights(torch.randn(4), torch.full((4,), -1, dtype=torch.int32),
                            torch.tensor([0, 1, 4], dtype=torch.int32))
    assert torch.equal(out, torch.ones(4))
    out = paragraph_weights(torch.zeros(0), torch.zeros(0, dtype=torch.int32), torch.tensor([0, 0]))
    assert out.shape == (0,) and out.dtype == torch.float32


def test_literal_mean_paragraph_weight():
    gen = torch.Generator().manual_seed(3)
    for m in range(1, 9):
        n = 4 * m
        alpha = 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)
        ids = torch.arange(n, dtype=torch.int32) // 4
        out = paragraph_weights(alpha, ids, torch.tensor([0, n], dtype=torch.int32))
        para_w = out[::4]
        assert para_w.mean().item() == pytest.approx(0.1 + 0.9 / m, abs=1e-12)
        assert torch.equal(out.view(m, 4), para_w[:, None].expand(m, 4))  # constant per paragraph


def test_bounds_hold_even_when_softmax_saturates():
    rng = random.Random(11)
    for tau in (1e-4, 0.05, 10.0):
        for lam in (0.0, 0.1):
            alpha, ids, cu = _random_batch(rng, dtype=torch.float32, scale=0.5)
            out = paragraph_weights(alpha, ids, cu, tau=tau, lam=lam)
            valid = ids >= 0
            assert torch.isfinite(out).all()
            assert (out[valid] >= 0.1).all() and (out[valid] <= 1.0).all()


def test_rescale_mean_gives_token_mean_one():
    rng = random.Random(5)
    for _ in range(30):
        alpha, ids, cu = _random_batch(rng, dtype=torch.float32)
        out = paragraph_weights(alpha, ids, cu, rescale="mean")
        for b in range(cu.numel() - 1):
            seg = slice(int(cu[b]), int(cu[b + 1]))
            valid = ids[seg] >= 0
            if valid.any():
                assert out[seg][valid].double().mean().item() == pytest.approx(1.0, abs=1e-6)
            assert (out[seg][~valid] == 1.0).all()


def test_skipped_ids_are_absent_paragraphs():
    alpha = torch.tensor([0.1, 0.2, 0.9, 0.8, -0.5], dtype=torch.float64)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    sparse = paragraph_weights(alpha, torch.tensor([0, 0, 3, 3, 7], dtype=torch.int32), cu)
    dense = paragraph_weights(alpha, torch.tensor([0, 0, 1, 1, 2], dtype=torch.int32), cu)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=0)
    # M = 3 (not 8): literal paragraph-mean weight 0.1 + 0.9/3
    assert (sparse[0] + sparse[2] + sparse[4]).item() / 3 == pytest.approx(0.4, abs=1e-12)


def test_large_logits_do_not_overflow():
    alpha = torch.tensor([1.0, 1.0, -1.0, 0.999], dtype=torch.float32)
    ids = torch.tensor([0, 0, 1, 2], dtype=torch.int32)
    out = paragraph_weights(alpha, ids, torch.tensor([0, 4], dtype=torch.int32), tau=1e-6, lam=0.0)
    assert torch.isfinite(out).all()
    assert out.tolist() == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_responses_are_independent():
    rng = random.Random(9)
    alpha, ids, cu = _random_batch(rng, max_b=5)
    full = paragraph_weights(alpha, ids, cu)
    for b in range(cu.numel() - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        alone = paragraph_weights(alpha[s:e], ids[s:e], torch.tensor([0, e - s], dtype=torch.int32))
        torch.testing.assert_close(full[s:e], alone, rtol=0, atol=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rescale", [None, "mean"])
def test_cuda_matches_cpu(rescale):
    rng = random.Random(13)
    for _ in range(10):
        alpha, ids, cu = _random_batch(rng, max_b=64, max_len=300, max_m=12, dtype=torch.float32)
        cpu = paragraph_weights(alpha, ids, cu, rescale=rescale)
        gpu = paragraph_weights(alpha.cuda(), ids.cuda(), cu.cuda(), rescale=rescale)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Validation: one test per rule.

def _ok():
    return (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 1, 1], dtype=torch.int32),
            torch.tensor([0, 3], dtype=torch.int32))


def test_alpha_not_tensor_raises():
    _, ids, cu = _ok()
    with pytest.raises(TypeError, match="alpha"):
        paragraph_weights([0.1, 0.2, 0.3], ids, cu)


def test_alpha_int_dtype_raises():
    _, ids, cu = _ok()
    with pytest.raises(TypeError, match="alpha"):
        paragraph_weights(torch.tensor([1, 2, 3]), ids, cu)


def test_alpha_wrong_rank_raises():
    _, ids, cu = _ok()
    with pytest.raises(ValueError, match="alpha"):
        paragraph_weights(torch.zeros(3, 1), ids, cu)


def test_alpha_nan_raises():
    alpha, ids, cu = _ok()
    alpha[1] = float("nan")
    with pytest.raises(ValueError, match="alpha"):
        paragraph_weights(alpha, ids, cu)


def test_ids_float_dtype_raises():
    alpha, _, cu = _ok()
    with pytest.raises(TypeError, match="paragraph_ids"):
        paragraph_weights(alpha, torch.tensor([0.0, 1.0, 1.0]), cu)


def test_ids_wrong_length_raises():
    alpha, _, cu = _ok()
    with pytest.raises(ValueError, match="paragraph_ids"):
        paragraph_weights(alpha, torch.tensor([0, 1], dtype=torch.int32), cu)


def test_ids_below_minus_one_raises():
    alpha, _, cu = _ok()
    with pytest.raises(ValueError, match="paragraph_ids"):
        paragraph_weights(alpha, torch.tensor([0, -2, 1], dtype=torch.int32), cu)


def test_ids_too_large_raises():
    alpha, _, cu = _ok()
    with pytest.raises(ValueError, match="paragraph_ids"):
        paragraph_weights(alpha, torch.tensor([0, 2**31, 1], dtype=torch.int64), cu)


def test_cu_seqlens_wrong_total_raises():
    alpha, ids, _ = _ok()
    with pytest.raises(ValueError, match="cu_seqlens"):
        paragraph_weights(alpha, ids, torch.tensor([0, 2], dtype=torch.int32))


def test_cu_seqlens_not_monotone_raises():
    alpha, ids, _ = _ok()
    with pytest.raises(ValueError, match="cu_seqlens"):
        paragraph_weights(alpha, ids, torch.tensor([0, 2, 1, 3], dtype=torch.int32))


def test_cu_seqlens_nonzero_start_raises():
    alpha, ids, _ = _ok()
    with pytest.raises(ValueError, match="cu_seqlens"):
        paragraph_weights(alpha, ids, torch.tensor([1, 3], dtype=torch.int32))


def test_cu_seqlens_float_raises():
    alpha, ids, _ = _ok()
    with pytest.raises(TypeError, match="cu_seqlens"):
        paragraph_weights(alpha, ids, torch.tensor([0.0, 3.0]))


def test_cu_seqlens_too_short_raises():
    alpha, ids, _ = _ok()
    with pytest.raises(ValueError, match="cu_seqlens"):
        paragraph_weights(alpha, ids, torch.tensor([3], dtype=torch.int32))


@pytest.mark.parametrize("tau", [0.0, -0.1, float("inf")])
def test_tau_not_positive_finite_raises(tau):
    with pytest.raises(ValueError, match="tau"):
        paragraph_weights(*_ok(), tau=tau)


def test_tau_wrong_type_raises():
    with pytest.raises(TypeError, match="tau"):
        paragraph_weights(*_ok(), tau="0.05")


@pytest.mark.parametrize("lam", [-0.01, 1.01, float("nan")])
def test_lam_out_of_range_raises(lam):
    with pytest.raises(ValueError, match="lam"):
        paragraph_weights(*_ok(), lam=lam)


def test_w_min_negative_raises():
    with pytest.raises(ValueError, match="w_min"):
        paragraph_weights(*_ok(), w_min=-0.1)


def test_w_max_below_w_min_raises():
    with pytest.raises(ValueError, match="w_max"):
        paragraph_weights(*_ok(), w_min=0.5, w_max=0.4)


def test_w_bool_raises():
    with pytest.raises(TypeError, match="w_max"):
        paragraph_weights(*_ok(), w_max=True)


@pytest.mark.parametrize("rescale", ["sum", "Mean", 1, True])
def test_rescale_invalid_raises(rescale):
    with pytest.raises(ValueError, match="rescale"):
        paragraph_weights(*_ok(), rescale=rescale)


def test_rescale_mean_with_zero_w_max_raises():
    with pytest.raises(ValueError, match="w_max"):
        paragraph_weights(*_ok(), w_min=0.0, w_max=0.0, rescale="mean")
