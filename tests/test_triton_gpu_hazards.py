"""Regressions for hazards of the Triton kernels that the interpreter does not show by itself.

* Launch device: Triton launches on the *current* CUDA device, so every launch must run under
  the tensors' device (``device_guard``).
* Shared memory, spills and tensor cores of every configuration: ``test_triton_static_builds.py``.
* Grid limits: axes 1 and 2 stop at 65535, so large counts go on axis 0 (the flattened
  block × window / lead × cell numbering must cover every output).
* Large GQA/MQA groups are split into several programs per KV head (same results).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported anywhere below

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from triton_helpers import (
    COSINE_TOL,
    DEVICE,
    HAS_CUDA,
    MASS_TOL,
    coarse_regions,
    fresh_seed,
    patch_regions,
    random_qk,
    reference_lse,
    run_segments,
)

from kawhi_kernels.reference.attention_mass import attention_mass_reference
from kawhi_kernels.reference.cosine_alignment import cosine_alignment_reference
from kawhi_kernels.reference.grid_pyramid import grid_pyramid_reference
from kawhi_kernels.triton._utils import device_guard
from kawhi_kernels._fused_host import head_groups
from kawhi_kernels.triton.attention_mass import attention_mass_triton
from kawhi_kernels.triton.cosine_alignment import cosine_alignment_triton
from kawhi_kernels.triton.grid_pyramid import grid_pyramid_triton



def test_device_guard_makes_the_tensors_device_current():
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with device_guard(torch.device("cpu")):    # the interpreter: no CUDA call at all
        pass


def test_head_groups_split_large_kv_groups_evenly_and_keep_every_slot():
    heads = list(range(71)) + [72, 75]                   # KV head 0: 71 heads, KV head 1: 2
    kv, head, slot, gp = head_groups(heads, 71, 64, "cpu")
    assert kv.tolist() == [0, 0, 1] and gp == 64
    sizes = (head >= 0).sum(1).tolist()
    assert sizes == [36, 35, 2]
    got = sorted(zip(head[head >= 0].tolist(), slot[slot >= 0].tolist()))
    assert got == sorted((h, s) for s, h in enumerate(heads))
    assert torch.equal(head >= 0, slot >= 0)
    _, _, _, gp_whole = head_groups(heads, 71, 128, "cpu")
    assert gp_whole == 128                               # under the cap: one group per KV head


@pytest.mark.parametrize("num_regions,regions,segmented,deterministic", [
    (5, "coarse", False, False),
    (5, "coarse", True, True),
    (90, "patch", True, False),      # atomics into segments
    (90, "patch", False, True),      # windowed load-add-store into owned rows
])
def test_split_head_groups_match_reference(num_regions, regions, segmented, deterministic):
    """8 query heads on one KV head, at most 3 per program: three programs per row block share
    a KV head and write disjoint head slots of the same rows."""
    seed = fresh_seed()
    lens_q, lens_k = [7, 20], [9, 33]
    q, k, cu_q, cu_k = random_qk(seed, lens_q, lens_k, 8, 1, 32)
    make = coarse_regions if regions == "coarse" else patch_regions
    key_region = make(seed + 1, lens_k, num_regions)
    seg = {"query_segment": run_segments(seed + 2, lens_q, 4), "num_segments": 4} if segmented else {}
    heads = [6, 0, 3, 7, 1, 5, 2]
    want = attention_mass_reference(q, k, cu_q, cu_k, key_region, num_regions, heads=heads, **seg)
    got = attention_mass_triton(q, k, cu_q, cu_k, key_region, num_regions, heads=heads,
                                deterministic=deterministic, block_n=16, max_group_heads=3, **seg)
    torch.testing.assert_close(got, want, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")


def test_flash_attention_lse_of_rows_without_keys_is_plus_inf():
    """FlashAttention writes lse = +inf (−inf on its split-KV path) for a row that sees no key;
    such rows give 0 and every other row is unchanged."""
    seed = fresh_seed()
    q, k, cu_q, cu_k = random_qk(seed, [7, 4], [4, 6], 4, 2, 32)      # seq 0: rows 0-2 see no key
    key_region = coarse_regions(seed, [4, 6], 3, sinks=0)
    lse = reference_lse(q, k, cu_q, cu_k, True, 0.2)
    assert torch.isinf(lse).any()
    want = attention_mass_reference(q, k, cu_q, cu_k, key_region, 3, lse=lse, softmax_scale=0.2)
    for empty in (float("inf"), float("-inf")):
        fa_lse = torch.where(torch.isinf(lse), torch.full_like(lse, empty), lse)
        got = attention_mass_triton(q, k, cu_q, cu_k, key_region, 3, lse=fa_lse, softmax_scale=0.2,
                                    block_n=16)
        assert torch.all(got[:3] == 0)
        torch.testing.assert_close(got, want, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("d,num_regions", [(100, 40), (200, 40)])
def test_cosine_region_windows_for_wide_heads(d, num_regions):
    """D > 64 caps the region window (32, 16 for D > 128): several windows and row blocks on
    the flattened grid axis."""
    seed = fresh_seed()
    lens_q, lens_k = [21, 5], [40, 30]
    q, k, cu_q, cu_k = random_qk(seed, lens_q, lens_k, 4, 2, d, torch.float16)
    key_region = patch_regions(seed + 1, lens_k, num_regions)
    for per_head in (False, True):
        want = cosine_alignment_reference(q, k, cu_q, cu_k, key_region, num_regions, heads=[3, 0],
                                          per_head=per_head)
        got = cosine_alignment_triton(q, k, cu_q, cu_k, key_region, num_regions, heads=[3, 0],
                                      per_head=per_head, block_q=16, block_k=16)
        torch.testing.assert_close(got, want, **COSINE_TOL, msg=lambda m: f"seed {seed}: {m}")


def test_grid_pyramid_flattened_grid_covers_every_tile():
    seed = fresh_seed()
    grids = torch.tensor([[1, 5, 7], [2, 3, 4]], dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    mass = torch.randn(9, 59, generator=g).to(DEVICE)       # 3 lead tiles × 15 cell tiles
    levels = [1, 2]
    got = grid_pyramid_triton(mass, grids, levels, block_m=4, block_c=4)
    for a, b in zip(got, grid_pyramid_reference(mass, grids, levels)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed {seed}: {m}")


# ---------------------------------------------------------------------------------------------
# GPU only: tensors on a device that is not the current one.

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_launches_follow_the_tensors_device():
    from kawhi_kernels.triton.sguf_descriptors import patch_descriptors_triton

    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    seed = fresh_seed()
    q, k, cu_q, cu_k = random_qk(seed, [6, 9], [10, 12], 4, 2, 64, torch.float16, device=dev)
    key_region = coarse_regions(seed, [10, 12], 3, device=dev)
    got = attention_mass_triton(q, k, cu_q, cu_k, key_region, 3)
    want = attention_mass_reference(q, k, cu_q, cu_k, key_region, 3)
    assert got.device == dev
    torch.testing.assert_close(got, want, **MASS_TOL)
    got = cosine_alignment_triton(q, k, cu_q, cu_k, key_region, 3)
    torch.testing.assert_close(got, cosine_alignment_reference(q, k, cu_q, cu_k, key_region, 3),
                               **COSINE_TOL)
    grids = torch.tensor([[1, 3, 4]], dtype=torch.int64)
    mass = torch.rand(5, 12, device=dev)
    for a, b in zip(grid_pyramid_triton(mass, grids, [1, 2]),
                    grid_pyramid_reference(mass, grids, [1, 2])):
        torch.testing.assert_close(a, b)
    image = torch.randint(0, 256, (28, 42, 3), dtype=torch.uint8, device=dev)
    on_1 = patch_descriptors_triton(image, (2, 3))
    on_0 = patch_descriptors_triton(image.to("cuda:0"), (2, 3))
    for a, b in zip(on_1, on_0):
        torch.testing.assert_close(a.cpu(), b.cpu())
