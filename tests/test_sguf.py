"""SGUF key-region selection: descriptors vs scikit-image/SciPy on real photos and a chart,
the full pipeline vs an independent NumPy/SciPy reference, background sampling and validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage import color, data

from kawhi_kernels.regions import (
    KeyRegions,
    gaussian_smooth,
    key_regions_from_descriptors,
    patch_descriptors,
    select_key_regions,
    sobel_gradients,
    srgb_to_lightness,
)

# ------------------------------------------------------------------------ images


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.array(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def chart_image(h: int = 448, w: int = 672) -> np.ndarray:
    """A synthetic bar chart: axes, grid lines, coloured bars, text and hand-drawn strokes."""
    im = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(im)
    x0, y0 = 60, h - 50
    d.line([(x0, 20), (x0, y0)], fill=(0, 0, 0), width=3)
    d.line([(x0, y0), (w - 20, y0)], fill=(0, 0, 0), width=3)
    for i, y in enumerate(range(y0 - 60, 30, -60)):
        d.line([(x0, y), (w - 20, y)], fill=(210, 210, 210), width=1)
        d.text((12, y - 6), f"{(i + 1) * 10}", fill=(40, 40, 40))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for i, (height, col) in enumerate(zip([250, 120, 320, 80, 200], colours)):
        bx = x0 + 30 + i * 110
        d.rectangle([bx, y0 - height, bx + 70, y0 - 1], fill=col, outline=(0, 0, 0))
        d.text((bx + 15, y0 + 10), f"Q{i + 1}", fill=(0, 0, 0))
        d.text((bx + 20, y0 - height - 16), f"{height}", fill=(0, 0, 0))
    d.text((w // 2 - 60, 5), "Revenue by quarter", fill=(0, 0, 0))
    rng = np.random.default_rng(0)
    for _ in range(6):  # text-like strokes
        pts = [(int(x), int(y)) for x, y in zip(rng.integers(400, 640, 5), rng.integers(40, 140, 5))]
        d.line(pts, fill=(20, 20, 90), width=2)
    return np.array(im)


IMAGES = {
    # name: (image uint8 [H, W, 3], grid (gh, gw)); P = H / gh
    "astronaut-P28": (np.array(data.astronaut()[32:480, 32:480]), (16, 16)),
    "astronaut-P14": (_resize(data.astronaut(), 224, 224), (16, 16)),
    "coffee-P32-nonsquare": (_resize(data.coffee(), 320, 480), (10, 15)),
    "chelsea-P28-nonsquare": (np.array(data.chelsea()[10:290, :448]), (10, 16)),
    "chelsea-P7": (_resize(data.chelsea(), 56, 84), (8, 12)),
    "chart-P32": (chart_image(448, 672), (14, 21)),
    "chart-P28": (chart_image(448, 672), (16, 24)),
}


# ------------------------------------------------------------------------ references (NumPy/SciPy)


def ref_lightness(img):
    return color.rgb2lab(img)[..., 0]


def ref_descriptors(img, grid, sigma=1.0):
    gh, gw = grid
    p = img.shape[0] // gh
    smoothed = ndimage.gaussian_filter(ref_lightness(img), sigma, mode="reflect", truncate=4.0)
    gx = ndimage.sobel(smoothed, axis=1, mode="reflect")
    gy = ndimage.sobel(smoothed, axis=0, mode="reflect")

    def pm(x):
        return x.reshape(gh, p, gw, p).mean(axis=(1, 3)).ravel()

    jxy = pm(gx * gy)
    tensors = np.stack([np.stack([pm(gx * gx), jxy], -1), np.stack([jxy, pm(gy * gy)], -1)], -2)
    eig = np.linalg.eigvalsh(tensors)  # ascending
    return np.maximum(eig[:, 1], 0), np.maximum(eig[:, 0], 0), pm(smoothed)


def ref_sguf(img, grid, delta_s=0.5, delta_l=30.0, beta=0.1):
    """Labels (canonical), energies and key flags by scikit-image + SciPy + plain NumPy."""
    gh, gw = grid
    lmax, lmin, light = ref_descriptors(img, grid)
    eps = 1e-6 + 1e-3 * np.median(lmax + lmin)
    idx = np.arange(gh * gw).reshape(gh, gw)
    pairs = [(idx[:, :-1].ravel(), idx[:, 1:].ravel()), (idx[:-1, :].ravel(), idx[1:, :].ravel())]
    rows, cols = [], []
    for p, q in pairs:
        dist = np.hypot(lmax[p] - lmax[q], lmin[p] - lmin[q])
        ok = (dist / np.maximum.reduce([lmax[p], lmax[q], np.full(p.shape, eps)]) < delta_s) \
            & (np.abs(light[p] - light[q]) < delta_l)
        rows.append(p[ok])
        cols.append(q[ok])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(rows.size), (rows, cols)), shape=(gh * gw, gh * gw))
    _, raw = connected_components(graph, directed=False)
    _, first = np.unique(raw, return_index=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    labels = rank[raw]
    energy = np.array([(lmax + lmin)[labels == c].mean() for c in range(first.size)])
    is_key = energy > beta * np.median(energy)
    return labels, energy, is_key, eps


# ------------------------------------------------------------------------ stages


def test_lightness_matches_skimage_float64():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    grey = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # every level,
    primaries = np.stack(np.meshgrid(np.arange(256), [0], [0], indexing="ij"), -1)  # both branches
    for im in (img, grey, primaries.astype(np.uint8).reshape(16, 16, 3),
               data.astronaut()[:64, :64]):
        got = srgb_to_lightness(torch.from_numpy(np.ascontiguousarray(im)), dtype=torch.float64)
        np.testing.assert_allclose(got.numpy(), ref_lightness(im), rtol=0, atol=1e-10)


def test_lightness_float32_close():
    img = data.coffee()[:64, :96]
    got = srgb_to_lightness(torch.from_numpy(np.ascontiguousarray(img)))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref_lightness(img), rtol=0, atol=2e-4)


@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (2, 7), (5, 40), (33, 17)])
@pytest.mark.parametrize("sigma", [1.0, 0.4, 2.5])
def test_gaussian_matches_scipy_including_tiny_images(shape, sigma):
    x = np.random.default_rng(1).uniform(0, 100, shape)
    got = gaussian_smooth(torch.from_numpy(x), sigma).numpy()
    want = ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (4, 1), (19, 23)])
def test_sobel_matches_scipy(shape):
    x = np.random.default_rng(2).uniform(0, 100, shape)
    gx, gy = sobel_gradients(torch.from_numpy(x))
    np.testing.assert_allclose(gx.numpy(), ndimage.sobel(x, axis=1, mode="reflect"), atol=1e-11)
    np.testing.assert_allclose(gy.numpy(), ndimage.sobel(x, axis=0, mode="reflect"), atol=1e-11)


def test_stages_accept_a_batch_dimension():
    x = np.random.default_rng(3).uniform(0, 100, (3, 9, 11))
    got = gaussian_smooth(torch.from_numpy(x), 1.0).numpy()
    for b in range(3):
        want = ndimage.gaussian_filter(x[b], 1.0, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(got[b], want, atol=1e-11)


# ------------------------------------------------------------------------ descriptors


@pytest.mark.parametrize("name", list(IMAGES))
def test_descriptors_float64_match_reference(name):
    img, grid = IMAGES[name]
    lmax, lmin, light = patch_descriptors(torch.from_numpy(np.ascontiguousarray(img)), grid,
                                          dtype=torch.float64)
    rmax, rmin, rlight = ref_descriptors(img, grid)
    scale = rmax.max()
    assert lmax.shape == (grid[0] * grid[1],) and lmax.dtype == torch.float64
    np.testing.assert_allclose(lmax.numpy(), rmax, rtol=1e-9, atol=1e-11 * scale)
    np.testing.assert_allclose(lmin.numpy(), rmin, rtol=1e-9, atol=1e-11 * scale)
    np.testing.assert_allclose(light.numpy(), rlight, rtol=0, atol=1e-10)
    assert bool((lmax >= lmin).all()) and bool((lmin >= 0).all())


@pytest.mark.parametrize("name", ["astronaut-P28", "coffee-P32-nonsquare", "chart-P32"])
def test_descriptors_float32_close_to_reference(name):
    img, grid = IMAGES[name]
    lmax, lmin, light = patch_descriptors(img, grid)  # numpy input, default float32
    assert lmax.dtype == lmin.dtype == light.dtype == torch.float32
    rmax, rmin, rlight = ref_descriptors(img, grid)
    scale = rmax.max()
    np.testing.assert_allclose(lmax.numpy(), rmax, rtol=1e-4, atol=2e-6 * scale)
    np.testing.assert_allclose(lmin.numpy(), rmin, rtol=1e-4, atol=2e-6 * scale)
    np.testing.assert_allclose(light.numpy(), rlight, rtol=0, atol=2e-3)


def test_descriptors_of_a_batch_equal_per_image():
    img, grid = IMAGES["chelsea-P7"]
    other = np.ascontiguousarray(img[::-1])
    batch = torch.from_numpy(np.stack([img, other]))
    got = patch_descriptors(batch, grid, dtype=torch.float64)
    for b, im in enumerate((img, other)):
        single = patch_descriptors(im, grid, dtype=torch.float64)
        for g, s in zip(got, single):
            torch.testing.assert_close(g[b], s, rtol=0, atol=1e-12)


def test_patch_size_one():
    img = np.random.default_rng(4).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    lmax, lmin, light = patch_descriptors(img, (6, 5), dtype=torch.float64)
    rmax, rmin, rlight = ref_descriptors(img, (6, 5))
    np.testing.assert_allclose(lmax.numpy(), rmax, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(lmin.numpy(), rmin, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(light.numpy(), rlight, atol=1e-10)


# ------------------------------------------------------------------------ full pipeline


@pytest.mark.parametrize("name", ["astronaut-P28", "coffee-P32-nonsquare", "chelsea-P28-nonsquare",
                                  "chart-P32", "chart-P28"])
def test_select_key_regions_matches_reference_pipeline(name):
    img, grid = IMAGES[name]
    labels, energy, is_key, eps = ref_sguf(img, grid)
    out = select_key_regions(img, grid, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(0))
    assert isinstance(out, KeyRegions)
    assert out.grid_hw == grid
    assert out.eps == pytest.approx(eps, rel=1e-9)
    np.testing.assert_array_equal(out.labels.numpy(), labels)
    np.testing.assert_allclose(out.energy.numpy(), energy, rtol=1e-9)
    np.testing.assert_array_equal(out.is_key.numpy(), is_key)
    np.testing.assert_array_equal(out.key_token_mask.numpy(), is_key[labels])
    # The photos and the chart have both key and background regions (a meaningful test).
    assert 0 < int(out.is_key.sum()) < out.num_components


def test_float32_default_gives_same_regions_on_chart():
    img, grid = IMAGES["chart-P32"]
    a = select_key_regions(img, grid, generator=torch.Generator().manual_seed(0))
    b = select_key_regions(img, grid, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.is_key, b.is_key)


def test_output_fields_dtypes_and_consistency():
    img, grid = IMAGES["astronaut-P28"]
    out = select_key_regions(img, grid, generator=torch.Generator().manual_seed(1))
    n, c = grid[0] * grid[1], out.num_components
    assert out.labels.dtype == torch.int64 and out.labels.shape == (n,)
    assert out.energy.shape == (c,) and out.energy.dtype.is_floating_point
    assert out.is_key.dtype == torch.bool and out.is_key.shape == (c,)
    assert out.key_token_mask.dtype == torch.bool and out.selected.dtype == torch.bool
    assert out.key_region.dtype == torch.int32 and out.key_region.shape == (n,)
    assert int(out.labels.min()) == 0 and int(out.labels.max()) == c - 1
    # labels are numbered by first token in raster order
    first = [int(torch.nonzero(out.labels == k)[0]) for k in range(c)]
    assert first == sorted(first)
    assert torch.equal(out.key_token_mask, out.is_key[out.labels])
    assert bool((out.selected | ~out.key_token_mask).all())  # key tokens are always selected
    assert torch.equal(out.key_region == 0, out.selected)
    assert set(out.key_region.unique().tolist()) <= {0, -1}
    assert out.num_selected == int(out.selected.sum())
    lam_max, lam_min, _ = patch_descriptors(img, grid, dtype=torch.float64)
    energy = torch.stack([(lam_max + lam_min)[out.labels == k].mean() for k in range(c)])
    torch.testing.assert_close(out.energy, energy.to(out.energy.dtype), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ background sampling


def test_sampling_counts_per_background_component():
    img, grid = IMAGES["chart-P28"]
    for skip in (0.0, 0.3, 0.7, 1.0):
        out = select_key_regions(img, grid, skip_ratio=skip, generator=torch.Generator().manual_seed(5))
        for k in torch.nonzero(~out.is_key).flatten().tolist():
            members = out.labels == k
            assert int((out.selected & members).sum()) == round((1 - skip) * int(members.sum()))
        if skip == 1.0:
            assert torch.equal(out.selected, out.key_token_mask)
        if skip == 0.0:
            assert bool(out.selected.all())


def test_sampling_follows_randperm_contract():
    img, grid = IMAGES["chart-P32"]
    out = select_key_regions(img, grid, generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(11)
    expected = out.key_token_mask.clone()
    for k in range(out.num_components):
        if bool(out.is_key[k]):
            continue
        tokens = torch.nonzero(out.labels == k).flatten()  # raster order
        keep = round(0.3 * tokens.numel())
        expected[tokens[torch.randperm(tokens.numel(), generator=gen)[:keep]]] = True
    assert torch.equal(out.selected, expected)


def test_sampling_reproducible_with_seed_and_varies_without():
    img, grid = IMAGES["chart-P28"]
    a = select_key_regions(img, grid, generator=torch.Generator().manual_seed(123))
    b = select_key_regions(img, grid, generator=torch.Generator().manual_seed(123))
    c = select_key_regions(img, grid, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a.selected, b.selected) and torch.equal(a.key_region, b.key_region)
    assert not torch.equal(a.selected, c.selected)
    assert torch.equal(a.key_token_mask, c.key_token_mask)  # only the background sample differs
    # One S per prompt: the same KeyRegions serves every response; reusing it changes nothing.
    s = a.key_region.clone()
    for _ in range(5):
        assert torch.equal(a.key_region, s)


def test_rounding_is_half_to_even():
    # 1 x 16 grid: tokens 0-4 flat (L 0), 5-11 flat (L 50), 12-15 structured (L 100).
    lmax = np.array([0.0] * 12 + [1.0] * 4)
    lmin = np.zeros(16)
    light = np.array([0.0] * 5 + [50.0] * 7 + [100.0] * 4)
    out = key_regions_from_descriptors(lmax, lmin, light, (1, 16), skip_ratio=0.5,
                                       generator=torch.Generator().manual_seed(0))
    assert out.labels.tolist() == [0] * 5 + [1] * 7 + [2] * 4
    assert out.is_key.tolist() == [False, False, True]
    assert int(out.selected[:5].sum()) == 2  # round(2.5) == 2
    assert int(out.selected[5:12].sum()) == 4  # round(3.5) == 4
    assert bool(out.selected[12:].all())


def test_flat_image_has_no_key_region():
    img = np.full((56, 84, 3), 128, dtype=np.uint8)
    out = select_key_regions(img, (2, 3), generator=torch.Generator().manual_seed(0))
    assert out.labels.tolist() == [0] * 6
    assert out.is_key.tolist() == [False]
    assert int(out.selected.sum()) == round(0.3 * 6)


# ------------------------------------------------------------------------ batches and inputs


def test_batch_tensor_and_list_give_per_image_results():
    img, grid = IMAGES["chelsea-P7"]
    other = np.ascontiguousarray(img[:, ::-1])
    batch = torch.from_numpy(np.stack([img, other]))
    got = select_key_regions(batch, grid, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    want = [select_key_regions(im, grid, generator=gen) for im in (img, other)]
    as_list = select_key_regions([img, other], [grid, grid], generator=torch.Generator().manual_seed(3))
    assert isinstance(got, list) and len(got) == 2
    for g, w, li in zip(got, want, as_list):
        for field in ("labels", "energy", "is_key", "selected", "key_region"):
            assert torch.equal(getattr(g, field), getattr(w, field)), field
            assert torch.equal(getattr(li, field), getattr(w, field)), field


def test_list_of_different_sizes():
    a, ga = IMAGES["chelsea-P7"]
    b, gb = IMAGES["astronaut-P14"]
    out = select_key_regions([torch.from_numpy(np.ascontiguousarray(a)), b], [ga, gb])
    assert [o.grid_hw for o in out] == [ga, gb]
    assert [o.labels.numel() for o in out] == [ga[0] * ga[1], gb[0] * gb[1]]


def test_numpy_and_tensor_inputs_agree():
    img, grid = IMAGES["coffee-P32-nonsquare"]
    a = select_key_regions(img, grid, generator=torch.Generator().manual_seed(0))
    b = select_key_regions(torch.from_numpy(np.ascontiguousarray(img)), grid,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.selected, b.selected) and torch.equal(a.labels, b.labels)
    assert a.labels.device == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_stays_on_device():
    img, grid = IMAGES["astronaut-P28"]
    t = torch.from_numpy(np.ascontiguousarray(img))
    cpu = patch_descriptors(t, grid, dtype=torch.float64)
    gpu = patch_descriptors(t.cuda(), grid, dtype=torch.float64)
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-10, atol=1e-10)
    out = select_key_regions(t.cuda(), grid, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(0))
    ref = select_key_regions(t, grid, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert out.selected.device.type == "cuda" and out.key_region.device.type == "cuda"
    assert torch.equal(out.selected.cpu(), ref.selected)


# ------------------------------------------------------------------------ validation (one rule each)

IMG = np.zeros((56, 56, 3), dtype=np.uint8)
GRID = (2, 2)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"sigma": 0.0}, ValueError, "sigma"),
    ({"sigma": -1.0}, ValueError, "sigma"),
    ({"sigma": float("nan")}, ValueError, "sigma"),
    ({"sigma": "1"}, TypeError, "sigma"),
    ({"delta_s": 0.0}, ValueError, "delta_s"),
    ({"delta_l": -3.0}, ValueError, "delta_l"),
    ({"beta": -0.1}, ValueError, "beta"),
    ({"skip_ratio": -0.01}, ValueError, "skip_ratio"),
    ({"skip_ratio": 1.01}, ValueError, "skip_ratio"),
    ({"generator": 42}, TypeError, "generator"),
    ({"dtype": torch.float16}, TypeError, "dtype"),
], ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={v[k]}" for k in v))
def test_parameter_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        select_key_regions(IMG, GRID, **kwargs)


def test_beta_zero_and_skip_bounds_are_allowed():
    out = select_key_regions(IMG, GRID, beta=0.0, skip_ratio=0.0)
    assert bool(out.selected.all())
    out = select_key_regions(IMG, GRID, skip_ratio=1.0)
    assert not bool(out.selected.any())  # flat image: no key region, nothing sampled


@pytest.mark.parametrize("image,exc,match", [
    (np.full((56, 56, 3), 255.0, np.float32), ValueError, r"float images must hold values in \[0, 1\]"),
    (torch.zeros(56, 56, 3, dtype=torch.int32), TypeError, "uint8"),
    (np.zeros((56, 56, 4), dtype=np.uint8), ValueError, "3 channels"),
    (np.zeros((56, 56), dtype=np.uint8), ValueError, r"\[H, W, 3\]"),
    (np.zeros((1, 1, 56, 56, 3), dtype=np.uint8), ValueError, "image"),
    ("not an image", TypeError, "image"),
    (np.zeros((56, 84, 3), dtype=np.uint8), ValueError, "grid_hw"),  # 28x42 patches: not square
    (np.zeros((57, 56, 3), dtype=np.uint8), ValueError, "image"),  # not a multiple
    ([], ValueError, "image"),
    (np.zeros((0, 56, 56, 3), dtype=np.uint8), ValueError, "image"),
], ids=["float", "int32", "4ch", "2d", "5d", "str", "nonsquare", "nonmultiple", "emptylist",
        "emptybatch"])
def test_image_validation(image, exc, match):
    with pytest.raises(exc, match=match):
        select_key_regions(image, GRID)


@pytest.mark.parametrize("grid,exc,match", [
    ((0, 2), ValueError, "grid_hw"),
    ((2,), TypeError, "grid_hw"),
    ((2.0, 2), TypeError, "grid_hw"),
    ((True, 2), TypeError, "grid_hw"),
    (None, TypeError, "grid_hw"),
])
def test_grid_validation(grid, exc, match):
    with pytest.raises(exc, match=match):
        select_key_regions(IMG, grid)


def test_grid_list_length_must_match_batch():
    with pytest.raises(ValueError, match="grid_hw"):
        select_key_regions([IMG, IMG], [GRID, GRID, GRID])


def test_per_image_errors_name_the_image():
    with pytest.raises(ValueError, match=r"image\[1\]"):
        select_key_regions([IMG, np.zeros((56, 60, 3), dtype=np.uint8)], [GRID, GRID])
    with pytest.raises(TypeError, match=r"image\[0\]"):
        select_key_regions([IMG.astype(np.int16)], GRID)


def test_descriptor_validation():
    with pytest.raises(ValueError, match="grid_hw"):
        patch_descriptors(IMG, (3, 2))
    with pytest.raises(TypeError, match="dtype"):
        patch_descriptors(IMG, GRID, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="sigma"):
        patch_descriptors(IMG, GRID, sigma=0)


def test_key_regions_from_descriptors_validation():
    z = np.zeros(4)
    with pytest.raises(ValueError, match="lam_min"):
        key_regions_from_descriptors(z, np.zeros(3), z, (2, 2))
    with pytest.raises(ValueError, match="lightness"):
        key_regions_from_descriptors(z, z, np.array([0, 0, np.inf, 0]), (2, 2))
