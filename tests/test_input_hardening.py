"""Input hardening: non-integer grids, meta tensors, out-of-range pyramid levels, paragraph-weight
length mismatches, SGUF errors naming the public op, and truthy non-bool flags."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kawhi_kernels._validation import check_bool, check_tensor
from kawhi_kernels.credit.weights import paragraph_weights
from kawhi_kernels.ops.attention_mass import attention_mass
from kawhi_kernels.ops.cosine_alignment import cosine_alignment
from kawhi_kernels.ops.grid_pyramid import (
    MAX_CELL_SIZE,
    MAX_LEVELS,
    grid_pyramid,
    normalize_levels,
)
from kawhi_kernels.regions import merge_components, select_key_regions
from kawhi_kernels.regions.grids import image_key_regions, llm_grid_thw

IMG = np.zeros((56, 56, 3), dtype=np.uint8)
GRID = (2, 2)

# ------------------------------------------------------------------ 1. non-integer grids

NON_INTEGER_GRIDS = [
    pytest.param(torch.tensor([[1.0, 2.5, 2.0]]), id="float-tensor"),
    pytest.param(torch.tensor([[1.0, 2.0, 2.0]]), id="integral-float-tensor"),
    pytest.param([[1, 2, 3.7]], id="float-in-list"),
    pytest.param([[1, 2.0, 2]], id="integral-float-in-list"),
    pytest.param([[True, 2, 2]], id="bool-in-list"),
    pytest.param([[1, "2", 2]], id="str-in-list"),
]


@pytest.mark.parametrize("grids", NON_INTEGER_GRIDS)
def test_grid_pyramid_rejects_non_integer_grids(grids):
    with pytest.raises(TypeError, match="grids: expected integer entries"):
        grid_pyramid(torch.rand(4), grids)


@pytest.mark.parametrize("grids", NON_INTEGER_GRIDS)
def test_image_key_regions_rejects_non_integer_grids(grids):
    with pytest.raises(TypeError, match="grids: expected integer entries"):
        image_key_regions(torch.ones(4, dtype=torch.bool), grids)


def test_llm_grid_thw_rejects_non_integer_grids_naming_its_argument():
    with pytest.raises(TypeError, match="image_grid_thw: expected integer entries"):
        llm_grid_thw([[1, 4, 4.5]])
    with pytest.raises(TypeError, match="image_grid_thw: expected integer entries"):
        llm_grid_thw(torch.tensor([[1.0, 4.0, 4.0]]))


def test_integer_grids_still_accepted():
    mass = torch.rand(6)
    want = grid_pyramid(mass, torch.tensor([[1, 2, 3]]))
    for grids in ([[1, 2, 3]], [(np.int64(1), np.int32(2), 3)], torch.tensor([[1, 2, 3]], dtype=torch.int32)):
        for a, b in zip(grid_pyramid(mass, grids), want):
            torch.testing.assert_close(a, b)
    assert llm_grid_thw([[1, 4, 6]]).tolist() == [[1, 2, 3]]


# ------------------------------------------------------------------ 2. meta tensors

def test_check_tensor_rejects_meta_tensors():
    with pytest.raises(ValueError, match="x: expected a tensor with data, got a meta tensor"):
        check_tensor("x", torch.empty(3, device="meta"))


def _mass_inputs(device):
    q = torch.randn(5, 4, 16, device=device)
    k = torch.randn(7, 2, 16, device=device)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    key_region = torch.tensor([0, 1, -1, 2, 0, -1, 1], dtype=torch.int32, device=device)
    return q, k, cu_q, cu_k, key_region, 3


@pytest.mark.parametrize("op", [attention_mass, cosine_alignment], ids=["attention_mass", "cosine_alignment"])
def test_public_ops_reject_meta_tensors(op):
    op(*_mass_inputs("cpu"), backend="torch")  # sanity: the same inputs on CPU run
    with pytest.raises(ValueError, match="q: expected a tensor with data, got a meta tensor"):
        op(*_mass_inputs("meta"), backend="torch")


def test_grid_pyramid_rejects_meta_tensors():
    with pytest.raises(ValueError, match="mass: expected a tensor with data, got a meta tensor"):
        grid_pyramid(torch.empty(4, device="meta"), [[1, 2, 2]])


# ------------------------------------------------------------------ 3. grid_pyramid levels

@pytest.mark.parametrize("levels", [80, MAX_LEVELS + 1])
def test_grid_pyramid_rejects_too_many_levels(levels):
    with pytest.raises(ValueError, match=rf"levels: expected an int in \[1, {MAX_LEVELS}\]"):
        grid_pyramid(torch.rand(4), [[1, 2, 2]], levels)


@pytest.mark.parametrize("levels", [[MAX_CELL_SIZE + 1], [1, 2**70]])
def test_grid_pyramid_rejects_oversized_cells(levels):
    with pytest.raises(ValueError, match=rf"levels: cell sizes must be in \[1, {MAX_CELL_SIZE}\]"):
        grid_pyramid(torch.rand(4), [[1, 2, 2]], levels)


@pytest.mark.parametrize("levels,exc", [(0, ValueError), (-1, ValueError), (True, TypeError), (2.0, TypeError),
                                        ([], ValueError), ([2.0], TypeError), ([True], TypeError),
                                        ([0], ValueError), ("3", TypeError)])
def test_grid_pyramid_levels_kind_and_value(levels, exc):
    with pytest.raises(exc, match="levels"):
        grid_pyramid(torch.rand(4), [[1, 2, 2]], levels)


def test_grid_pyramid_largest_levels_still_run():
    assert normalize_levels(MAX_LEVELS)[-1] == MAX_CELL_SIZE
    mass = torch.rand(2, 12)
    grids = [[1, 3, 4]]
    out = grid_pyramid(mass, grids, MAX_LEVELS)  # cells past the grid: one cell per frame
    assert len(out) == MAX_LEVELS
    torch.testing.assert_close(out[-1], mass.sum(-1, keepdim=True))
    big = grid_pyramid(mass, grids, [MAX_CELL_SIZE, 4])
    torch.testing.assert_close(big[0], big[1])


# ------------------------------------------------------------------ 4. paragraph_weights lengths

def test_paragraph_weights_length_mismatch_names_alpha_and_paragraph_ids():
    alpha = torch.tensor([0.1, 0.2, 0.3])
    ids = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    for cu in (torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"paragraph_ids: expected one id per token of alpha "
                                             r"\(len\(alpha\) = 3\), got len\(paragraph_ids\) = 4"):
            paragraph_weights(alpha, ids, cu)


def test_paragraph_weights_cu_seqlens_mismatch_still_names_cu_seqlens():
    alpha = torch.tensor([0.1, 0.2, 0.3])
    ids = torch.tensor([0, 0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        paragraph_weights(alpha, ids, torch.tensor([0, 4], dtype=torch.int32))


# ------------------------------------------------------------------ 5. SGUF errors name the public op

@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_select_key_regions_backend_errors_name_select_key_regions(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for image in (IMG, [IMG, IMG], np.stack([IMG, IMG])):
        with pytest.raises(RuntimeError, match=rf"backend='{backend}' cannot run select_key_regions") as info:
            select_key_regions(image, GRID, backend=backend)
        assert "patch_descriptors" not in str(info.value)


def test_select_key_regions_dtype_errors_name_select_key_regions():
    with pytest.raises(TypeError, match="dtype: expected torch.float32 or torch.float64") as info:
        select_key_regions(IMG, GRID, dtype=torch.float16, backend="triton")
    assert "patch_descriptors" not in str(info.value)


def test_select_key_regions_fused_float64_error_names_select_key_regions(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets backend='triton' resolve for CPU images
    for image in (IMG, [IMG]):
        with pytest.raises(ValueError, match="dtype: select_key_regions with backend='triton' "
                                             "computes the descriptors in float32 only"):
            select_key_regions(image, GRID, dtype=torch.float64, backend="triton")


def test_select_key_regions_bad_backend_string():
    with pytest.raises(ValueError, match="backend: expected one of"):
        select_key_regions(IMG, GRID, backend="bogus")


# ------------------------------------------------------------------ 6. bool flags

@pytest.mark.parametrize("flag", [1, 0, "yes", None, np.bool_(True)])
def test_check_bool_rejects_truthy_non_bools(flag):
    with pytest.raises(TypeError, match="flag: expected a bool"):
        check_bool("flag", flag)


def test_check_bool_accepts_bools():
    assert check_bool("flag", True) is True
    assert check_bool("flag", False) is False


@pytest.mark.parametrize("flag", [1, "yes"])
def test_merge_components_use_extension_must_be_bool(flag):
    z = np.zeros(4)
    with pytest.raises(TypeError, match="use_extension: expected a bool"):
        merge_components(z, z, z, (2, 2), 0.5, 30.0, 1e-6, use_extension=flag)


def test_select_key_regions_accepts_pil_and_float_images_like_uint8():
    import numpy as np
    from PIL import Image

    from kawhi_kernels import select_key_regions

    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    want = select_key_regions(img, (2, 3), generator=None, skip_ratio=0.0)
    for other in (Image.fromarray(img), Image.fromarray(img).convert("RGBA"), img / 255.0,
                  torch.from_numpy(img).float() / 255.0):
        got = select_key_regions(other, (2, 3), generator=None, skip_ratio=0.0)
        assert torch.equal(got.labels, want.labels) and torch.equal(got.selected, want.selected)
    with pytest.raises(ValueError, match=r"float images must hold values in \[0, 1\]"):
        select_key_regions(img.astype(np.float32), (2, 3))
    with pytest.raises(TypeError, match="divide by 65535"):
        select_key_regions(img.astype(np.uint16), (2, 3))
