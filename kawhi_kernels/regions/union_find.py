"""SGUF merge step: connected components of the 4-connected token grid (DESIGN.md section 1).

Neighbouring patches p, q merge iff

    sqrt((λmax_p − λmax_q)² + (λmin_p − λmin_q)²) / max(λmax_p, λmax_q, ε) < δs
    and |L_p − L_q| < δl.

Two implementations with bit-identical decisions (same float64 operation order, no FMA):
the C++ union-find in ``kawhi_kernels._C`` and a vectorised NumPy fallback (hook-and-shortcut
connected components; no SciPy at run time). Labels are canonical: components numbered 0..C-1 in
order of their first token in raster order.
"""
from __future__ import annotations

import numpy as np
import torch

from .._extension import load_extension
from .._validation import check_bool, check_real
from .descriptors import check_grid_hw


def merge_mask(lam_max_p: np.ndarray, lam_max_q: np.ndarray, lam_min_p: np.ndarray,
               lam_min_q: np.ndarray, light_p: np.ndarray, light_q: np.ndarray,
               delta_s: float, delta_l: float, eps: float) -> np.ndarray:
    """Elementwise SGUF merge rule for float64 arrays of neighbour pairs (p, q); bool array."""
    dmax = lam_max_p - lam_max_q
    dmin = lam_min_p - lam_min_q
    dist = np.sqrt(dmax * dmax + dmin * dmin)
    denom = np.maximum(np.maximum(lam_max_p, lam_max_q), eps)
    return (dist / denom < delta_s) & (np.abs(light_p - light_q) < delta_l)


def merge_edges(lam_max: np.ndarray, lam_min: np.ndarray, lightness: np.ndarray,
                grid_hw: tuple[int, int], delta_s: float, delta_l: float,
                eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Token pairs (p, q) of the 4-connected gh x gw grid that pass the merge rule.

    Inputs are float64 [gh*gw] in raster order. Returns int64 arrays (p, q) with q the right or
    lower neighbour of p: horizontal pairs first, then vertical ones.
    """
    gh, gw = grid_hw
    ids = np.arange(gh * gw, dtype=np.int64).reshape(gh, gw)
    a, b, c = (np.asarray(x, dtype=np.float64).reshape(gh, gw) for x in (lam_max, lam_min, lightness))
    ps, qs = [], []
    for sl_p, sl_q in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                       ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
        keep = merge_mask(a[sl_p], a[sl_q], b[sl_p], b[sl_q], c[sl_p], c[sl_q],
                          delta_s, delta_l, eps)
        ps.append(ids[sl_p][keep])
        qs.append(ids[sl_q][keep])
    return np.concatenate(ps), np.concatenate(qs)


def components_from_edges(num_nodes: int, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Canonical connected-component labels of an undirected graph given by edge lists.

    Vectorised hook-and-shortcut: every node points to a node of smaller-or-equal index, so at
    convergence each component's root is its smallest node, i.e. its first token in raster
    order. Returns int64 [num_nodes] numbered 0..C-1 in order of that first node.
    """
    parent = np.arange(num_nodes, dtype=np.int64)
    p = np.asarray(p, dtype=np.int64)
    q = np.asarray(q, dtype=np.int64)
    while True:
        rp, rq = parent[p], parent[q]
        differ = rp != rq
        if not differ.any():
            break
        rp, rq = rp[differ], rq[differ]
        # Hook the larger root under the smaller one (only roots are written: trees stay trees).
        np.minimum.at(parent, np.maximum(rp, rq), np.minimum(rp, rq))
        while True:  # shortcut every node to its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    _, labels = np.unique(parent, return_inverse=True)
    return labels.astype(np.int64).reshape(num_nodes)


def _as_float64_vector(name: str, value, n: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
        value = value.detach().to("cpu", torch.float64).numpy()
    elif isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            raise TypeError(f"{name}: expected a floating-point array, got {value.dtype}")
        value = value.astype(np.float64, copy=False)
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}")
    if value.ndim != 1 or value.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) = (gh*gw,), got {tuple(value.shape)}")
    if not np.isfinite(value).all():
        raise ValueError(f"{name}: contains NaN or Inf values")
    return np.ascontiguousarray(value)


def merge_components_numpy(lam_max: np.ndarray, lam_min: np.ndarray, lightness: np.ndarray,
                           grid_hw: tuple[int, int], delta_s: float, delta_l: float, eps: float,
                           *, use_extension: bool = True) -> np.ndarray:
    """:func:`merge_components` on already-validated float64 numpy vectors; int64 numpy [N]."""
    gh, gw = grid_hw
    ext = load_extension() if use_extension else None
    if ext is not None:
        return np.asarray(ext.union_find_merge(lam_max, lam_min, lightness, gh, gw,
                                               delta_s, delta_l, eps), dtype=np.int64)
    p, q = merge_edges(lam_max, lam_min, lightness, grid_hw, delta_s, delta_l, eps)
    return components_from_edges(gh * gw, p, q)


def merge_components(lam_max, lam_min, lightness, grid_hw, delta_s: float, delta_l: float,
                     eps: float, *, use_extension: bool = True) -> torch.Tensor:
    """SGUF union-find over the 4-connected gh x gw token grid.

    Args:
        lam_max, lam_min, lightness: float [N] (N = gh*gw, raster order), torch tensors (any
            device) or numpy arrays; computed in float64.
        grid_hw: (gh, gw).
        delta_s: structure threshold (> 0); delta_l: lightness threshold (> 0);
        eps: floor of the structure-ratio denominator (> 0).
        use_extension: bool; use the C++ union-find of ``kawhi_kernels._C`` when it imports (else,
            or when False, the NumPy fallback; both take identical decisions).

    Returns:
        int64 [N] labels on the device of ``lam_max`` (CPU for numpy input): components numbered
        0..C-1 in order of their first token in raster order.
    """
    gh, gw = check_grid_hw(grid_hw)
    n = gh * gw
    delta_s = check_real("delta_s", delta_s, low=0.0, low_inclusive=False)
    delta_l = check_real("delta_l", delta_l, low=0.0, low_inclusive=False)
    eps = check_real("eps", eps, low=0.0, low_inclusive=False)
    check_bool("use_extension", use_extension)
    device = lam_max.device if isinstance(lam_max, torch.Tensor) else torch.device("cpu")
    arrays = [_as_float64_vector(name, v, n) for name, v in
              (("lam_max", lam_max), ("lam_min", lam_min), ("lightness", lightness))]
    labels = merge_components_numpy(*arrays, (gh, gw), delta_s, delta_l, eps,
                                    use_extension=use_extension)
    return torch.from_numpy(labels).to(device)
