"""The benchmark's roofline formula (CPU-testable; the columns are filled on GPU rows only)."""
import pytest
import torch

from kawhi_kernels.bench.roofline import chip_limits, device_limits, roofline, softmax_scores


def test_softmax_scores_count_bottom_right_causal_pairs_per_head():
    cu_q = torch.tensor([0, 3, 3, 7])
    cu_k = torch.tensor([0, 5, 9, 11])
    # seq 0: Lq 3, Lk 5 -> rows see 3, 4, 5 keys; seq 1: no rows; seq 2: Lq 4 > Lk 2 -> 0, 0, 1, 2.
    assert softmax_scores(cu_q, cu_k, 2, causal=True) == 2 * (12 + 3)
    assert softmax_scores(cu_q, cu_k, 3, causal=False) == 3 * (15 + 8)
    brute = 0
    for b in range(3):
        lq, lk = int(cu_q[b + 1] - cu_q[b]), int(cu_k[b + 1] - cu_k[b])
        brute += int(torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq).sum())
    assert softmax_scores(cu_q, cu_k, 1, causal=True) == brute


def test_headline_shape_on_an_h100_is_exp_bound():
    """H100 SXM (132 SMs, 1.98 GHz, sm_90): 16 ex2 and 4096 FLOPs per SM per clock; with D = 128
    a score costs 256 FLOPs = 1/16 clock of tensor cores, exactly its exp cost: the bounds tie
    (reported as exp)."""
    limits = chip_limits(132, 1.98e9, (9, 0))
    assert limits["exp_per_s"] == pytest.approx(16 * 132 * 1.98e9)
    assert limits["tensor_flops_per_s"] == pytest.approx(4096 * 132 * 1.98e9)
    rows = torch.arange(2048, 4096, dtype=torch.int64)
    scores = 8 * 28 * int((rows + 1).sum())
    cu = torch.arange(9) * 4096
    assert softmax_scores(torch.arange(9) * 2048, cu, 28, True) == scores
    line = roofline(scores, 128, 2e-3, limits)
    assert line["limit"] == "exp"
    assert line["scores_per_s"] == pytest.approx(scores / 2e-3)
    assert line["fraction"] == pytest.approx(scores / limits["exp_per_s"] / 2e-3)
    # D = 256 turns it tensor-core bound; an untabulated arch keeps the exp bound only.
    assert roofline(scores, 256, 2e-3, limits)["limit"] == "tensor"
    assert chip_limits(84, 1.7e9, (8, 6))["tensor_flops_per_s"] is None
    assert roofline(scores, 256, 2e-3, chip_limits(84, 1.7e9, (8, 6)))["limit"] == "exp"


def test_bad_values_and_cpu_devices():
    with pytest.raises(ValueError, match="seconds"):
        roofline(10, 128, 0.0, chip_limits(1, 1e9, (9, 0)))
    with pytest.raises(ValueError, match="sm_count"):
        chip_limits(0, 1e9, (9, 0))
    assert device_limits(torch.device("cpu")) is None
