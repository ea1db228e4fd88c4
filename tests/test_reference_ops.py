"""Reference ops vs float64 brute force written independently (plain loops over rows and keys)."""
import math

import numpy as np
import pytest
import torch

from kawhi_kernels.ops.attention_mass import attention_mass, attention_mass_naive
from kawhi_kernels.ops.cosine_alignment import cosine_alignment
from kawhi_kernels.ops.grid_pyramid import grid_pyramid
from kawhi_kernels.reference import attention_mass_reference
from kawhi_kernels.regions.grids import image_key_regions, llm_grid_thw


def random_varlen(seed, lens_q, lens_k, hq, hk, d, num_regions, num_segments=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lens_q), sum(lens_k)
    q = torch.randn(total_q, hq, d, generator=g).to(dtype)
    k = (torch.randn(total_k, hk, d, generator=g) * 1.5).to(dtype)
    cu_q = torch.tensor([0] + list(np.cumsum(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(np.cumsum(lens_k)), dtype=torch.int32)
    key_region = torch.randint(-1, max(num_regions, 1), (total_k,), generator=g, dtype=torch.int32)
    if num_regions == 0:
        key_region.fill_(-1)
    segment = None
    if num_segments is not None:
        segment = torch.randint(-1, num_segments, (total_q,), generator=g, dtype=torch.int32)
    return q, k, cu_q, cu_k, key_region, segment


def brute_force_mass(q, k, cu_q, cu_k, key_region, num_regions, segment, num_segments, heads,
                     causal, scale, lse=None):
    """Row-by-row float64 softmax, summed by hand."""
    q, k = q.double(), k.double()
    hq, hk = q.shape[1], k.shape[1]
    heads = list(range(hq)) if heads is None else heads
    per_row = torch.zeros(q.shape[0], len(heads), num_regions, dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        lq, lk = q1 - q0, k1 - k0
        for i in range(lq):
            last = i + lk - lq if causal else lk - 1
            visible = list(range(0, min(last, lk - 1) + 1))
            if not visible:
                continue
            for slot, h in enumerate(heads):
                kv = h // (hq // hk)
                s = torch.stack([scale * torch.dot(q[q0 + i, h], k[k0 + j, kv]) for j in visible])
                norm = torch.logsumexp(s, 0) if lse is None else lse[h, q0 + i].double()
                p = torch.exp(s - norm)
                for pj, j in zip(p, visible):
                    r = int(key_region[k0 + j])
                    if r >= 0:
                        per_row[q0 + i, slot, r] += pj
    if segment is None:
        return per_row
    out = torch.zeros(num_segments, len(heads), num_regions, dtype=torch.float64)
    for i in range(q.shape[0]):
        if int(segment[i]) >= 0:
            out[int(segment[i])] += per_row[i]
    return out


CASES = [
    # lens_q, lens_k, hq, hk, d
    ([3, 5, 0], [7, 9, 4], 4, 4, 64),      # GQA 1, an empty query sequence
    ([4, 6], [4, 11], 8, 2, 80),           # GQA 4, Lq == Lk in one sequence
    ([5, 2, 3], [3, 8, 0], 7, 1, 128),     # GQA 7, Lq > Lk (rows with no visible key), Lk = 0
]


@pytest.mark.parametrize("lens_q,lens_k,hq,hk,d", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_mass_matches_brute_force(lens_q, lens_k, hq, hk, d, causal):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, cu_q, cu_k, kr, _ = random_varlen(seed, lens_q, lens_k, hq, hk, d, num_regions=5)
    heads = [hq - 1, 0] if hq > 1 else None
    got = attention_mass(q, k, cu_q, cu_k, kr, 5, heads=heads, causal=causal, backend="torch")
    want = brute_force_mass(q, k, cu_q, cu_k, kr, 5, None, None, heads, causal, 1 / math.sqrt(d))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("lens_q,lens_k,hq,hk,d", CASES)
def test_attention_mass_segments_and_empty_segments(lens_q, lens_k, hq, hk, d):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, cu_q, cu_k, kr, seg = random_varlen(seed, lens_q, lens_k, hq, hk, d, 4, num_segments=6)
    seg[seg == 5] = 0  # segment 5 is guaranteed empty
    got = attention_mass(q, k, cu_q, cu_k, kr, 4, query_segment=seg, num_segments=6, backend="torch")
    want = brute_force_mass(q, k, cu_q, cu_k, kr, 4, seg, 6, None, True, 1 / math.sqrt(d))
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5, msg=f"seed {seed}")
    assert torch.all(got[5] == 0)


def test_attention_mass_fp64_is_exact_and_lse_path():
    q, k, cu_q, cu_k, kr, _ = random_varlen(3, [4, 6], [9, 6], 8, 2, 64, 3, dtype=torch.float64)
    scale = 0.3
    want = brute_force_mass(q, k, cu_q, cu_k, kr, 3, None, None, None, True, scale)
    got = attention_mass(q, k, cu_q, cu_k, kr, 3, softmax_scale=scale, backend="torch")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    # lse computed independently: log Σ exp over visible keys; a wrong lse must change the result.
    lse = torch.full((8, q.shape[0]), float("-inf"))
    for b in range(2):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        for i in range(q1 - q0):
            last = i + (k1 - k0) - (q1 - q0)
            if last < 0:
                continue
            for h in range(8):
                s = scale * (k[k0:k0 + last + 1, h // 4] @ q[q0 + i, h])
                lse[h, q0 + i] = torch.logsumexp(s, 0).float()
    with_lse = attention_mass(q, k, cu_q, cu_k, kr, 3, softmax_scale=scale, lse=lse, backend="torch")
    torch.testing.assert_close(with_lse, want, atol=1e-6, rtol=1e-6)
    shifted = attention_mass(q, k, cu_q, cu_k, kr, 3, softmax_scale=scale, lse=lse + 1.0, backend="torch")
    torch.testing.assert_close(shifted, want * math.exp(-1.0), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_attention_mass_low_precision_inputs(dtype, atol):
    q, k, cu_q, cu_k, kr, _ = random_varlen(5, [6, 3], [10, 12], 4, 2, 64, 3)
    want = attention_mass(q, k, cu_q, cu_k, kr, 3, backend="torch")
    got = attention_mass(q.to(dtype), k.to(dtype), cu_q, cu_k, kr, 3, backend="torch")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def test_attention_mass_rows_without_visible_region_key_are_zero_and_mass_sums_to_one():
    q, k, cu_q, cu_k, _, _ = random_varlen(8, [5], [5], 2, 1, 64, 2)
    key_region = torch.tensor([-1, -1, 0, 1, 1], dtype=torch.int32)
    got = attention_mass(q, k, cu_q, cu_k, key_region, 2, backend="torch")
    assert torch.all(got[:2] == 0)               # rows 0, 1 see only keys with region -1
    every_key = torch.zeros(5, dtype=torch.int32)
    total = attention_mass(q, k, cu_q, cu_k, every_key, 1, backend="torch")
    torch.testing.assert_close(total, torch.ones_like(total))
    assert not torch.isnan(got).any()


def test_reference_chunking_bounds_memory_and_keeps_results():
    q, k, cu_q, cu_k, kr, seg = random_varlen(9, [17, 13], [21, 30], 8, 2, 64, 4, num_segments=3)
    full = attention_mass_reference(q, k, cu_q, cu_k, kr, 4, query_segment=seg, num_segments=3)
    tiny = attention_mass_reference(q, k, cu_q, cu_k, kr, 4, query_segment=seg, num_segments=3,
                                    chunk_elements=50)  # one row per chunk
    torch.testing.assert_close(tiny, full, atol=1e-6, rtol=1e-6)


def test_naive_baseline_agrees_with_reference():
    q, k, cu_q, cu_k, kr, seg = random_varlen(10, [7, 4], [12, 9], 8, 2, 64, 5, num_segments=3)
    kwargs = dict(query_segment=seg, num_segments=3, heads=[1, 6])
    ref = attention_mass(q, k, cu_q, cu_k, kr, 5, backend="torch", **kwargs)
    naive = attention_mass_naive(q, k, cu_q, cu_k, kr, 5, **kwargs)
    torch.testing.assert_close(naive, ref, atol=1e-6, rtol=1e-5)


def test_ops_record_no_autograd_and_trace_under_compile():
    q, k, cu_q, cu_k, kr, _ = random_varlen(11, [4], [6], 4, 2, 64, 2)
    q.requires_grad_(True)
    out = attention_mass(q, k, cu_q, cu_k, kr, 2, backend="torch")
    assert not out.requires_grad and out.grad_fn is None
    compiled = torch.compile(lambda a, b: attention_mass(a, b, cu_q, cu_k, kr, 2, backend="torch"),
                             fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q.detach(), k), out)


# ---------------------------------------------------------------- cosine_alignment


def brute_force_cosine(q, k, cu_q, cu_k, key_region, num_regions, heads, per_head):
    q, k = q.double(), k.double()
    hq, hk = q.shape[1], k.shape[1]
    heads = list(range(hq)) if heads is None else heads
    out = torch.zeros(q.shape[0], len(heads), num_regions, dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        for i in range(int(cu_q[b]), int(cu_q[b + 1])):
            for slot, h in enumerate(heads):
                for r in range(num_regions):
                    keys = [j for j in range(int(cu_k[b]), int(cu_k[b + 1])) if int(key_region[j]) == r]
                    if keys:
                        cos = [torch.nn.functional.cosine_similarity(q[i, h], k[j, h // (hq // hk)], dim=0)
                               for j in keys]
                        out[i, slot, r] = torch.stack(cos).mean()
    return out if per_head else out.mean(1)


@pytest.mark.parametrize("lens_q,lens_k,hq,hk,d", CASES)
@pytest.mark.parametrize("per_head", [False, True])
def test_cosine_alignment_matches_brute_force(lens_q, lens_k, hq, hk, d, per_head):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, cu_q, cu_k, kr, _ = random_varlen(seed, lens_q, lens_k, hq, hk, d, num_regions=3)
    kr[kr == 2] = -1  # region 2 has no key: must give 0
    heads = [0, hq - 1] if hq > 2 else None
    got = cosine_alignment(q, k, cu_q, cu_k, kr, 3, heads=heads, per_head=per_head, backend="torch")
    want = brute_force_cosine(q, k, cu_q, cu_k, kr, 3, heads, per_head)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5, msg=f"seed {seed}")
    assert torch.all(got[..., 2] == 0)


def test_cosine_alignment_zero_vectors_give_zero_not_nan():
    q, k, cu_q, cu_k, kr, _ = random_varlen(1, [3], [4], 2, 1, 64, 1)
    q[0] = 0
    k[1] = 0
    kr = torch.zeros(4, dtype=torch.int32)
    got = cosine_alignment(q, k, cu_q, cu_k, kr, 1, backend="torch")
    assert torch.all(got[0] == 0) and not torch.isnan(got).any()


# ---------------------------------------------------------------- grid pyramid + region ids


def test_grid_pyramid_matches_brute_force_with_ragged_edges():
    grids = torch.tensor([[1, 5, 7], [2, 3, 4], [1, 1, 1]])
    n = int((grids.prod(1)).sum())
    mass = torch.rand(2, 3, n, dtype=torch.float64)
    levels = grid_pyramid(mass, grids, [1, 2, 3, 4])
    for cell, got in zip([1, 2, 3, 4], levels):
        want, offset, base = [], 0, 0
        for t, h, w in grids.tolist():
            image = mass[..., offset:offset + t * h * w].reshape(2, 3, t, h, w)
            for f in range(t):
                for r in range(0, h, cell):
                    for c in range(0, w, cell):
                        want.append(image[..., f, r:r + cell, c:c + cell].sum((-1, -2)))
            offset += t * h * w
        torch.testing.assert_close(got, torch.stack(want, -1))
    torch.testing.assert_close(levels[0], mass)
    for got in levels:  # every level conserves the total mass
        torch.testing.assert_close(got.sum(-1), mass.sum(-1))


def test_grid_pyramid_of_attention_mass_equals_attention_mass_on_cells():
    """Pooling per-patch masses must equal computing the mass on cell regions directly."""
    grids = torch.tensor([[1, 3, 5], [1, 4, 2]])           # two images in one sequence
    n_img = int(grids.prod(1).sum())
    is_image = torch.zeros(40, dtype=torch.bool)
    is_image[3:3 + 15] = True
    is_image[20:20 + 8] = True
    q, k, cu_q, cu_k, _, _ = random_varlen(4, [6], [40], 4, 2, 64, 1)
    per_patch, n_patch = image_key_regions(is_image, grids, cell_size=1)
    per_cell, n_cell = image_key_regions(is_image, grids, cell_size=2)
    assert n_patch == n_img
    fine = attention_mass(q, k, cu_q, cu_k, per_patch, n_patch, backend="torch")
    coarse = attention_mass(q, k, cu_q, cu_k, per_cell, n_cell, backend="torch")
    pooled = grid_pyramid(fine, grids, [2])[0]
    torch.testing.assert_close(pooled, coarse, atol=1e-6, rtol=1e-6)


def test_llm_grid_thw_and_region_helper_validation():
    assert llm_grid_thw(torch.tensor([[1, 8, 6]])).tolist() == [[1, 4, 3]]
    with pytest.raises(ValueError, match="image_grid_thw"):
        llm_grid_thw(torch.tensor([[1, 7, 6]]))
    with pytest.raises(ValueError, match="image_token_mask"):
        image_key_regions(torch.ones(5, dtype=torch.bool), torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match="mass"):
        grid_pyramid(torch.rand(5), torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match="levels"):
        grid_pyramid(torch.rand(4), torch.tensor([[1, 2, 2]]), [0])
    with pytest.raises(ValueError, match="grids"):
        grid_pyramid(torch.rand(4), torch.tensor([[1, 0, 2]]))
