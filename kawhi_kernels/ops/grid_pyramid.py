"""``grid_pyramid``: exact multi-scale sums of per-patch values over image token grids."""
from __future__ import annotations

import torch

from .. import _validation as V
from .._backend import resolve_backend
from ._dispatch import implementation_for

IMPLEMENTATIONS = {
    "torch": "kawhi_kernels.reference.grid_pyramid:grid_pyramid_reference",
    "triton": "kawhi_kernels.triton.grid_pyramid:grid_pyramid_triton",
}


def num_cells(flat_grids: list[int], cell_size: int) -> int:
    """Cells at ``cell_size`` over grids given flat as [t0, h0, w0, t1, h1, w1, …]."""
    triples = zip(flat_grids[0::3], flat_grids[1::3], flat_grids[2::3])
    return sum(t * (-(-h // cell_size)) * (-(-w // cell_size)) for t, h, w in triples)


# Custom-op schemas take no nested lists, so grids travel flat: [t0, h0, w0, t1, h1, w1, …].
@torch.library.custom_op("kawhi::grid_pyramid", mutates_args=())
def _grid_pyramid_op(mass: torch.Tensor, flat_grids: list[int], levels: list[int],
                     backend: str) -> list[torch.Tensor]:
    impl = implementation_for(IMPLEMENTATIONS, backend, mass.dtype)
    grid_tensor = torch.tensor(flat_grids, dtype=torch.int64).reshape(-1, 3)
    return impl(mass, grid_tensor, levels)


@_grid_pyramid_op.register_fake
def _(mass, flat_grids, levels, backend):
    dtype = torch.float64 if mass.dtype == torch.float64 else torch.float32
    return [mass.new_empty((*mass.shape[:-1], num_cells(flat_grids, s)), dtype=dtype) for s in levels]


def normalize_levels(levels) -> list[int]:
    """``levels``: an int L (cells 1, 2, 4, …, 2^(L−1)) or a list of positive cell sizes."""
    if isinstance(levels, int) and not isinstance(levels, bool):
        V.check_positive_int("levels", levels)
        return [1 << i for i in range(levels)]
    if not isinstance(levels, (list, tuple)) or not levels:
        raise TypeError(f"levels: expected a positive int or a non-empty list of ints, got {levels!r}")
    for s in levels:
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"levels: cell sizes must be positive ints, got {list(levels)}")
    return list(levels)


def normalize_grids(grids) -> list[list[int]]:
    """``grids``: int tensor/list [n_images, 3] of LLM token grids (t, h, w), all positive."""
    if isinstance(grids, torch.Tensor):
        V.check_tensor("grids", grids, ndim=2, dtypes=V.INDEX_DTYPES)
        grids = grids.tolist()
    if not isinstance(grids, (list, tuple)) or any(
            not isinstance(g, (list, tuple)) or len(g) != 3 for g in grids):
        raise ValueError("grids: expected [n_images, 3] rows of (t, h, w)")
    grids = [[int(v) for v in g] for g in grids]
    if any(v < 1 for g in grids for v in g):
        raise ValueError(f"grids: t, h and w must be positive, got {grids}")
    return grids


def grid_pyramid(mass: torch.Tensor, grids, levels=3, *, backend: str = "auto") -> list[torch.Tensor]:
    """Sum per-patch values over cells of 1, 2, 4, … patches of each image's token grid.

    Args:
        mass: float [..., N], N = Σ t·h·w, the values of every image token, images concatenated in
            ``grids`` order, each in raster order (frame, row, column) — e.g. the region axis of
            ``attention_mass`` with one region per image token.
        grids: int [n_images, 3] LLM token grids (t, h, w) (after spatial merge; see
            :func:`kawhi_kernels.regions.llm_grid_thw`).
        levels: int L (cell sizes 1, 2, …, 2^(L−1)) or a list of cell sizes.
    Returns:
        one fp32 (fp64 for fp64 input) tensor [..., cells_l] per level; cells of each image in
        raster order, images concatenated; edge cells are ragged and hold what falls in them.
    """
    V.check_tensor("mass", mass, dtypes=V.FLOAT_DTYPES)
    if mass.dim() < 1:
        raise ValueError("mass: expected at least 1 dimension [..., N]")
    grid_list = normalize_grids(grids)
    expected = sum(t * h * w for t, h, w in grid_list)
    if mass.shape[-1] != expected:
        raise ValueError(f"mass: last dim must equal the number of image tokens Σ t·h·w = {expected}, "
                         f"got {mass.shape[-1]}")
    level_list = normalize_levels(levels)
    resolved = resolve_backend(backend, mass.device, "grid_pyramid", tuple(IMPLEMENTATIONS))
    with torch.no_grad():
        flat = [v for g in grid_list for v in g]
        return _grid_pyramid_op(mass.detach(), flat, level_list, resolved)
