"""PyTorch reference for ``grid_pyramid``: exact sums of per-patch values over square cells.

Images are LLM token grids (t, h, w) in raster order, concatenated in the order of ``grids``.
At cell size s, token (f, r, c) of an image falls in cell f·⌈h/s⌉·⌈w/s⌉ + (r // s)·⌈w/s⌉ + c // s;
cells on the right and bottom edges are ragged (hold fewer tokens). Cells of all images are
concatenated in image order.
"""
from __future__ import annotations

import torch


def grid_cell_ids(grids: torch.Tensor, cell_size: int, device=None) -> tuple[torch.Tensor, int]:
    """Cell id (int64 [N], N = Σ t·h·w) of every image token at ``cell_size``, and the cell count."""
    ids, offset = [], 0
    device = grids.device if device is None else device
    for t, h, w in grids.tolist():
        ch, cw = -(-h // cell_size), -(-w // cell_size)
        frame = torch.arange(t, device=device)[:, None, None] * (ch * cw)
        rows = (torch.arange(h, device=device) // cell_size)[None, :, None] * cw
        cols = (torch.arange(w, device=device) // cell_size)[None, None, :]
        ids.append((frame + rows + cols).reshape(-1) + offset)
        offset += t * ch * cw
    if not ids:
        return torch.zeros(0, dtype=torch.int64, device=device), 0
    return torch.cat(ids), offset


def grid_pyramid_reference(mass: torch.Tensor, grids: torch.Tensor, levels: list[int]) -> list[torch.Tensor]:
    """Sum ``mass`` [..., N] over the cells of each level; returns one [..., cells_l] per level.

    Output dtype: fp64 for fp64 input, else fp32.
    """
    out_dtype = torch.float64 if mass.dtype == torch.float64 else torch.float32
    result = []
    for cell in levels:
        ids, num_cells = grid_cell_ids(grids, cell, device=mass.device)
        summed = torch.zeros(*mass.shape[:-1], num_cells, dtype=out_dtype, device=mass.device)
        result.append(summed.index_add_(mass.dim() - 1, ids, mass.to(out_dtype)))
    return result
