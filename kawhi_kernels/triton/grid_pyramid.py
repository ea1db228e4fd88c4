"""Triton ``grid_pyramid``: exact sums of per-patch values over square cells, one launch per level.

Each program owns a [BLOCK_M leading rows, BLOCK_C cells] output tile and gathers the (ragged)
s × s patches of its cells from a host-built cell table (first token, rows and columns held,
image width), accumulating in fp32. Every output is written by exactly one program: no atomics,
deterministic. The tiles are numbered along grid axis 0 only (limit 2^31 − 1; axis 1 would stop
at 65535 cell tiles, 4M cells). The public op sends fp64 inputs to the torch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_guard, launch_options


@triton.jit
def _grid_cells_kernel(
    mass_ptr, out_ptr, cell_base_ptr, cell_rows_ptr, cell_cols_ptr, cell_width_ptr,
    num_lead, num_cells, stride_mass, stride_out, cell_size, num_cell_tiles,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = ((pid // num_cell_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_c = (pid % num_cell_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < num_cells
    m_ok = offs_m < num_lead
    base = tl.load(cell_base_ptr + offs_c, mask=c_ok, other=0)
    nrows = tl.load(cell_rows_ptr + offs_c, mask=c_ok, other=0)
    ncols = tl.load(cell_cols_ptr + offs_c, mask=c_ok, other=0)
    width = tl.load(cell_width_ptr + offs_c, mask=c_ok, other=0).to(tl.int64)
    row_base = mass_ptr + offs_m[:, None] * stride_mass
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for dy in range(cell_size):
        for dx in range(cell_size):
            ok = (dy < nrows) & (dx < ncols)
            token = base + dy * width + dx
            acc += tl.load(row_base + token[None, :], mask=m_ok[:, None] & ok[None, :],
                           other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_c[None, :], acc,
             mask=m_ok[:, None] & c_ok[None, :])


def _cell_table(grids: list[list[int]], cell: int, device):
    """(first token int64, rows int32, cols int32, image width int32) of every cell at ``cell``."""
    bases, rows, cols, widths = [], [], [], []
    offset = 0
    for t, h, w in grids:
        ch, cw = -(-h // cell), -(-w // cell)
        f = torch.arange(t)[:, None, None]
        i = torch.arange(ch)[None, :, None]
        j = torch.arange(cw)[None, None, :]
        bases.append((offset + f * h * w + i * cell * w + j * cell).reshape(-1))
        rows.append(torch.clamp(h - i * cell, max=cell).expand(t, ch, cw).reshape(-1))
        cols.append(torch.clamp(w - j * cell, max=cell).expand(t, ch, cw).reshape(-1))
        widths.append(torch.full((t * ch * cw,), w))
        offset += t * h * w
    return (torch.cat(bases).to(device), torch.cat(rows).to(device, torch.int32),
            torch.cat(cols).to(device, torch.int32), torch.cat(widths).to(device, torch.int32))


_NUM_WARPS = 4
_DEFAULT_TILE = {"BLOCK_M": 16, "BLOCK_C": 64}


def kernel_builds():
    """The launcher's compiled configurations (default tile, each input dtype) for the static
    GPU checks (:mod:`.builds`)."""
    from .builds import KernelBuild

    return [KernelBuild(name=f"grid_pyramid {tname} {_DEFAULT_TILE['BLOCK_M']}x{_DEFAULT_TILE['BLOCK_C']}",
                        kernel=_grid_cells_kernel,
                        pointer_types={"mass_ptr": "*" + tname, "out_ptr": "*fp32",
                                       "cell_base_ptr": "*i64"},
                        float_args=(), constexprs=dict(_DEFAULT_TILE), num_warps=_NUM_WARPS,
                        num_stages=3, tensor_cores=False)
            for tname in ("fp16", "bf16", "fp32")]


def grid_pyramid_triton(mass: torch.Tensor, grids: torch.Tensor, levels: list[int],
                        *, block_m: int = _DEFAULT_TILE["BLOCK_M"],
                        block_c: int = _DEFAULT_TILE["BLOCK_C"]) -> list[torch.Tensor]:
    """Triton ``grid_pyramid`` (inputs validated by :func:`kawhi_kernels.ops.grid_pyramid`).

    Args:
        mass: float [..., N] (fp16/bf16/fp32), N = Σ t·h·w.
        grids: int64 [n_images, 3] CPU tensor of (t, h, w) token grids.
        levels: cell sizes (positive ints).
        block_m, block_c: leading rows / cells per program (powers of two).

    Returns:
        one fp32 [..., cells_l] tensor per level.
    """
    grid_list = grids.tolist()
    lead_shape = mass.shape[:-1]
    flat = mass.reshape(-1, mass.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    num_lead = flat.shape[0]
    extra = launch_options(_NUM_WARPS)
    result = []
    for cell in levels:
        base, rows, cols, widths = _cell_table(grid_list, cell, mass.device)
        num_cells = base.numel()
        out = torch.zeros(num_lead, num_cells, dtype=torch.float32, device=mass.device)
        if num_lead and num_cells:
            cell_tiles = triton.cdiv(num_cells, block_c)
            with device_guard(mass.device):     # Triton launches on the current device
                _grid_cells_kernel[(triton.cdiv(num_lead, block_m) * cell_tiles,)](
                    flat, out, base, rows, cols, widths, num_lead, num_cells,
                    flat.stride(0), out.stride(0), cell, cell_tiles,
                    BLOCK_M=block_m, BLOCK_C=block_c, **extra)
        result.append(out.reshape(*lead_shape, num_cells))
    return result
