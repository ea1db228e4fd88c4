"""Region ids for image tokens: from Qwen-VL ``image_grid_thw`` to ``key_region`` vectors."""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops.grid_pyramid import normalize_grids
from ..reference.grid_pyramid import grid_cell_ids


def llm_grid_thw(image_grid_thw, spatial_merge_size: int = 2) -> torch.Tensor:
    """Vision-patch grids → LLM token grids.

    Args:
        image_grid_thw: int [n_images, 3] (t, h, w) in vision patches, as the Qwen processors return
            (int32/int64 tensor or list of int rows; float entries are a TypeError).
        spatial_merge_size: patches merged per side into one LLM token (2 for Qwen2/2.5/3-VL).
    Returns:
        int64 [n_images, 3] (t, h / merge, w / merge).
    """
    V.check_positive_int("spatial_merge_size", spatial_merge_size)
    grids = torch.tensor(normalize_grids(image_grid_thw, "image_grid_thw"), dtype=torch.int64).reshape(-1, 3)
    if bool((grids[:, 1:] % spatial_merge_size != 0).any()):
        raise ValueError(f"image_grid_thw: h and w must be divisible by spatial_merge_size="
                         f"{spatial_merge_size}, got {grids.tolist()}")
    grids[:, 1:] //= spatial_merge_size
    return grids


def image_key_regions(image_token_mask: torch.Tensor, grids, cell_size: int = 1) -> tuple[torch.Tensor, int]:
    """``key_region`` ids for keys that are image tokens, one region per cell of ``cell_size``.

    Args:
        image_token_mask: bool [total_k], True at image-token keys (packed over sequences; the
            i-th True key is the i-th token of the concatenated image grids, several images per
            sequence allowed).
        grids: int [n_images, 3] LLM token grids (t, h, w) in the order the images appear
            (int32/int64 tensor or list of int rows; float entries are a TypeError).
        cell_size: 1 = one region per image token; s = one region per s×s cell (ragged edges).
    Returns:
        (key_region int32 [total_k] with −1 for non-image keys, num_regions).
    """
    V.check_tensor("image_token_mask", image_token_mask, ndim=1, dtypes=(torch.bool,))
    V.check_positive_int("cell_size", cell_size)
    grid_list = normalize_grids(grids) if len(grids) else []
    cell_ids, num_regions = grid_cell_ids(torch.tensor(grid_list, dtype=torch.int64).reshape(-1, 3),
                                          cell_size, device=image_token_mask.device)
    num_image_keys = int(image_token_mask.sum())
    if num_image_keys != cell_ids.numel():
        raise ValueError(f"image_token_mask: marks {num_image_keys} image tokens but grids hold "
                         f"Σ t·h·w = {cell_ids.numel()}")
    key_region = torch.full(image_token_mask.shape, -1, dtype=torch.int32, device=image_token_mask.device)
    key_region[image_token_mask] = cell_ids.to(torch.int32)
    return key_region, num_regions
