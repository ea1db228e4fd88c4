"""Tests for kawhi_kernels.credit.advantages (GRPO advantages, reweighting, layout helpers)."""
from __future__ import annotations

import math

import pytest
import torch

from kawhi_kernels.credit import (
    group_advantages,
    mask_to_cu_seqlens,
    packed_to_padded,
    padded_to_packed,
    paragraph_ids_batch,
    paragraph_weights,
    reweight_advantages,
)

EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# group_advantages

def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    out = group_advantages(rewards, 4)
    # group 0: mean 0.5, population std 0.5; group 1: all equal; group 2: mean 0.25, std sqrt(3)/4
    a0 = 0.5 / (0.5 + EPS)
    s2 = math.sqrt(3) / 4
    want = [a0, -a0, -a0, a0, 0, 0, 0, 0, -0.25 / (s2 + EPS), -0.25 / (s2 + EPS), -0.25 / (s2 + EPS),
            0.75 / (s2 + EPS)]
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_group_advantages_sample_std():
    out = group_advantages(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), 3, std="sample", eps=0.0)
    s = math.sqrt(1 / 3)  # sqrt(((2/3)^2 + 2 (1/3)^2) / 2)
    assert out.dtype == torch.float64
    assert out.tolist() == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s], rel=1e-12)


def test_group_advantages_sample_std_group_of_one_is_zero():
    out = group_advantages(torch.tensor([3.0, 5.0]), 1, std="sample")
    assert out.tolist() == [0.0, 0.0]


def test_group_advantages_no_std():
    out = group_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0]), 2, std="none")
    assert out.tolist() == [-0.5, 0.5, 3.0, -3.0]


def test_group_advantages_matches_torch_reshape():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(40, generator=gen, dtype=torch.float64)
    view = rewards.view(8, 5)
    want = ((view - view.mean(1, keepdim=True)) / (view.std(1, unbiased=False, keepdim=True) + EPS)).flatten()
    torch.testing.assert_close(group_advantages(rewards, 5), want, rtol=1e-12, atol=1e-12)


def test_group_ids_arbitrary_labels():
    rewards = torch.tensor([1.0, 4.0, 3.0, 0.0, 5.0])
    ids = torch.tensor([7, 2, 7, 2, 9])
    out = group_advantages(rewards, group_ids=ids, eps=0.0)
    # group 7: [1, 3] mean 2 std 1; group 2: [4, 0] mean 2 std 2; group 9: single -> 0
    assert out.tolist() == pytest.approx([-1.0, 1.0, 1.0, -1.0, 0.0])


def test_equal_rewards_give_exact_zero_without_eps():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float64)  # mean(0.1 x3) != 0.1
    for std in ("population", "sample", "none"):
        out = group_advantages(rewards, 3, eps=0.0, std=std)
        assert out.tolist() == [0.0] * 6


def test_group_ids_consecutive_equal_group_size():
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    torch.testing.assert_close(group_advantages(rewards, 3),
                               group_advantages(rewards, group_ids=torch.tensor([0, 0, 0, 1, 1, 1])))


def test_group_advantages_integer_and_bool_rewards():
    out_bool = group_advantages(torch.tensor([True, False]), 2)
    out_int = group_advantages(torch.tensor([1, 0]), 2)
    assert out_bool.dtype == torch.float32 and out_int.dtype == torch.float32
    assert out_bool.tolist() == out_int.tolist() == pytest.approx([0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS)])


def test_rewards_not_tensor_raises():
    with pytest.raises(TypeError, match="rewards"):
        group_advantages([1.0, 0.0], 2)


def test_rewards_2d_raises():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(2, 2), 2)


def test_rewards_empty_raises():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(0), 1)


def test_rewards_nan_raises():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)


def test_group_size_not_divisor_raises():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(5), 2)


def test_group_size_zero_raises():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 0)


def test_group_size_float_raises():
    with pytest.raises(TypeError, match="group_size"):
        group_advantages(torch.zeros(4), 2.0)


def test_group_size_and_ids_both_raises():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 2, group_ids=torch.tensor([0, 0, 1, 1]))


def test_group_size_and_ids_neither_raises():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4))


def test_group_ids_wrong_length_raises():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(4), group_ids=torch.tensor([0, 0, 1]))


def test_group_ids_negative_raises():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(2), group_ids=torch.tensor([0, -1]))


def test_group_ids_float_raises():
    with pytest.raises(TypeError, match="group_ids"):
        group_advantages(torch.zeros(2), group_ids=torch.tensor([0.0, 1.0]))


def test_eps_negative_raises():
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(2), 2, eps=-1e-3)


def test_std_invalid_raises():
    with pytest.raises(ValueError, match="std"):
        group_advantages(torch.zeros(2), 2, std="unbiased")


# ---------------------------------------------------------------------------------------------
# reweight_advantages

def test_reweight_sequence_advantages_hand_computed():
    adv = torch.tensor([2.0, -1.0])
    w = torch.tensor([[0.5, 1.0, 0.1, 9.0], [0.2, 0.4, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = reweight_advantages(adv, w, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, 0.2, 0.0], [-0.2, -0.4, 0.0, 0.0]]))


def test_reweight_token_advantages():
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    w = torch.tensor([[0.5, 0.5, 2.0], [1.0, 0.1, 1.0]])
    mask = torch.tensor([[True, False, True], [True, True, True]])
    out = reweight_advantages(adv, w, mask)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.0, 6.0], [4.0, 0.5, 6.0]], dtype=torch.float64),
                               rtol=1e-7, atol=1e-7)


def test_reweight_ignores_values_outside_mask():
    adv = torch.tensor([1.0])
    w = torch.tensor([[0.5, float("nan"), float("inf")]])
    out = reweight_advantages(adv, w, torch.tensor([[True, False, False]]))
    assert out.tolist() == [[0.5, 0.0, 0.0]]


def test_reweight_low_precision_upcasts():
    out = reweight_advantages(torch.tensor([1.5], dtype=torch.bfloat16),
                              torch.tensor([[0.5, 0.25]], dtype=torch.float16), torch.ones(1, 2, dtype=torch.bool))
    assert out.dtype == torch.float32 and out.tolist() == [[0.75, 0.375]]


def test_reweight_weights_not_2d_raises():
    with pytest.raises(ValueError, match="token_weights"):
        reweight_advantages(torch.ones(2), torch.ones(2), torch.ones(2, dtype=torch.bool))


def test_reweight_weights_int_raises():
    with pytest.raises(TypeError, match="token_weights"):
        reweight_advantages(torch.ones(2), torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.bool))


def test_reweight_advantages_wrong_batch_raises():
    with pytest.raises(ValueError, match="advantages"):
        reweight_advantages(torch.ones(3), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool))


def test_reweight_advantages_wrong_2d_shape_raises():
    with pytest.raises(ValueError, match="advantages"):
        reweight_advantages(torch.ones(2, 4), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool))


def test_reweight_advantages_3d_raises():
    with pytest.raises(ValueError, match="advantages"):
        reweight_advantages(torch.ones(2, 3, 1), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool))


def test_reweight_advantages_int_raises():
    with pytest.raises(TypeError, match="advantages"):
        reweight_advantages(torch.ones(2, dtype=torch.int64), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool))


def test_reweight_mask_wrong_shape_raises():
    with pytest.raises(ValueError, match="response_mask"):
        reweight_advantages(torch.ones(2), torch.ones(2, 3), torch.ones(2, 4, dtype=torch.bool))


def test_reweight_mask_non_binary_raises():
    with pytest.raises(ValueError, match="response_mask"):
        reweight_advantages(torch.ones(2), torch.ones(2, 3), torch.full((2, 3), 2))


def test_reweight_mask_float_raises():
    with pytest.raises(TypeError, match="response_mask"):
        reweight_advantages(torch.ones(2), torch.ones(2, 3), torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------
# packed <-> padded

def test_packed_to_padded_hand_computed():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    assert packed_to_padded(values, cu).tolist() == [[1, 2, 0], [0, 0, 0], [3, 4, 5]]
    assert packed_to_padded(values, cu, T=4, fill=-1.0).tolist() == [[1, 2, -1, -1], [-1, -1, -1, -1],
                                                                     [3, 4, 5, -1]]


def test_packed_to_padded_trailing_dims_and_dtype():
    values = torch.arange(6, dtype=torch.int64).view(3, 2)
    out = packed_to_padded(values, torch.tensor([0, 1, 3]))
    assert out.dtype == torch.int64 and out.shape == (2, 2, 2)
    assert out.tolist() == [[[0, 1], [0, 0]], [[2, 3], [4, 5]]]


def test_round_trip():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 0, 5, 1])
    cu = torch.zeros(5, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    values = torch.randn(int(cu[-1]), generator=gen)
    padded = packed_to_padded(values, cu, T=6)
    mask = torch.arange(6)[None, :] < lengths[:, None]
    assert torch.equal(padded_to_packed(padded, mask), values)
    assert torch.equal(mask_to_cu_seqlens(mask), cu)
    assert torch.equal(padded_to_packed(padded, mask.to(torch.int32)), values)


def test_packed_to_padded_T_too_small_raises():
    with pytest.raises(ValueError, match="T"):
        packed_to_padded(torch.ones(5), torch.tensor([0, 2, 5]), T=2)


def test_packed_to_padded_T_wrong_type_raises():
    with pytest.raises(TypeError, match="T"):
        packed_to_padded(torch.ones(5), torch.tensor([0, 2, 5]), T=4.0)


def test_packed_to_padded_cu_mismatch_raises():
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_to_padded(torch.ones(5), torch.tensor([0, 2, 4]))


def test_packed_to_padded_scalar_raises():
    with pytest.raises(ValueError, match="values"):
        packed_to_padded(torch.tensor(1.0), torch.tensor([0, 1]))


def test_padded_to_packed_mask_shape_raises():
    with pytest.raises(ValueError, match="mask"):
        padded_to_packed(torch.ones(2, 3), torch.ones(2, 2, dtype=torch.bool))


def test_padded_to_packed_values_1d_raises():
    with pytest.raises(ValueError, match="values"):
        padded_to_packed(torch.ones(3), torch.ones(3, dtype=torch.bool))


def test_mask_to_cu_seqlens_non_binary_raises():
    with pytest.raises(ValueError, match="mask"):
        mask_to_cu_seqlens(torch.tensor([[0, 3]]))


# ---------------------------------------------------------------------------------------------
# End to end: texts -> paragraph ids -> weights -> padded -> reweighted advantages.

def test_end_to_end_pipeline():
    texts = ["A.\n\nB.", "only one", ""]
    offsets = [[(0, 2), (2, 4), (4, 6), (0, 0)], [(0, 4), (4, 8), (0, 0)], [(0, 0)]]
    ids, cu = paragraph_ids_batch(texts, offsets)
    assert ids.tolist() == [0, 0, 1, 1, 0, 0, 0, -1]
    alpha = torch.tensor([0.2, 0.4, -0.1, -0.3, 0.5, 0.5, 0.5, 0.9], dtype=torch.float64)
    w = paragraph_weights(alpha, ids, cu, tau=0.1, lam=0.2)
    # response 0: abar = (0.3, -0.2); softmax over abar/tau
    s0 = 1 / (1 + math.exp(-5.0))
    w0 = 0.1 + 0.9 * (0.8 * s0 + 0.1)
    w1 = 0.1 + 0.9 * (0.8 * (1 - s0) + 0.1)
    assert w.tolist() == pytest.approx([w0, w0, w1, w1, 1.0, 1.0, 1.0, 1.0], abs=1e-12)
    padded = packed_to_padded(w, cu)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    out = reweight_advantages(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64), padded, mask)
    want = torch.tensor([[2 * w0, 2 * w0, 2 * w1, 2 * w1], [-1, -1, -1, 0], [0.5, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
