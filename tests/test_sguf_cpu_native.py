"""The C++ SGUF descriptors (csrc/sguf_cpu.cpp) against the NumPy fast path and the staged
reference, their argument checks, and the fallback to NumPy when the module lacks them."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from kawhi_kernels.regions import descriptors_cpu, select_key_regions
from kawhi_kernels.regions.descriptors import gaussian_kernel1d, patch_descriptors_reference

SEED = 20261203
_NATIVE = descriptors_cpu._native_descriptors(torch.float32)
needs_native = pytest.mark.skipif(_NATIVE is None, reason="kawhi_kernels._C lacks the C++ SGUF descriptors")


def _image(kind, grid, p, rng):
    h, w = grid[0] * p, grid[1] * p
    if kind == "random":
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "flat":
        return np.full((h, w, 3), int(rng.integers(0, 256)), dtype=np.uint8)
    if kind == "saturated":
        return rng.choice(np.array([0, 255], dtype=np.uint8), (h, w, 3))
    if kind == "dark":
        return rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    # smooth ramps and a sharp edge: structure well above rounding
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                    np.where(xx > w // 3, 200, 30)], axis=-1)
    return img.astype(np.uint8)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grid,p", [((5, 7), 28), ((3, 4), 32), ((1, 9), 28), ((6, 1), 32),
                                    ((1, 1), 7), ((2, 3), 1), ((3, 2), 2), ((4, 5), 3)])
@pytest.mark.parametrize("kind", ["random", "flat", "saturated", "dark", "ramps"])
def test_native_matches_numpy_path_and_reference(grid, p, kind, dtype):
    rng = np.random.default_rng([SEED, grid[0], grid[1], p])
    img = _image(kind, grid, p, rng)
    for sigma in (1.0, 0.6, 2.5):
        kernel = gaussian_kernel1d(sigma).tolist()
        native = descriptors_cpu._descriptors_native(_NATIVE if dtype == torch.float32 else
                                                     descriptors_cpu._native_descriptors(dtype),
                                                     img, grid, p, kernel, dtype)
        numpy_path = descriptors_cpu._descriptors_one(img, grid, p, kernel, dtype,
                                                      descriptors_cpu._Workspace())
        ref = patch_descriptors_reference(img, grid, sigma=sigma, dtype=dtype)
        exact = patch_descriptors_reference(img, grid, sigma=sigma, dtype=torch.float64)
        rtol = 2e-6 if dtype == torch.float32 else 1e-13
        lam_scale = max(float(exact[0].abs().max()), 1e-30)
        for name, n, f, r, e, scale in zip(("lam_max", "lam_min", "lightness"), native,
                                           numpy_path, ref, exact, (lam_scale, lam_scale, 100.0)):
            assert n.dtype == dtype and n.shape == (grid[0] * grid[1],), name
            # Where gradients are differences of nearly equal values (tiny images), the
            # float path's own error vs float64 sets the scale.
            own = max(float((r.double() - e).abs().max()), float((f.double() - e).abs().max()))
            tol = max(rtol * scale, 4 * own) + 1e-9
            for other in (f, r):
                torch.testing.assert_close(n, other, rtol=0, atol=tol,
                                           msg=lambda m, name=name: f"{name} {kind} sigma={sigma}: {m}")
        assert bool((native[0] >= native[1]).all()) and bool((native[1] >= 0).all())


@needs_native
def test_native_key_regions_match_the_numpy_path(monkeypatch):
    rng = np.random.default_rng(SEED)
    for grid, p in (((36, 36), 28), ((9, 13), 28), ((7, 5), 32)):
        img = _image("ramps", grid, p, rng)
        noisy = np.clip(img.astype(np.int16) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
        for im in (img, noisy):
            for dtype in (torch.float32, torch.float64):
                got = select_key_regions(im, grid, dtype=dtype, generator=torch.Generator().manual_seed(3))
                with monkeypatch.context() as m:
                    m.setattr(descriptors_cpu, "_native_descriptors", lambda dt: None)
                    want = select_key_regions(im, grid, dtype=dtype,
                                              generator=torch.Generator().manual_seed(3))
                for field in ("labels", "is_key", "key_token_mask", "selected", "key_region"):
                    assert torch.equal(getattr(got, field), getattr(want, field)), (grid, field)


@needs_native
def test_native_rejects_bad_arguments():
    red_green, blue = descriptors_cpu._lookup_tables(torch.float32)
    kernel = gaussian_kernel1d(1.0).numpy()
    img = np.zeros((28, 56, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="image: expected"):
        _NATIVE(img, 2, 2, 28, kernel, red_green, blue, 0.008856, 7.787)
    with pytest.raises(ValueError, match="image: expected"):
        _NATIVE(img[:, :, :2].copy(), 1, 2, 28, kernel, red_green, blue, 0.008856, 7.787)
    with pytest.raises(ValueError, match="red_green"):
        _NATIVE(img, 1, 2, 28, kernel, blue, blue, 0.008856, 7.787)
    with pytest.raises(ValueError, match="kernel"):
        _NATIVE(img, 1, 2, 28, kernel[:-1], red_green, blue, 0.008856, 7.787)
    with pytest.raises(ValueError, match="gh, gw, p"):
        _NATIVE(img, 0, 2, 28, kernel, red_green, blue, 0.008856, 7.787)


def test_fallback_when_the_module_lacks_the_native_descriptors(monkeypatch):
    """A module without the symbol (an older build) or no module at all: the NumPy path runs."""
    real = descriptors_cpu._descriptors_one
    for module in (types.SimpleNamespace(), None):
        monkeypatch.setattr(descriptors_cpu, "load_extension", lambda module=module: module)
        assert descriptors_cpu._native_descriptors(torch.float32) is None
        assert descriptors_cpu._native_descriptors(torch.float64) is None
        called = []
        monkeypatch.setattr(descriptors_cpu, "_descriptors_one",
                            lambda *a, **k: called.append(1) or real(*a, **k))
        img = np.random.default_rng(SEED).integers(0, 256, (56, 84, 3), dtype=np.uint8)
        got = descriptors_cpu.patch_descriptors_cpu(torch.from_numpy(img), (2, 3), 28, 1.0, torch.float32)
        assert called, "the NumPy path was not used"
        want = real(img, (2, 3), 28, gaussian_kernel1d(1.0).tolist(), torch.float32,
                    descriptors_cpu._Workspace())
        for g, w in zip(got, want):
            assert torch.equal(g, w)
