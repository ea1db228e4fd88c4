"""SGUF merge step: partitions vs scipy's connected components, C++ vs NumPy fallback, rule
edge cases (strict thresholds, ε floor) and argument validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from kawhi_kernels._extension import load_extension
from kawhi_kernels.regions import components_from_edges, merge_components, merge_edges

HAS_EXT = load_extension() is not None
BACKENDS = [pytest.param(True, id="cpp"), pytest.param(False, id="numpy")]


def reference_edges(lmax, lmin, light, gh, gw, ds, dl, eps):
    """Merge edges by a plain loop over the grid, written from the DESIGN.md rule."""
    edges = []
    for r in range(gh):
        for c in range(gw):
            p = r * gw + c
            for q, ok in ((p + 1, c + 1 < gw), (p + gw, r + 1 < gh)):
                if not ok:
                    continue
                dist = math.sqrt((lmax[p] - lmax[q]) ** 2 + (lmin[p] - lmin[q]) ** 2)
                if dist / max(lmax[p], lmax[q], eps) < ds and abs(light[p] - light[q]) < dl:
                    edges.append((p, q))
    return edges


def scipy_labels(n, edges):
    if edges:
        e = np.asarray(edges)
        graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    else:
        graph = coo_matrix((n, n))
    return connected_components(graph, directed=False)[1]


def canonical(labels):
    """Relabel a partition by order of first occurrence."""
    labels = np.asarray(labels)
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[np.unique(labels, return_inverse=True)[1]]


def random_descriptors(rng, gh, gw, kind):
    n = gh * gw
    if kind == "continuous":
        a, b = rng.gamma(1.0, 50.0, n), rng.gamma(1.0, 20.0, n)
        lmax, lmin = np.maximum(a, b), np.minimum(a, b)
        light = rng.uniform(0, 100, n)
    elif kind == "quantised":  # many exact ties, zeros and constant regions
        a, b = rng.integers(0, 4, n).astype(float), rng.integers(0, 3, n).astype(float)
        lmax, lmin = np.maximum(a, b), np.minimum(a, b)
        light = rng.choice([0.0, 15.0, 30.0, 45.0, 90.0], n)
    elif kind == "blocks":  # piecewise-constant blocks plus flat zero areas
        rows = rng.integers(0, 3, gh)[:, None]
        cols = rng.integers(0, 3, gw)[None, :]
        block = (rows * 3 + cols).ravel().astype(float)
        lmax = block * 10.0
        lmin = block * 2.0
        light = block * 12.0
    else:
        raise AssertionError(kind)
    return lmax, lmin, light


@pytest.mark.parametrize("use_extension", BACKENDS)
@pytest.mark.parametrize("kind", ["continuous", "quantised", "blocks"])
@pytest.mark.parametrize("gh,gw", [(1, 1), (1, 9), (7, 1), (6, 11), (16, 16)])
def test_partition_matches_scipy(use_extension, kind, gh, gw):
    if use_extension and not HAS_EXT:
        pytest.fail("kawhi_kernels._C is not importable (build the extension: pip install -e .)")
    rng = np.random.default_rng(gh * 100 + gw + len(kind))
    lmax, lmin, light = random_descriptors(rng, gh, gw, kind)
    ds, dl, eps = 0.5, 30.0, 1e-3
    labels = merge_components(lmax, lmin, light, (gh, gw), ds, dl, eps,
                              use_extension=use_extension).numpy()
    expected = scipy_labels(gh * gw, reference_edges(lmax, lmin, light, gh, gw, ds, dl, eps))
    np.testing.assert_array_equal(labels, canonical(expected))


@pytest.mark.parametrize("seed", range(6))
def test_cpp_and_numpy_agree(seed):
    if not HAS_EXT:
        pytest.fail("kawhi_kernels._C is not importable (build the extension: pip install -e .)")
    rng = np.random.default_rng(seed)
    gh, gw = rng.integers(1, 40, 2)
    kind = ["continuous", "quantised", "blocks"][seed % 3]
    lmax, lmin, light = random_descriptors(rng, int(gh), int(gw), kind)
    ds = float(rng.choice([0.1, 0.5, 1.0, 2.0]))
    dl = float(rng.choice([5.0, 15.0, 30.0]))
    eps = float(rng.choice([1e-6, 0.5, 3.0]))
    cpp = merge_components(lmax, lmin, light, (int(gh), int(gw)), ds, dl, eps, use_extension=True)
    py = merge_components(lmax, lmin, light, (int(gh), int(gw)), ds, dl, eps, use_extension=False)
    assert torch.equal(cpp, py)


@pytest.mark.parametrize("use_extension", BACKENDS)
def test_thresholds_are_strict(use_extension):
    if use_extension and not HAS_EXT:
        pytest.fail("kawhi_kernels._C is not importable")
    # ratio exactly 0.5 between tokens 0 and 1 (|2-1| / 2): no merge; 1 and 2 equal: merge.
    lmax = np.array([2.0, 1.0, 1.0, 1.0])
    lmin = np.zeros(4)
    light = np.array([0.0, 0.0, 0.0, 30.0])  # |ΔL| exactly 30 between tokens 2 and 3: no merge
    labels = merge_components(lmax, lmin, light, (1, 4), 0.5, 30.0, 1e-6,
                              use_extension=use_extension)
    assert labels.tolist() == [0, 1, 1, 2]
    loose = merge_components(lmax, lmin, light, (1, 4), 0.5000001, 30.0000001, 1e-6,
                             use_extension=use_extension)
    assert loose.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("use_extension", BACKENDS)
def test_eps_floors_the_denominator(use_extension):
    if use_extension and not HAS_EXT:
        pytest.fail("kawhi_kernels._C is not importable")
    # Two nearly flat patches, λmax 1e-8 vs 0: ratio 1e-8 / max(1e-8, ε) is 1 (no merge) for a
    # tiny ε and 1e-8 (merge) once ε = 1 floors the denominator.
    lmax = np.array([1e-8, 0.0])
    lmin = np.zeros(2)
    light = np.zeros(2)
    tiny = merge_components(lmax, lmin, light, (1, 2), 0.5, 30.0, 1e-12, use_extension=use_extension)
    big = merge_components(lmax, lmin, light, (1, 2), 0.5, 30.0, 1.0, use_extension=use_extension)
    assert tiny.tolist() == [0, 1]
    assert big.tolist() == [0, 0]


@pytest.mark.parametrize("use_extension", BACKENDS)
def test_labels_numbered_by_first_token(use_extension):
    if use_extension and not HAS_EXT:
        pytest.fail("kawhi_kernels._C is not importable")
    # 3x3 grid: a "U" shaped component whose first token is 0 and which closes late in raster
    # order (tokens 0,3,6,7,8,5,2), and the centre pair 1,4 separated by lightness.
    light = np.array([0, 60, 0,
                      0, 60, 0,
                      0, 0, 0], dtype=float)
    z = np.zeros(9)
    labels = merge_components(z, z, light, (3, 3), 0.5, 30.0, 1e-6, use_extension=use_extension)
    assert labels.tolist() == [0, 1, 0, 0, 1, 0, 0, 0, 0]
    assert labels.dtype == torch.int64


def test_components_from_edges_on_general_graphs():
    rng = np.random.default_rng(7)
    for n, m in [(1, 0), (10, 0), (50, 30), (200, 150), (300, 1000)]:
        p = rng.integers(0, n, m)
        q = rng.integers(0, n, m)
        got = components_from_edges(n, p, q)
        want = scipy_labels(n, list(zip(p.tolist(), q.tolist())))
        np.testing.assert_array_equal(got, canonical(want))
    # A long path given in an adversarial order (the slowest case for hooking).
    n = 2000
    perm = rng.permutation(n)
    p, q = perm[:-1], perm[1:]
    assert components_from_edges(n, p, q).tolist() == [0] * n


def test_merge_edges_matches_reference_loop():
    rng = np.random.default_rng(3)
    lmax, lmin, light = random_descriptors(rng, 9, 13, "quantised")
    p, q = merge_edges(lmax, lmin, light, (9, 13), 0.5, 30.0, 0.25)
    got = sorted(zip(p.tolist(), q.tolist()))
    assert got == sorted(reference_edges(lmax, lmin, light, 9, 13, 0.5, 30.0, 0.25))


def test_accepts_torch_tensors_and_returns_on_their_device():
    rng = np.random.default_rng(0)
    lmax, lmin, light = random_descriptors(rng, 5, 6, "continuous")
    want = merge_components(lmax, lmin, light, (5, 6), 0.5, 30.0, 1e-3)
    got = merge_components(torch.tensor(lmax, dtype=torch.float32).double(),
                           torch.tensor(lmin), torch.tensor(light), (5, 6), 0.5, 30.0, 1e-3)
    assert got.device == torch.device("cpu") and got.dtype == torch.int64
    assert torch.equal(got, want)


# ------------------------------------------------------------------------ validation

def _args():
    z = np.zeros(6)
    return [z, z.copy(), z.copy(), (2, 3), 0.5, 30.0, 1e-3]


@pytest.mark.parametrize("index,value,exc,match", [
    (0, np.zeros(5), ValueError, "lam_max"),
    (1, np.zeros((2, 3)), ValueError, "lam_min"),
    (2, np.array([0, 0, 0, np.nan, 0, 0]), ValueError, "lightness"),
    (0, np.zeros(6, dtype=np.int64), TypeError, "lam_max"),
    (1, [0.0] * 6, TypeError, "lam_min"),
    (3, (2, 0), ValueError, "grid_hw"),
    (3, (2,), TypeError, "grid_hw"),
    (3, (2.0, 3), TypeError, "grid_hw"),
    (4, 0.0, ValueError, "delta_s"),
    (5, -1.0, ValueError, "delta_l"),
    (6, 0.0, ValueError, "eps"),
    (6, float("inf"), ValueError, "eps"),
])
def test_merge_components_validation(index, value, exc, match):
    args = _args()
    args[index] = value
    with pytest.raises(exc, match=match):
        merge_components(*args)


def test_extension_validates_its_arguments():
    ext = load_extension()
    if ext is None:
        pytest.fail("kawhi_kernels._C is not importable")
    z = np.zeros(6)
    with pytest.raises(ValueError, match="lam_min"):
        ext.union_find_merge(z, np.zeros(5), z, 2, 3, 0.5, 30.0, 1e-3)
    with pytest.raises(ValueError, match="lightness"):
        ext.union_find_merge(z, z, np.full(6, np.inf), 2, 3, 0.5, 30.0, 1e-3)
    with pytest.raises(ValueError, match="gw"):
        ext.union_find_merge(z, z, z, 6, 0, 0.5, 30.0, 1e-3)
    with pytest.raises(ValueError, match="delta_s"):
        ext.union_find_merge(z, z, z, 2, 3, -0.5, 30.0, 1e-3)
    with pytest.raises(ValueError, match="eps"):
        ext.union_find_merge(z, z, z, 2, 3, 0.5, 30.0, 0.0)
