"""The fast CPU descriptor path (regions/descriptors_cpu.py) against the staged torch reference
(``patch_descriptors_reference``): the same descriptors and the same key regions on random,
flat, saturated and structured images, awkward grids, patch sizes 28 and 32. Every test runs
twice: through the C++ loop of ``kawhi_kernels._C`` (when the module has it) and through the
NumPy/torch fallback of a pure wheel."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kawhi_kernels.bench.inputs import synthetic_image
from kawhi_kernels.regions import descriptors_cpu, select_key_regions
from kawhi_kernels.regions.descriptors import (
    _patch_mean,
    gaussian_smooth,
    patch_descriptors,
    patch_descriptors_reference,
    sobel_gradients,
    srgb_to_lightness,
    structure_eigenvalues,
)
from kawhi_kernels.regions.sguf import key_regions_from_descriptors

SEED = 20261202


@pytest.fixture(autouse=True, params=["native", "numpy"])
def descriptor_backend(request, monkeypatch):
    """Runs the test through the C++ descriptors or, with them hidden, the NumPy fallback."""
    if request.param == "native":
        if descriptors_cpu._native_descriptors(torch.float32) is None:
            pytest.skip("kawhi_kernels._C without sguf_descriptors_cpu_f32 (pure-Python install)")
    else:
        monkeypatch.setattr(descriptors_cpu, "_native_descriptors", lambda dtype: None)
    return request.param


def _image(kind: str, grid, p: int, rng: np.random.Generator) -> np.ndarray:
    h, w = grid[0] * p, grid[1] * p
    if kind == "random":
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "flat":
        return np.full((h, w, 3), int(rng.integers(0, 256)), dtype=np.uint8)
    if kind == "saturated":  # only 0 and 255: both ends of the tables, Y = 0 and Y = 1
        return rng.choice(np.array([0, 255], dtype=np.uint8), (h, w, 3))
    if kind == "dark":  # the linear branch of f(Y) (Y <= 0.008856) next to the cube-root one
        return rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    return synthetic_image(grid, p, int(rng.integers(0, 1000)))


# (grid, patch): both production patch sizes, one-row/one-column grids, a patch of 1 pixel
# (image smaller than the Gaussian's radius) and a single patch.
GRIDS = [((5, 7), 28), ((3, 4), 32), ((1, 9), 28), ((6, 1), 32), ((1, 1), 7), ((2, 3), 1),
         ((3, 2), 2)]
KINDS = ["random", "flat", "saturated", "dark", "structured"]


def _scale(x: torch.Tensor) -> float:
    return max(float(x.abs().max()), 1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grid,p", GRIDS)
def test_fast_path_matches_the_staged_reference(grid, p, dtype):
    rng = np.random.default_rng([SEED, grid[0], grid[1], p])
    # L may differ by ~an ulp (exact cube root vs pow(Y, 1/3)); everything after L is the same
    # arithmetic, so the descriptors agree to a few ulps of their scale. The absolute floor is
    # for flat images, where the reference's structure is rounding noise (~1e-12, FMA in the
    # vectorised body of an add but not in its tail) and ours may be exactly 0.
    rtol = 2e-6 if dtype == torch.float32 else 1e-13
    floor = 1e-9
    for kind in KINDS:
        img = _image(kind, grid, p, rng)
        for sigma in (1.0, 0.6, 2.5):
            fast = patch_descriptors(img, grid, sigma=sigma, dtype=dtype)
            ref = patch_descriptors_reference(img, grid, sigma=sigma, dtype=dtype)
            exact = patch_descriptors_reference(img, grid, sigma=sigma, dtype=torch.float64)
            lam_scale = _scale(ref[0])
            for name, f, r, e, scale in zip(("lam_max", "lam_min", "lightness"), fast, ref, exact,
                                            (lam_scale, lam_scale, 100.0)):
                assert f.dtype == dtype and f.shape == (grid[0] * grid[1],), name
                # Images smaller than the Gaussian (a few pixels, sigma 2.5) have gradients that
                # are differences of nearly equal values: there the reference's own rounding
                # error (vs float64) sets the scale, and the fast path may not exceed it 4x.
                own_error = float((r.double() - e).abs().max())
                tol = max(rtol * scale, 4 * own_error) + floor
                tag = f"{name} {kind} sigma={sigma}"
                torch.testing.assert_close(f, r, rtol=0, atol=tol, msg=lambda m, tag=tag: f"{tag}: {m}")
            assert bool((fast[0] >= fast[1]).all()) and bool((fast[1] >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lightness_close_to_reference_and_luminance_bit_identical(dtype):
    rng = np.random.default_rng(SEED)
    every_level = np.stack(np.meshgrid(np.arange(256), np.arange(256), [0, 7, 255],
                                       indexing="ij"), -1).reshape(256, -1, 3).astype(np.uint8)
    for img in (every_level, rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)):
        ref_l = srgb_to_lightness(torch.from_numpy(img), dtype=dtype).numpy()
        y = descriptors_cpu._luminance(img, dtype, descriptors_cpu._Workspace()).copy()
        # Y: the same lookups and additions as the reference (which rounds per channel too).
        luts = descriptors_cpu.luminance_tables("cpu", dtype).numpy()
        want_y = (luts[0][img[..., 0]] + luts[1][img[..., 1]]) + luts[2][img[..., 2]]
        np.testing.assert_array_equal(y, want_y)
        light = np.empty_like(y)
        descriptors_cpu._lightness_into(light, y)
        atol = 2e-5 if dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(light, ref_l, rtol=0, atol=atol)


@pytest.mark.parametrize("grid,p", [((5, 7), 28), ((3, 4), 32), ((1, 1), 7), ((2, 3), 1)])
def test_stages_after_lightness_agree_to_rounding(grid, p):
    """Given the same L, the fast path's Gaussian, Sobel and patch means are the reference's
    operations in the reference's order: they agree to rounding (mostly bit for bit; where a
    row's length puts a value in the vector tail of one and the vector body of the other, FMA
    may round it differently)."""
    rng = np.random.default_rng([SEED, 7, p])
    for dtype in (torch.float32, torch.float64):
        for kind in KINDS:
            img = _image(kind, grid, p, rng)
            y = descriptors_cpu._luminance(img, dtype, descriptors_cpu._Workspace()).copy()
            light = np.empty_like(y)
            descriptors_cpu._lightness_into(light, y)
            smoothed = gaussian_smooth(torch.from_numpy(light), 1.0)
            gx, gy = sobel_gradients(smoothed)
            want = (*structure_eigenvalues(_patch_mean(gx * gx, grid, p), _patch_mean(gx * gy, grid, p),
                                           _patch_mean(gy * gy, grid, p)), _patch_mean(smoothed, grid, p))
            got = patch_descriptors(img, grid, dtype=dtype)
            tol = 1e-6 if dtype == torch.float32 else 1e-14
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=tol * _scale(w) + 1e-9)


@pytest.mark.parametrize("grid,p,kinds", [
    ((36, 36), 28, ("structured",)),  # 1008 x 1008, the benchmark's size
    ((12, 10), 32, ("structured", "saturated", "flat")),
    ((9, 13), 28, ("structured", "random", "saturated", "flat")),
    ((7, 5), 32, ("structured", "random", "dark")),
])
def test_key_regions_identical_to_the_reference_path(grid, p, kinds):
    rng = np.random.default_rng([SEED, grid[0], p])
    for kind in kinds:
        img = _image(kind, grid, p, rng)
        for dtype in (torch.float32, torch.float64):
            fast = select_key_regions(img, grid, dtype=dtype, generator=torch.Generator().manual_seed(5))
            ref = key_regions_from_descriptors(*patch_descriptors_reference(img, grid, dtype=dtype),
                                               grid, generator=torch.Generator().manual_seed(5))
            for field in ("labels", "is_key", "key_token_mask", "selected", "key_region"):
                assert torch.equal(getattr(fast, field), getattr(ref, field)), (kind, field)
            torch.testing.assert_close(fast.energy, ref.energy, rtol=1e-5 if dtype == torch.float32
                                       else 1e-12, atol=0)


def test_batches_and_workspace_reuse_across_sizes():
    """A batch equals its images one by one; a workspace grown for a big image and then reused
    for smaller ones (and back) changes nothing."""
    rng = np.random.default_rng(SEED + 1)
    big = synthetic_image((8, 8), 28, 1)
    small = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    first = [patch_descriptors(im, g) for im, g in ((big, (8, 8)), (small, (2, 3)))]
    again = [patch_descriptors(im, g) for im, g in ((small, (2, 3)), (big, (8, 8)))][::-1]
    for a, b in zip(first, again):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    batch = np.stack([small, small[::-1].copy(), np.full_like(small, 200)])
    got = patch_descriptors(batch, (2, 3))
    for i in range(3):
        single = patch_descriptors(batch[i], (2, 3))
        for g, s in zip(got, single):
            assert torch.equal(g[i], s)
    # Results never alias the workspace: a later call leaves them untouched.
    kept = [t.clone() for t in first[1]]
    patch_descriptors(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), (2, 3))
    for k, t in zip(kept, first[1]):
        assert torch.equal(k, t)


def test_threads_have_their_own_workspace():
    images = [synthetic_image((6, 6), 28, s) for s in range(4)]
    want = [patch_descriptors(im, (6, 6)) for im in images]
    got = [None] * 4
    errors = []

    def work(i):
        try:
            for _ in range(3):
                got[i] = patch_descriptors(images[i], (6, 6))
        except (AssertionError, RuntimeError, TypeError, ValueError) as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for g, w in zip(got, want):
        for x, y in zip(g, w):
            assert torch.equal(x, y)


def test_non_contiguous_and_read_only_inputs():
    img = synthetic_image((4, 6), 28, 3)
    want = patch_descriptors_reference(img, (4, 6))
    wide = np.zeros((4 * 28, 6 * 28 * 2, 3), dtype=np.uint8)
    wide[:, ::2] = img
    view = wide[:, ::2]  # strided columns
    ro = img.copy()
    ro.flags.writeable = False
    for im in (view, ro, torch.from_numpy(img).permute(1, 0, 2).contiguous().permute(1, 0, 2)):
        got = patch_descriptors(im, (4, 6))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=2e-6 * _scale(w) + 1e-4)
