"""``grid_pyramid``: exact multi-scale sums of per-patch values over image token grids."""
from __future__ import annotations

import numbers

import torch

from .. import _validation as V
from .._backend import BACKENDS, resolve_backend
from ._dispatch import implementation_for

IMPLEMENTATIONS = {
    "torch": "kawhi_kernels.reference.grid_pyramid:grid_pyramid_reference",
    "triton": "kawhi_kernels.triton.grid_pyramid:grid_pyramid_triton",
    # Only when asked for (backend="cuda"): `auto` keeps Triton until GPU timings show a shape
    # class where the CUDA kernel wins (the rule next to _backend.resolve_backend).
    "cuda": "kawhi_kernels.cuda.grid_pyramid:grid_pyramid_cuda",
}


def num_cells(flat_grids: list[int], cell_size: int) -> int:
    """Cells at ``cell_size`` over grids given flat as [t0, h0, w0, t1, h1, w1, …]."""
    triples = zip(flat_grids[0::3], flat_grids[1::3], flat_grids[2::3])
    return sum(t * (-(-h // cell_size)) * (-(-w // cell_size)) for t, h, w in triples)


# Custom-op schemas take no nested lists, so grids travel flat: [t0, h0, w0, t1, h1, w1, …].
@torch.library.custom_op("kawhi::grid_pyramid", mutates_args=())
def _grid_pyramid_op(mass: torch.Tensor, flat_grids: list[int], levels: list[int],
                     backend: str) -> list[torch.Tensor]:
    # Backend resolution runs here, eagerly even under torch.compile (it may import Triton).
    resolved = resolve_backend(backend, mass.device, "grid_pyramid", tuple(IMPLEMENTATIONS))
    impl = implementation_for(IMPLEMENTATIONS, resolved, mass.dtype)
    grid_tensor = torch.tensor(flat_grids, dtype=torch.int64).reshape(-1, 3)
    return impl(mass, grid_tensor, levels)


@_grid_pyramid_op.register_fake
def _(mass, flat_grids, levels, backend):
    dtype = torch.float64 if mass.dtype == torch.float64 else torch.float32
    return [mass.new_empty((*mass.shape[:-1], num_cells(flat_grids, s)), dtype=dtype) for s in levels]


# Largest accepted cell side: far beyond any image token grid (Qwen-VL grids are at most a few
# hundred tokens per side) and far inside the int32/int64 range of the custom-op schema and the
# kernels' scalar arguments. Larger values are taken as mistakes (e.g. levels=80 meaning 2^79).
MAX_CELL_SIZE = 1 << 16
MAX_LEVELS = MAX_CELL_SIZE.bit_length()  # int L = 17: cells 1, 2, …, 2^16


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def normalize_levels(levels) -> list[int]:
    """``levels``: an int L in [1, MAX_LEVELS] (cells 1, 2, 4, …, 2^(L−1)) or a non-empty list of
    cell sizes in [1, MAX_CELL_SIZE]; returns the cell sizes as a list of ints.

    Raises TypeError for a bool, a non-int or a list with non-int entries, ValueError for values
    out of range.
    """
    if _is_int(levels):
        if not 1 <= levels <= MAX_LEVELS:
            raise ValueError(f"levels: expected an int in [1, {MAX_LEVELS}] (coarsest cell 2**(L-1) <= "
                             f"{MAX_CELL_SIZE}), got {levels}")
        return [1 << i for i in range(int(levels))]
    if not isinstance(levels, (list, tuple)):
        raise TypeError(f"levels: expected a positive int or a non-empty list of ints, got {levels!r}")
    if not levels:
        raise ValueError("levels: expected a positive int or a non-empty list of ints, got an empty list")
    if not all(_is_int(s) for s in levels):
        raise TypeError(f"levels: cell sizes must be ints, got {list(levels)}")
    if any(not 1 <= s <= MAX_CELL_SIZE for s in levels):
        raise ValueError(f"levels: cell sizes must be in [1, {MAX_CELL_SIZE}], got {list(levels)}")
    return [int(s) for s in levels]


def normalize_grids(grids, name: str = "grids") -> list[list[int]]:
    """``grids``: int32/int64 tensor [n_images, 3] or list of (t, h, w) rows of ints, all positive
    (LLM token grids); returns them as a list of [t, h, w] lists of ints.

    Raises TypeError for non-integer entries (floats, even integral ones, and bools) and
    ValueError for a wrong shape or non-positive sizes; messages start with ``name``.
    """
    if isinstance(grids, torch.Tensor):
        if grids.dtype.is_floating_point or grids.dtype.is_complex or grids.dtype == torch.bool:
            raise TypeError(f"{name}: expected integer entries (an int32/int64 tensor), got {grids.dtype}")
        V.check_tensor(name, grids, ndim=2, dtypes=V.INDEX_DTYPES)
        grids = grids.tolist()
    if not isinstance(grids, (list, tuple)) or any(
            not isinstance(g, (list, tuple)) or len(g) != 3 for g in grids):
        raise ValueError(f"{name}: expected [n_images, 3] rows of (t, h, w)")
    bad = [v for g in grids for v in g if not _is_int(v)]
    if bad:
        raise TypeError(f"{name}: expected integer entries, got {bad[0]!r} ({type(bad[0]).__name__}) "
                        f"in {[list(g) for g in grids]}")
    grids = [[int(v) for v in g] for g in grids]
    if any(v < 1 for g in grids for v in g):
        raise ValueError(f"{name}: t, h and w must be positive, got {grids}")
    return grids


def _clamp_cells(level_list: list[int], grid_list: list[list[int]]) -> list[int]:
    """Cell sizes capped at the largest grid side: a cell that covers every frame already gives
    one cell per frame, so the result is unchanged and the kernels loop over no empty rows."""
    side = max([1] + [max(h, w) for _, h, w in grid_list])      # (a list: traceable by dynamo)
    return [min(s, side) for s in level_list]


def grid_pyramid(mass: torch.Tensor, grids, levels=3, *, backend: str = "auto") -> list[torch.Tensor]:
    """Sum per-patch values over cells of 1, 2, 4, … patches of each image's token grid.

    Args:
        mass: float [..., N], N = Σ t·h·w, the values of every image token, images concatenated in
            ``grids`` order, each in raster order (frame, row, column) — e.g. the region axis of
            ``attention_mass`` with one region per image token.
        grids: int [n_images, 3] LLM token grids (t, h, w) (after spatial merge; see
            :func:`kawhi_kernels.regions.llm_grid_thw`).
        levels: int L in [1, MAX_LEVELS = 17] (cell sizes 1, 2, …, 2^(L−1)) or a non-empty list
            of cell sizes in [1, MAX_CELL_SIZE = 2^16]. Cells larger than a grid side are allowed
            (a cell covering a whole frame holds the frame's total).
        backend: "auto" (Triton on CUDA tensors, else torch), "torch", "triton" or "cuda" (the
            hand-written kernel of csrc/grid_pyramid.cu, only when asked for; it stages a band of
            rows per thread block in shared memory and raises a ValueError naming ``grids`` for
            a frame whose band does not fit, e.g. a cell as tall as a frame of ~50k tokens).
    Returns:
        one fp32 (fp64 for fp64 input) tensor [..., cells_l] per level; cells of each image in
        raster order, images concatenated; edge cells are ragged and hold what falls in them.
    Raises:
        TypeError / ValueError naming the offending argument (non-integer grids, levels out of
        range, a meta tensor, …).
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
    V.check_backend(backend, BACKENDS)
    with torch.no_grad():
        flat = [v for g in grid_list for v in g]
        return _grid_pyramid_op(mass.detach(), flat, _clamp_cells(level_list, grid_list), backend)
