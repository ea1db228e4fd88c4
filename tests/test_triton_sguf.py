"""Triton SGUF patch descriptors vs scipy/scikit-image (and the torch version)."""
import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported anywhere below

import pytest

pytest.importorskip("triton", reason="triton is not installed")
ndimage = pytest.importorskip("scipy.ndimage", reason="scipy is not installed")
skcolor = pytest.importorskip("skimage.color", reason="scikit-image is not installed")

from triton_helpers import DEVICE, fresh_seed

from kawhi_kernels.triton.sguf_descriptors import patch_descriptors_triton


def scipy_descriptors(image: np.ndarray, grid_hw, sigma=1.0):
    """float64 (lam_max, lam_min, lightness) [N] straight from skimage + scipy."""
    gh, gw = grid_hw
    p = image.shape[0] // gh
    lightness = skcolor.rgb2lab(image)[..., 0]
    smooth = ndimage.gaussian_filter(lightness, sigma, mode="reflect", truncate=4.0)
    gx = ndimage.sobel(smooth, axis=1, mode="reflect")
    gy = ndimage.sobel(smooth, axis=0, mode="reflect")

    def patch_mean(x):
        return x.reshape(gh, p, gw, p).mean(axis=(1, 3)).reshape(-1)

    jxx, jxy, jyy = patch_mean(gx * gx), patch_mean(gx * gy), patch_mean(gy * gy)
    tensors = np.stack([np.stack([jxx, jxy], -1), np.stack([jxy, jyy], -1)], -2)
    eig = np.linalg.eigvalsh(tensors)                       # ascending
    return np.maximum(eig[:, 1], 0), np.maximum(eig[:, 0], 0), patch_mean(smooth)


def structured_image(seed: int, gh: int, gw: int, p: int) -> np.ndarray:
    """Noise, a flat patch, a horizontal ramp and a dark patch (the f(Y) linear branch)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (gh * p, gw * p, 3), dtype=np.uint8)
    img[:p, :p] = 200
    img[p:2 * p, p:2 * p] = (np.arange(p, dtype=np.uint8) * (255 // p))[None, :, None]
    img[:p, -p:] = rng.integers(0, 6, (p, p, 3), dtype=np.uint8)
    return img


def _assert_matches(got, want, seed):
    lam_max, lam_min, light = (t.cpu().double().numpy() for t in got)
    scale = max(float(want[0].max()), 1.0)
    np.testing.assert_allclose(lam_max, want[0], rtol=1e-5, atol=1e-5 * scale, err_msg=f"seed {seed}")
    np.testing.assert_allclose(lam_min, want[1], rtol=1e-5, atol=1e-5 * scale, err_msg=f"seed {seed}")
    np.testing.assert_allclose(light, want[2], rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}")
    assert np.all(lam_max >= lam_min) and np.all(lam_min >= 0)


@pytest.mark.parametrize("grid_hw,p,sigma", [((2, 3), 8, 1.0), ((1, 2), 9, 1.0), ((2, 2), 8, 2.0),
                                           ((3, 4), 1, 1.0)])  # P = 1: halo wider than the image
def test_single_image_matches_scipy_skimage(grid_hw, p, sigma):
    seed = fresh_seed()
    img = structured_image(seed, *grid_hw, p)
    got = patch_descriptors_triton(torch.from_numpy(img).to(DEVICE), grid_hw, sigma)
    assert all(t.shape == (grid_hw[0] * grid_hw[1],) and t.dtype == torch.float32 for t in got)
    _assert_matches(got, scipy_descriptors(img, grid_hw, sigma), seed)


def test_batch_matches_per_image_and_torch_version():
    seed = fresh_seed()
    imgs = np.stack([structured_image(seed, 2, 3, 8), structured_image(seed + 1, 2, 3, 8)])
    got = patch_descriptors_triton(torch.from_numpy(imgs).to(DEVICE), (2, 3))
    assert all(t.shape == (2, 6) for t in got)
    for b in range(2):
        _assert_matches([t[b] for t in got], scipy_descriptors(imgs[b], (2, 3)), seed)
    descriptors = pytest.importorskip("kawhi_kernels.regions.descriptors",
                                      reason="the torch descriptors are not available")
    torch_version = descriptors.patch_descriptors(torch.from_numpy(imgs), (2, 3))
    for a, b in zip(got, torch_version):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-2)


def test_invalid_inputs_name_the_argument():
    img = torch.zeros(16, 24, 3, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="image: float images must hold values in"):
        patch_descriptors_triton(img.float() + 2.0, (2, 3))
    with pytest.raises(TypeError, match="image"):
        patch_descriptors_triton(img.to(torch.int32), (2, 3))
    with pytest.raises(ValueError, match="image"):
        patch_descriptors_triton(img, (3, 3))              # 16 rows are not 3 patches
    with pytest.raises(ValueError, match="sigma"):
        patch_descriptors_triton(img, (2, 3), 0.0)
    with pytest.raises(TypeError, match="grid_hw"):
        patch_descriptors_triton(img, 2)


def test_select_key_regions_on_the_triton_backend_matches_torch():
    from kawhi_kernels import select_key_regions

    seed = fresh_seed()
    image = torch.from_numpy(structured_image(seed, 2, 3, 8)).to(DEVICE)
    kwargs = dict(generator=None, skip_ratio=0.0)
    fused = select_key_regions(image, (2, 3), backend="triton", **kwargs)
    plain = select_key_regions(image, (2, 3), backend="torch", **kwargs)
    assert torch.equal(fused.labels.cpu(), plain.labels.cpu()), f"seed {seed}"
    assert torch.equal(fused.is_key.cpu(), plain.is_key.cpu()), f"seed {seed}"
    torch.testing.assert_close(fused.energy.cpu(), plain.energy.cpu(), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="float32 only"):
        select_key_regions(image, (2, 3), backend="triton", dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16):          # no half-precision descriptors at all
        with pytest.raises(TypeError, match="dtype: expected torch.float32 or torch.float64"):
            select_key_regions(image, (2, 3), backend="triton", dtype=dtype)
