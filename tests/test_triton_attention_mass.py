"""Triton ``attention_mass`` vs the torch reference (CPU interpreter without a GPU)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported anywhere below

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from triton_helpers import (
    DEVICE,
    HAS_CUDA,
    MASS_TOL,
    coarse_regions,
    default_scale,
    fresh_seed,
    patch_regions,
    random_qk,
    reference_lse,
    run_segments,
)

from kawhi_kernels.ops.attention_mass import attention_mass
from kawhi_kernels.reference.attention_mass import attention_mass_reference
from kawhi_kernels.triton.attention_mass import attention_mass_triton

# Ragged batch: an empty query sequence, a sequence without keys, Lq > Lk (the first causal rows
# see no key at all), Lq < Lk.
LENS_Q = [5, 0, 37, 12, 9]
LENS_K = [9, 4, 30, 0, 40]


def _inputs(seed, hq, hk, d, dtype, regions, num_regions, segments):
    q, k, cu_q, cu_k = random_qk(seed, LENS_Q, LENS_K, hq, hk, d, dtype)
    make = coarse_regions if regions == "coarse" else patch_regions
    key_region = make(seed + 1, LENS_K, num_regions)
    seg_kwargs = {}
    if segments == "runs":
        seg_kwargs = {"query_segment": run_segments(seed + 2, LENS_Q, 6), "num_segments": 6}
    elif segments == "random":
        g = torch.Generator().manual_seed(seed + 3)
        seg = torch.randint(-1, 4, (q.shape[0],), generator=g, dtype=torch.int32)
        seg_kwargs = {"query_segment": seg.to(DEVICE), "num_segments": 5}   # segment 4 empty
    return q, k, cu_q, cu_k, key_region, seg_kwargs


# (hq, hk, d, dtype, regions, R, segments, heads, causal, with_lse, deterministic, block_n)
CASES = [
    (4, 4, 64, torch.float32, "coarse", 5, None, None, True, False, False, 16),
    (8, 2, 80, torch.float16, "coarse", 3, "runs", [1, 6, 7], True, False, False, None),
    (7, 1, 128, torch.float32, "coarse", 7, "runs", [0, 2, 5], True, True, True, 16),
    (8, 2, 64, torch.float32, "coarse", 64, None, [7, 0, 3], False, False, True, 32),
    (4, 1, 80, torch.float32, "patch", 100, None, None, True, False, False, 16),
    (7, 1, 64, torch.float16, "patch", 90, "runs", [6, 1], True, True, False, 32),
    (8, 2, 128, torch.float32, "patch", 70, "runs", None, True, False, True, 16),
    (4, 4, 64, torch.float32, "patch", 100, None, [3, 1], False, True, True, None),
    (8, 2, 64, torch.float32, "patch", 80, "random", None, True, False, False, 32),
    (7, 1, 80, torch.float32, "coarse", 4, "random", [4, 0], True, False, True, 32),
    # bf16 (the interpreter cannot multiply bf16 tiles: the launcher upcasts, see _compat)
    (8, 2, 80, torch.bfloat16, "coarse", 6, "runs", None, True, False, False, 16),
    (7, 1, 64, torch.bfloat16, "patch", 90, None, [6, 1, 3], True, True, True, 32),
    (4, 1, 96, torch.bfloat16, "patch", 80, "random", None, True, False, False, None),
]


@pytest.mark.parametrize(
    "hq,hk,d,dtype,regions,num_regions,segments,heads,causal,with_lse,deterministic,block_n", CASES)
def test_matches_reference(hq, hk, d, dtype, regions, num_regions, segments, heads, causal, with_lse,
                           deterministic, block_n):
    seed = fresh_seed()
    q, k, cu_q, cu_k, key_region, seg_kwargs = _inputs(seed, hq, hk, d, dtype, regions, num_regions,
                                                       segments)
    scale = default_scale(d) * 1.3
    lse = reference_lse(q, k, cu_q, cu_k, causal, scale) if with_lse else None
    want = attention_mass_reference(q, k, cu_q, cu_k, key_region, num_regions, heads=heads, lse=lse,
                                    causal=causal, softmax_scale=scale, **seg_kwargs)
    got = attention_mass_triton(q, k, cu_q, cu_k, key_region, num_regions,
                                num_segments=seg_kwargs.get("num_segments", 0),
                                query_segment=seg_kwargs.get("query_segment"),
                                heads=heads if heads is not None else list(range(hq)), lse=lse,
                                causal=causal, softmax_scale=scale, deterministic=deterministic,
                                block_n=block_n)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")
    if deterministic:
        again = attention_mass_triton(q, k, cu_q, cu_k, key_region, num_regions,
                                      num_segments=seg_kwargs.get("num_segments", 0),
                                      query_segment=seg_kwargs.get("query_segment"),
                                      heads=heads if heads is not None else list(range(hq)), lse=lse,
                                      causal=causal, softmax_scale=scale, deterministic=True,
                                      block_n=block_n)
        assert torch.equal(got, again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("segmented", [False, True])
def test_single_pass_rescales_when_the_row_max_grows(dtype, segmented):
    """Scores that grow along the keys (the running max rises tile after tile, so the single-pass
    accumulator is rescaled many times) and a huge last key: single pass == reference, and it
    is the kernel the launcher runs for R ≤ 64 without lse."""
    from kawhi_kernels.triton import attention_mass as am

    seed = fresh_seed()
    lens_q, lens_k = [7, 30, 3], [70, 33, 0]
    q, k, cu_q, cu_k = random_qk(seed, lens_q, lens_k, 4, 1, 48, dtype)
    ramp = torch.linspace(0.2, 3.0, k.shape[0], device=DEVICE)[:, None, None]
    k = (k.float() * ramp).to(dtype)
    k[69] = (q[6:7].float().mean(1, keepdim=True) * 4).to(dtype)   # a dominant last key
    key_region = coarse_regions(seed + 1, lens_k, 5)
    seg_kwargs = ({"query_segment": run_segments(seed + 2, lens_q, 4), "num_segments": 4}
                  if segmented else {})
    heads = [3, 0, 2]
    assert am._main_kernel(am._ACC_COARSE, 16, False) is am._mass_online_kernel
    want = attention_mass_reference(q, k, cu_q, cu_k, key_region, 5, heads=heads, **seg_kwargs)
    got = attention_mass_triton(q, k, cu_q, cu_k, key_region, 5, heads=heads, block_n=16,
                                softmax_scale=default_scale(48), **seg_kwargs)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("regions,num_regions,deterministic",
                         [("coarse", 6, False), ("patch", 90, False), ("patch", 90, True)])
def test_lse_fed_result_equals_the_lse_free_one(regions, num_regions, deterministic):
    """Every kernel pair (single pass vs two-pass coarse; atomic; windowed) agrees with and
    without the true normaliser, on the same plan."""
    from kawhi_kernels.triton.attention_mass import plan_attention_mass_triton, run_attention_mass_triton

    seed = fresh_seed()
    q, k, cu_q, cu_k, key_region, seg_kwargs = _inputs(seed, 8, 2, 64, torch.float16, regions,
                                                       num_regions, "runs")
    lse = reference_lse(q, k, cu_q, cu_k, True, default_scale(64))
    plan = plan_attention_mass_triton(
        cu_q.cpu().long(), cu_k.cpu().long(), key_region, num_regions, dtype=q.dtype,
        num_heads=8, num_kv_heads=2, head_dim=64, heads=[0, 5, 6],
        query_segment_host=seg_kwargs["query_segment"].cpu().long(), num_segments=6,
        deterministic=deterministic, block_n=16)
    free = run_attention_mass_triton(plan, q, k)
    fed = run_attention_mass_triton(plan, q, k, lse)
    assert free.abs().sum() > 0
    torch.testing.assert_close(fed, free, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")


def test_zero_cases_rows_without_visible_key_empty_segments_and_regions():
    """Rows that see no key (Lq > Lk, causal) or only region −1 keys, empty segments and empty
    regions are exactly 0; rows that see every key as a region sum to 1 over regions."""
    q, k, cu_q, cu_k = random_qk(fresh_seed(), [6, 3], [4, 5], 4, 2, 64)
    key_region = torch.tensor([-1, 0, 0, 1, -1, -1, -1, 2, 0], dtype=torch.int32, device=DEVICE)
    kw = {"heads": [0, 1, 2, 3], "causal": True, "softmax_scale": 0.125}
    got = attention_mass_triton(q, k, cu_q, cu_k, key_region, 4, **kw)
    assert torch.all(got[:2] == 0)           # seq 0: rows 0, 1 see no key (Lq 6 > Lk 4)
    assert torch.all(got[2] == 0)            # row 2 sees key 0 only (region −1)
    assert torch.all(got[6] == 0)            # seq 1: row 0 sees keys 0..2, all region −1
    assert torch.all(got[..., 3] == 0)       # region 3 has no key
    assert torch.all(got[[3, 4, 5, 7, 8]].sum(-1) > 0)
    every = torch.zeros(9, dtype=torch.int32, device=DEVICE)
    total = attention_mass_triton(q, k, cu_q, cu_k, every, 1, **kw)[..., 0]
    visible = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool, device=DEVICE)
    torch.testing.assert_close(total[visible], torch.ones_like(total[visible]))
    assert torch.all(total[~visible] == 0)
    seg = torch.tensor([2, 2, 2, 0, 0, -1, 0, 0, 0], dtype=torch.int32, device=DEVICE)
    for det in (False, True):
        per_seg = attention_mass_triton(q, k, cu_q, cu_k, key_region, 4, query_segment=seg,
                                        num_segments=4, deterministic=det, **kw)
        assert torch.all(per_seg[1] == 0) and torch.all(per_seg[3] == 0)   # empty segments
        assert torch.all(per_seg[2] == 0)                                  # rows 0-2: no region key
        torch.testing.assert_close(per_seg[0], got[[3, 4, 6, 7, 8]].sum(0))


def test_wrong_lse_changes_the_result():
    q, k, cu_q, cu_k = random_qk(fresh_seed(), [5], [8], 2, 1, 64)
    key_region = torch.tensor([0, 1, 1, 0, -1, 2, 2, 0], dtype=torch.int32, device=DEVICE)
    lse = reference_lse(q, k, cu_q, cu_k, True, 0.125)
    kw = {"heads": [0, 1], "causal": True, "softmax_scale": 0.125, "block_n": 16}
    exact = attention_mass_triton(q, k, cu_q, cu_k, key_region, 3, lse=lse, **kw)
    shifted = attention_mass_triton(q, k, cu_q, cu_k, key_region, 3, lse=lse + 1.0, **kw)
    torch.testing.assert_close(shifted, exact * torch.exp(torch.tensor(-1.0)), atol=1e-6, rtol=1e-5)


def test_public_op_with_triton_backend():
    seed = fresh_seed()
    q, k, cu_q, cu_k, key_region, seg_kwargs = _inputs(seed, 8, 2, 64, torch.float32, "coarse", 6,
                                                       "runs")
    for kwargs, det in (({}, False), (seg_kwargs, False), (seg_kwargs, True)):
        got = attention_mass(q, k, cu_q, cu_k, key_region, 6, heads=[5, 2], deterministic=det,
                             backend="triton", **kwargs)
        want = attention_mass(q, k, cu_q, cu_k, key_region, 6, heads=[5, 2], backend="torch", **kwargs)
        torch.testing.assert_close(got, want, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("d", [200, 256])
def test_large_and_non_power_of_two_head_dims(d):
    seed = fresh_seed()
    q, k, cu_q, cu_k = random_qk(seed, [3, 6], [7, 5], 2, 1, d, torch.float16)
    key_region = coarse_regions(seed, [7, 5], 3, sinks=1)
    want = attention_mass_reference(q, k, cu_q, cu_k, key_region, 3)
    got = attention_mass_triton(q, k, cu_q, cu_k, key_region, 3, heads=[0, 1],
                                softmax_scale=default_scale(d))
    torch.testing.assert_close(got, want, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")


def test_fp64_falls_back_to_reference():
    from kawhi_kernels.ops.attention_mass import attention_mass

    q, k, cu_q, cu_k = random_qk(fresh_seed(), [4, 3], [6, 2], 4, 2, 64, torch.float64)
    key_region = torch.tensor([0, 1, -1, 1, 0, 0, 1, 1], dtype=torch.int32, device=DEVICE)
    got = attention_mass(q, k, cu_q, cu_k, key_region, 2, heads=[0, 3], softmax_scale=0.1,
                         backend="triton")
    want = attention_mass_reference(q, k, cu_q, cu_k, key_region, 2, heads=[0, 3], softmax_scale=0.1)
    assert got.dtype == torch.float64
    assert torch.equal(got, want)


def test_coarse_max_regions_beyond_the_tile_table_is_a_clear_error():
    q, k, cu_q, cu_k = random_qk(0, [2], [2], 1, 1, 64)
    with pytest.raises(ValueError, match="coarse_max_regions"):
        attention_mass_triton(q, k, cu_q, cu_k, torch.zeros(2, dtype=torch.int32, device=DEVICE), 1,
                              coarse_max_regions=128)


def test_head_dim_over_limit_is_a_clear_error():
    q, k, cu_q, cu_k = random_qk(0, [2], [2], 1, 1, 264)
    with pytest.raises(ValueError, match="q: head dim 264"):
        attention_mass_triton(q, k, cu_q, cu_k, torch.zeros(2, dtype=torch.int32, device=DEVICE), 1)


# ---------------------------------------------------------------------------------------------
# GPU only: bf16, realistic shapes, > 2^31-element offsets.

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_regions,deterministic", [(16, False), (1024, False), (1024, True)])
def test_gpu_qwen25_vl_7b_shapes_bf16(num_regions, deterministic):
    """Hq 28, Hk 4, D 128, bf16, 2 sequences of 4k keys with 1k image tokens and 2k response rows."""
    seed = fresh_seed()
    lens_q, lens_k = [2048, 2048], [4096, 4096]
    q, k, cu_q, cu_k = random_qk(seed, lens_q, lens_k, 28, 4, 128, torch.bfloat16)
    key_region = torch.full((8192,), -1, dtype=torch.int32, device=DEVICE)
    ids = torch.arange(1024, device=DEVICE, dtype=torch.int32) * num_regions // 1024
    key_region[100:1124] = ids
    key_region[4196:5220] = ids
    seg = torch.arange(4096, device=DEVICE, dtype=torch.int32) // 512       # 8 responses
    heads = [0, 1, 3, 22, 23, 24, 25, 26, 27]
    for seg_kwargs in ({}, {"query_segment": seg, "num_segments": 8}):
        want = attention_mass_reference(q, k, cu_q, cu_k, key_region, num_regions, heads=heads,
                                        **seg_kwargs)
        got = attention_mass_triton(q, k, cu_q, cu_k, key_region, num_regions, heads=heads,
                                    softmax_scale=default_scale(128), deterministic=deterministic,
                                    num_segments=seg_kwargs.get("num_segments", 0),
                                    query_segment=seg_kwargs.get("query_segment"))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=2e-3, msg=lambda m: f"seed {seed}: {m}")
        if deterministic:
            again = attention_mass_triton(q, k, cu_q, cu_k, key_region, num_regions, heads=heads,
                                          softmax_scale=default_scale(128), deterministic=True,
                                          num_segments=seg_kwargs.get("num_segments", 0),
                                          query_segment=seg_kwargs.get("query_segment"))
            assert torch.equal(got, again)


@pytest.mark.gpu
@gpu
def test_gpu_offsets_beyond_int32():
    """A sequence whose keys start past 2^31 elements of k (int64 offset arithmetic)."""
    hk, d = 4, 128
    first = (2**31) // (hk * d) + 1000
    k = torch.empty(first + 64, hk, d, dtype=torch.bfloat16, device=DEVICE)
    k[first:] = torch.randn(64, hk, d, device=DEVICE).to(torch.bfloat16)
    q = torch.randn(8, 8, d, device=DEVICE).to(torch.bfloat16)
    cu_q = torch.tensor([0, 0, 8], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, first, first + 64], dtype=torch.int32, device=DEVICE)
    key_region = torch.full((first + 64,), -1, dtype=torch.int32, device=DEVICE)
    key_region[first:] = torch.arange(64, device=DEVICE, dtype=torch.int32) % 3
    got = attention_mass_triton(q, k, cu_q, cu_k, key_region, 3, heads=list(range(8)),
                                softmax_scale=default_scale(d))
    want = attention_mass_reference(q, k[first:], torch.tensor([0, 8], device=DEVICE),
                                    torch.tensor([0, 64], device=DEVICE), key_region[first:], 3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=2e-3)


# ---------------------------------------------------------------------------------------------
# Interior key tiles run unmasked (planner's loop table): unchanged results on awkward shapes.

# Ragged: Lq > Lk (first causal rows see nothing), an empty query sequence, Lq == Lk, Lq < Lk
# (interior tiles before the diagonal), a partial last key tile everywhere.
AWKWARD_Q = [40, 0, 9, 33, 21]
AWKWARD_K = [30, 5, 50, 33, 70]


def _awkward_regions(kind, num_regions):
    region = (coarse_regions if kind == "coarse" else patch_regions)(3, AWKWARD_K, num_regions)
    # Sequence 3 has image keys only at 20..32: its causal rows 0..19 see no region key.
    start = sum(AWKWARD_K[:3])
    region[start:start + 20] = -1
    return region


def _all_masked(plan):
    """The same plan with no interior tile: every key tile takes the masked path."""
    import dataclasses

    from kawhi_kernels.triton.attention_mass import loop_tiles_table

    tables = {has_lse: dataclasses.replace(t, loop_tiles=loop_tiles_table(
        torch.zeros_like(t.interior_tiles), t.region_tiles)) for has_lse, t in plan.tables.items()}
    return dataclasses.replace(plan, tables=tables)


@pytest.mark.parametrize("hq,hk,heads,d,dtype,kind,num_regions,deterministic,with_lse,segments,causal", [
    (3, 3, [2, 0], 48, torch.float32, "coarse", 5, False, False, "random", True),
    (8, 2, [1, 6, 7, 4], 80, torch.float16, "coarse", 5, True, True, None, True),
    (7, 1, [0, 2, 3, 4, 5, 6, 1], 96, torch.bfloat16, "coarse", 5, False, False, None, True),
    (7, 1, [0, 2, 3, 4, 5, 6, 1], 48, torch.float32, "patch", 70, False, True, "random", True),
    (8, 2, [1, 6, 7, 4], 96, torch.bfloat16, "patch", 70, True, False, "random", True),
    (3, 3, [2, 0], 80, torch.float16, "patch", 70, True, True, None, True),
    (8, 2, [1, 6, 7, 4], 48, torch.float32, "coarse", 5, False, True, None, False),
    (7, 1, [0, 2, 3, 4, 5, 6, 1], 80, torch.float16, "patch", 70, True, False, None, False),
])
def test_interior_tiles_unmasked_match_reference_on_awkward_shapes(
        hq, hk, heads, d, dtype, kind, num_regions, deterministic, with_lse, segments, causal):
    """GQA 1/4/7, non-power-of-two head dims, ragged causal batches, an empty segment, rows
    without a visible region key: the split loops (unmasked interior + masked edge tiles) equal
    the reference, and (bit-for-bit on the deterministic paths) the all-masked launch."""
    from kawhi_kernels.triton.attention_mass import plan_attention_mass_triton, run_attention_mass_triton

    seed = fresh_seed()
    q, k, cu_q, cu_k = random_qk(seed, AWKWARD_Q, AWKWARD_K, hq, hk, d, dtype)
    region = _awkward_regions(kind, num_regions)
    seg_kwargs = {}
    if segments == "random":
        g = torch.Generator().manual_seed(seed)
        seg = torch.randint(-1, 3, (q.shape[0],), generator=g, dtype=torch.int32)
        seg_kwargs = {"query_segment": seg.to(DEVICE), "num_segments": 4}       # 3 is empty
    scale = default_scale(d)
    lse = reference_lse(q, k, cu_q, cu_k, causal, scale) if with_lse else None
    want = attention_mass_reference(q, k, cu_q, cu_k, region, num_regions, heads=heads, lse=lse,
                                    causal=causal, softmax_scale=scale, **seg_kwargs)
    plan = plan_attention_mass_triton(
        cu_q.cpu().long(), cu_k.cpu().long(), region, num_regions, dtype=q.dtype, num_heads=hq,
        num_kv_heads=hk, head_dim=d, heads=heads, causal=causal, softmax_scale=scale,
        deterministic=deterministic, block_n=16,
        query_segment_host=None if not seg_kwargs else seg_kwargs["query_segment"].cpu().long(),
        num_segments=seg_kwargs.get("num_segments", 0))
    ti = plan.tables[with_lse].loop_tiles[:, 0].cpu()
    tn = plan.tables[with_lse].block_key_tiles
    assert (ti > 0).any() and (ti < tn).any()      # both loops run somewhere
    got = run_attention_mass_triton(plan, q, k, lse)
    torch.testing.assert_close(got, want, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")
    masked = run_attention_mass_triton(_all_masked(plan), q, k, lse)
    if deterministic:
        assert torch.equal(got, masked), f"seed {seed}"
    else:
        torch.testing.assert_close(got, masked, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")
    if segments:
        assert torch.all(got[3] == 0)                     # the empty segment
    elif causal:
        s3 = sum(AWKWARD_Q[:3])
        assert torch.all(got[s3:s3 + 20] == 0)            # no visible region key (causal)
        assert got[s3 + 20:s3 + 33].sum() > 0


@pytest.mark.parametrize("kind,num_regions,deterministic,with_lse,segmented", [
    ("coarse", 6, False, False, False), ("coarse", 6, False, True, True),
    ("coarse", 6, True, False, True), ("patch", 80, False, False, True),
    ("patch", 80, True, True, True), ("patch", 80, True, False, False)])
def test_packed_head_groups_without_power_of_two_padding(kind, num_regions, deterministic,
                                                         with_lse, segmented):
    """The KAWHI heads of a Qwen2.5-VL-7B layout (Hq 28, Hk 4): packed as 3 groups of 3 heads
    (GP 3, not a power of two; rows × GP < M) in every mode — per-row output, segment atomics,
    deterministic partials, the per-tile selector sums of the atomic/windowed paths — equal the
    reference."""
    from kawhi_kernels.triton.attention_mass import plan_attention_mass_triton, run_attention_mass_triton

    seed = fresh_seed()
    lens_q, lens_k = [30, 0, 23], [40, 3, 50]
    heads = [0, 1, 3, 22, 23, 24, 25, 26, 27]
    q, k, cu_q, cu_k = random_qk(seed, lens_q, lens_k, 28, 4, 32, torch.float16)
    region = (coarse_regions if kind == "coarse" else patch_regions)(seed + 1, lens_k, num_regions)
    seg_kwargs = ({"query_segment": run_segments(seed + 2, lens_q, 5), "num_segments": 5}
                  if segmented else {})
    lse = reference_lse(q, k, cu_q, cu_k, True, default_scale(32)) if with_lse else None
    plan = plan_attention_mass_triton(
        cu_q.cpu().long(), cu_k.cpu().long(), region, num_regions, dtype=q.dtype, num_heads=28,
        num_kv_heads=4, head_dim=32, heads=heads, deterministic=deterministic, block_n=16,
        query_segment_host=(seg_kwargs["query_segment"].cpu().long() if segmented else None),
        num_segments=seg_kwargs.get("num_segments", 0))
    constexprs = plan.launches[with_lse][0]
    assert plan.head_tab.tolist() == [[0, 1, 3], [22, 23, 24], [25, 26, 27]]
    assert (constexprs["GP"], constexprs["BLOCK_ROWS"], constexprs["BLOCK_M"]) == (3, 21, 64)
    want = attention_mass_reference(q, k, cu_q, cu_k, region, num_regions, heads=heads, lse=lse,
                                    **seg_kwargs)
    got = run_attention_mass_triton(plan, q, k, lse)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")
