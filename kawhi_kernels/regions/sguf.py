"""SGUF key-region selection (DESIGN.md section 1 step 1; op ``select_key_regions``).

descriptors (torch, image's device) -> union-find components (C++ or NumPy, CPU, float64)
-> component energies and key regions -> per-component background sampling -> KeyRegions.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from .._backend import resolve_backend
from .._validation import check_real
from ..ops.patch_descriptors import IMPLEMENTATIONS as DESCRIPTOR_BACKENDS
from ..ops.patch_descriptors import patch_descriptors_on_backend
from .descriptors import check_dtype, check_grid_hw, check_image
from .union_find import merge_components_numpy

__all__ = ["KeyRegions", "select_key_regions", "key_regions_from_descriptors"]


@dataclass
class KeyRegions:
    """SGUF result for one image on its gh x gw token grid (N = gh*gw tokens, C components).

    Attributes:
        labels: int64 [N], component of each token (0..C-1, numbered by first token in raster
            order).
        energy: float64 [C], mean of λmax + λmin over the component's patches.
        is_key: bool [C], energy > beta * median(energy).
        key_token_mask: bool [N], token lies in a key region.
        selected: bool [N], key tokens plus the sampled background tokens (the set S).
        key_region: int32 [N], 0 for selected tokens, -1 otherwise (a ``key_region`` argument
            for ``cosine_alignment`` with ``num_regions=1``).
        grid_hw: (gh, gw).
        eps: the ε used in the merge rule, 1e-6 + 1e-3 * median(λmax + λmin).
    All tensors live on the image's device.
    """

    labels: torch.Tensor
    energy: torch.Tensor
    is_key: torch.Tensor
    key_token_mask: torch.Tensor
    selected: torch.Tensor
    key_region: torch.Tensor
    grid_hw: tuple[int, int]
    eps: float

    @property
    def num_components(self) -> int:
        """C, the number of union-find components."""
        return int(self.energy.numel())

    @property
    def num_selected(self) -> int:
        """|S|, the number of selected tokens."""
        return int(self.selected.sum())


def _check_generator(generator) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _check_params(sigma, delta_s, delta_l, beta, skip_ratio) -> dict:
    return {
        "sigma": check_real("sigma", sigma, low=0.0, low_inclusive=False),
        "delta_s": check_real("delta_s", delta_s, low=0.0, low_inclusive=False),
        "delta_l": check_real("delta_l", delta_l, low=0.0, low_inclusive=False),
        "beta": check_real("beta", beta, low=0.0, low_inclusive=True),
        "skip_ratio": check_real("skip_ratio", skip_ratio, low=0.0, low_inclusive=True, high=1.0),
    }


def _check_backend(backend, dtype: torch.dtype, devices) -> None:
    """Validate ``backend`` (and ``dtype`` with it) for images on ``devices`` before any
    descriptor runs, so that the errors name the public op ``select_key_regions``. The fused
    backends compute in float32 only."""
    check_dtype(dtype)
    for device in dict.fromkeys(devices):  # distinct devices, in order
        resolved = resolve_backend(backend, device, "select_key_regions", tuple(DESCRIPTOR_BACKENDS))
        if backend != "auto" and resolved != "torch" and dtype != torch.float32:
            raise ValueError(f"dtype: select_key_regions with backend={resolved!r} computes the "
                             f"descriptors in float32 only, got {dtype}; use backend='torch' for float64")


def _sample_background(labels: np.ndarray, is_key: np.ndarray, keep_ratio: float,
                       generator: torch.Generator | None) -> np.ndarray:
    """bool [N]: for every background component in label order, round(keep_ratio*|C|) of its
    tokens (raster order) chosen by ``torch.randperm(|C|, generator=generator)[:k]``."""
    n = labels.shape[0]
    picked = np.zeros(n, dtype=bool)
    counts = np.bincount(labels, minlength=is_key.shape[0])
    order = np.argsort(labels, kind="stable")  # tokens grouped by component, raster order within
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    device = generator.device if generator is not None else torch.device("cpu")
    for comp in np.flatnonzero(~is_key):
        size = int(counts[comp])
        k = round(keep_ratio * size)  # Python round: half to even
        perm = torch.randperm(size, generator=generator, device=device)[:k].cpu().numpy()
        picked[order[starts[comp] + perm]] = True
    return picked


def key_regions_from_descriptors(lam_max, lam_min, lightness, grid_hw, *, delta_s: float = 0.5,
                                 delta_l: float = 30.0, beta: float = 0.1,
                                 skip_ratio: float = 0.7,
                                 generator: torch.Generator | None = None,
                                 device: torch.device | str | None = None) -> KeyRegions:
    """SGUF steps after the descriptors: ε, union-find, energies, key regions, sampling.

    Args:
        lam_max, lam_min, lightness: float [N] (N = gh*gw) tensors or numpy arrays, as
            :func:`patch_descriptors` returns them (used in float64).
        grid_hw: (gh, gw).
        delta_s, delta_l, beta, skip_ratio, generator: as :func:`select_key_regions`.
        device: where the returned tensors go (default: the device of ``lam_max``, CPU for numpy).

    Returns:
        :class:`KeyRegions`.
    """
    gh, gw = check_grid_hw(grid_hw)
    params = _check_params(1.0, delta_s, delta_l, beta, skip_ratio)
    _check_generator(generator)
    if device is None:
        device = lam_max.device if isinstance(lam_max, torch.Tensor) else torch.device("cpu")
    n = gh * gw
    vecs = []
    for name, v in (("lam_max", lam_max), ("lam_min", lam_min), ("lightness", lightness)):
        if isinstance(v, torch.Tensor):
            v = v.detach().to("cpu", torch.float64).numpy()
        v = np.ascontiguousarray(np.asarray(v, dtype=np.float64))
        if v.shape != (n,):
            raise ValueError(f"{name}: expected shape ({n},) = (gh*gw,), got {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError(f"{name}: contains NaN or Inf values")
        vecs.append(v)
    lmax, lmin, light = vecs

    trace = lmax + lmin
    eps = 1e-6 + 1e-3 * float(np.median(trace))
    labels = merge_components_numpy(lmax, lmin, light, (gh, gw), params["delta_s"],
                                    params["delta_l"], eps)
    counts = np.bincount(labels)
    energy = np.bincount(labels, weights=trace) / counts
    is_key = energy > params["beta"] * float(np.median(energy))
    key_tokens = is_key[labels]
    selected = key_tokens | _sample_background(labels, is_key, 1.0 - params["skip_ratio"], generator)
    key_region = np.where(selected, 0, -1).astype(np.int32)

    def to_dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    return KeyRegions(labels=to_dev(labels), energy=to_dev(energy), is_key=to_dev(is_key),
                      key_token_mask=to_dev(key_tokens), selected=to_dev(selected),
                      key_region=to_dev(key_region), grid_hw=(gh, gw), eps=eps)


def _is_grid_pair(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 1 and value.numel() == 2
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, numbers.Integral) for v in value))


def select_key_regions(image, grid_hw, *, sigma: float = 1.0, delta_s: float = 0.5,
                       delta_l: float = 30.0, beta: float = 0.1, skip_ratio: float = 0.7,
                       generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float32, backend: str = "auto"):
    """Structure-guided union-find (SGUF) key regions and the selected token set S.

    Args:
        image: RGB uint8 [H, W, 3] torch tensor (CPU or CUDA) or numpy array, already resized to
            (gh*P) x (gw*P) for a square patch size P; or a list of such images, or a batch
            [B, H, W, 3] (then a list of results is returned).
        grid_hw: (gh, gw) token grid; for a list/batch either one pair for all images or a list
            of pairs, one per image. Token (r, c) is r*gw + c (raster order).
        sigma: Gaussian smoothing of CIELab L (> 0).
        delta_s: structure threshold of the merge rule (> 0).
        delta_l: lightness threshold of the merge rule, L in 0..100 (> 0).
        beta: a component is a key region iff energy > beta * median component energy (>= 0).
        skip_ratio: fraction of each background component that is skipped, in [0, 1]; each
            background component keeps round((1 - skip_ratio) * |C|) tokens (half to even).
        generator: torch.Generator for the background sampling (None: global RNG). Components are
            visited in label order, one ``torch.randperm(|C|, generator=generator)`` each.
        dtype: precision of the descriptor computation, torch.float32 (default) or torch.float64
            (the union-find and energies always run in float64).
        backend: descriptor stage on "torch", "triton" or "cuda" (float32 only); "auto" uses
            Triton for CUDA images when it is importable, else torch.

    Returns:
        :class:`KeyRegions` (tensors on the image's device), or a list of them for a list/batch.
    Raises:
        TypeError / ValueError naming the offending argument; RuntimeError (naming
        ``select_key_regions``) when a forced backend cannot run on the images' device.
    """
    params = _check_params(sigma, delta_s, delta_l, beta, skip_ratio)
    _check_generator(generator)
    rest = {k: params[k] for k in ("delta_s", "delta_l", "beta", "skip_ratio")}

    def describe(img, grid):
        return patch_descriptors_on_backend(img, grid, sigma=params["sigma"], dtype=dtype, backend=backend)

    if isinstance(image, (list, tuple)):
        if len(image) == 0:
            raise ValueError("image: expected at least one image, got an empty list")
        images = [check_image(im, f"image[{i}]") for i, im in enumerate(image)]
        batched = None
    else:
        checked = check_image(image, allow_batch=True)
        if checked.dim() == 3:
            grid = check_grid_hw(grid_hw)
            _check_backend(backend, dtype, [checked.device])
            lmax, lmin, light = describe(checked, grid)
            return key_regions_from_descriptors(lmax, lmin, light, grid, generator=generator,
                                                device=checked.device, **rest)
        if checked.shape[0] == 0:
            raise ValueError(f"image: batch is empty, shape {tuple(checked.shape)}")
        images = list(checked.unbind(0))
        batched = checked

    if _is_grid_pair(grid_hw):
        grids = [check_grid_hw(grid_hw)] * len(images)
    else:
        if not isinstance(grid_hw, (list, tuple)) or len(grid_hw) != len(images):
            raise ValueError(f"grid_hw: expected one (gh, gw) pair or a list of {len(images)} "
                             f"pairs (one per image), got {grid_hw!r}")
        grids = [check_grid_hw(g, f"grid_hw[{i}]") for i, g in enumerate(grid_hw)]
    _check_backend(backend, dtype, [im.device for im in images])

    if batched is not None and len(set(grids)) == 1:  # one batched descriptor pass
        desc = describe(batched, grids[0])
        host = [d.to("cpu", torch.float64).numpy() for d in desc]  # one device->host copy each
        per_image = [tuple(h[b] for h in host) for b in range(len(images))]
    else:
        per_image = []
        for i, (im, g) in enumerate(zip(images, grids)):
            try:
                per_image.append(describe(im, g))
            except ValueError as exc:
                raise ValueError(f"image[{i}] / grid_hw: {exc}") from None
    return [key_regions_from_descriptors(*d, g, generator=generator, device=im.device, **rest)
            for d, g, im in zip(per_image, grids, images)]
