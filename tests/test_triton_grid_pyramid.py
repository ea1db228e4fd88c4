"""Triton ``grid_pyramid`` vs the torch reference (CPU interpreter without a GPU)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported anywhere below

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from triton_helpers import DEVICE, fresh_seed

from kawhi_kernels.ops.grid_pyramid import grid_pyramid
from kawhi_kernels.reference.grid_pyramid import grid_pyramid_reference
from kawhi_kernels.triton.grid_pyramid import grid_pyramid_triton

GRIDS = [
    [[1, 5, 7], [2, 3, 4], [1, 1, 1]],       # ragged edges, two frames, a single-token image
    [[1, 8, 8]],                             # exact 2/4/8 tiling
    [[3, 2, 9], [1, 6, 1]],
]


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("lead,dtype", [((), torch.float32), ((3, 5), torch.float32),
                                        ((2,), torch.float16), ((4,), torch.bfloat16)])
def test_matches_reference(grids, lead, dtype):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    grid_tensor = torch.tensor(grids, dtype=torch.int64)
    n = int(grid_tensor.prod(dim=1).sum())
    mass = torch.randn(*lead, n, generator=g).to(device=DEVICE, dtype=dtype)
    levels = [1, 2, 3, 4, 8]
    want = grid_pyramid_reference(mass, grid_tensor, levels)
    got = grid_pyramid_triton(mass, grid_tensor, levels, block_m=16, block_c=16)
    for level, a, b in zip(levels, got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, level
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed {seed}: {m}")


def test_totals_are_preserved_and_ragged_cells_hold_what_falls_in_them():
    grids = torch.tensor([[1, 3, 5]], dtype=torch.int64)
    mass = torch.arange(15, dtype=torch.float32, device=DEVICE)
    cells2, cells4 = grid_pyramid_triton(mass, grids, [2, 4])
    # 3×5 tokens in 2×2 cells: rows {0,1},{2}; cols {0,1},{2,3},{4}.
    expect2 = torch.tensor([0 + 1 + 5 + 6, 2 + 3 + 7 + 8, 4 + 9, 10 + 11, 12 + 13, 14],
                           dtype=torch.float32, device=DEVICE)
    assert torch.equal(cells2, expect2)
    assert torch.equal(cells4, torch.tensor([0 + 1 + 2 + 3 + 5 + 6 + 7 + 8 + 10 + 11 + 12 + 13,
                                             4 + 9 + 14], dtype=torch.float32, device=DEVICE))


def test_public_op_with_triton_backend_and_fp64_fallback():
    mass = torch.rand(4, 2 * 3 * 4 + 25, device=DEVICE)
    grids = [[2, 3, 4], [1, 5, 5]]
    got = grid_pyramid(mass, grids, 3, backend="triton")
    want = grid_pyramid(mass, grids, 3, backend="torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    got64 = grid_pyramid(mass.double(), grids, [1, 2], backend="triton")
    assert got64[0].dtype == torch.float64
    assert torch.equal(got64[1], grid_pyramid_reference(mass.double(), torch.tensor(grids), [1, 2])[1])
