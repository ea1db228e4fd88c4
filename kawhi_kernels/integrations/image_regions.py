"""SGUF key regions of raw prompt images, shared by the TRL and verl integrations.

Both frameworks hold the raw images where the rollout happens (TRL: the dataset rows; verl: the
agent loop's ``multi_modal_data["images"]``) and the processor's ``image_grid_thw``. Here each
image is resized to the processor's grid (``h·patch`` × ``w·patch`` pixels, h, w the patch grid)
and SGUF runs on the merged-token grid (h / merge, w / merge). A small content-addressed cache
makes the G responses of one prompt (and repeated prompts) share one selection.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from ..credit.pipeline import KAWHI
from ..regions.sguf import KeyRegions
from .rl import selected_image_key_mask

__all__ = ["RegionCache", "as_uint8_rgb", "key_mask_for_sequence", "merged_grid_hw", "regions_for_grids"]


def merged_grid_hw(grid_thw: Sequence[int], merge_size: int) -> tuple[int, int]:
    """(h / merge, w / merge) of a processor grid (t, h, w); ValueError unless t == 1 and h, w are
    multiples of ``merge_size``."""
    t, h, w = (int(x) for x in grid_thw)
    if t != 1 or h % merge_size or w % merge_size:
        raise ValueError(f"image_grid_thw: KAWHI expects single-frame images with h, w multiples of {merge_size}, "
                         f"got {(t, h, w)}")
    return h // merge_size, w // merge_size


def as_uint8_rgb(image, size_wh: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image / array ([H, W(, C)] or [C, H, W]) / tensor, resized (bicubic)
    to ``size_wh`` = (W, H) when it differs."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = np.moveaxis(array, 0, -1)
        if array.dtype != np.uint8:
            scale = 255.0 if array.max() <= 1.0 else 1.0
            array = np.clip(array * scale, 0, 255).astype(np.uint8)
        image = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != tuple(size_wh):
        image = image.resize(tuple(size_wh), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8).copy()


class RegionCache:
    """Least-recently-used cache of SGUF selections keyed by (scope, pixel digest, merged grid).

    SGUF samples background tokens at random, so one selection S must be shared by the G responses
    of a prompt (pass the prompt's group id as ``scope``) but not frozen across training steps
    (a new step has new group ids).

    Args:
        max_entries: entries kept (a positive int).
    """

    def __init__(self, max_entries: int = 256):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries: expected a positive int, got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_compute(self, pixels: np.ndarray, grid_hw: tuple[int, int], compute, scope=None) -> KeyRegions:
        """The cached selection of (``scope``, ``pixels``, ``grid_hw``), else ``compute()`` stored."""
        key = (scope, hashlib.sha1(pixels.tobytes()).hexdigest(), pixels.shape, tuple(grid_hw))
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        value = compute()
        self._entries[key] = value
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value


def regions_for_grids(kawhi: KAWHI, images: Sequence, grids_thw, *, merge_size: int, patch_size: int,
                      cache: RegionCache | None = None, scope=None) -> list[KeyRegions]:
    """SGUF :class:`~kawhi_kernels.KeyRegions` of each image, on the processor's token grid.

    Args:
        kawhi: the :class:`~kawhi_kernels.KAWHI` configuration (SGUF parameters).
        images: N raw images (PIL / array / tensor, any size: resized to the grid).
        grids_thw: int [N, 3] (or N triples) ``image_grid_thw`` of the processor, patch units.
        merge_size: the vision config's ``spatial_merge_size``; patch_size: its ``patch_size``.
        cache: optional :class:`RegionCache` (identical pixels and grid in the same ``scope`` → the
            same selection object); scope: hashable cache scope (e.g. the prompt's group id).
    Returns:
        N ``KeyRegions``; region i's ``selected`` indexes the (h/merge)·(w/merge) merged tokens of
        image i in raster order.
    """
    grids = grids_thw.tolist() if isinstance(grids_thw, torch.Tensor) else [list(g) for g in grids_thw]
    images = list(images)
    if len(images) != len(grids):
        raise ValueError(f"images: {len(images)} images but {len(grids)} image grids (image_grid_thw)")
    out = []
    for image, grid in zip(images, grids):
        grid_hw = merged_grid_hw(grid, merge_size)
        pixels = as_uint8_rgb(image, (grid_hw[1] * merge_size * patch_size, grid_hw[0] * merge_size * patch_size))

        def compute(pixels=pixels, grid_hw=grid_hw):
            return kawhi.select_regions([torch.from_numpy(pixels)], [grid_hw])[0]

        out.append(cache.get_or_compute(pixels, grid_hw, compute, scope) if cache is not None else compute())
    return out


def key_mask_for_sequence(input_ids: torch.Tensor, image_token_id: int, regions: Sequence[KeyRegions]) -> torch.Tensor:
    """bool [L] (same leading shape as ``input_ids``, 1-D or [1, L]): True at the SGUF-selected
    image tokens of one sequence whose images (in order of appearance) have ``regions``."""
    if input_ids.dim() == 1:
        return selected_image_key_mask(input_ids[None], image_token_id, [list(regions)])[0]
    return selected_image_key_mask(input_ids, image_token_id, [list(regions)] * input_ids.shape[0])
