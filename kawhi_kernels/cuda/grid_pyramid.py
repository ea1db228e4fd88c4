"""CUDA ``grid_pyramid`` (hand-written kernel in csrc/grid_pyramid.cu), thin wrapper.

One launch for all levels: a thread block per (leading row, strip), a strip being a band of whole
rows of one frame whose first row is a multiple of every cell size (or the whole frame), so no
cell straddles two strips. The block reads its strip once with 16-byte loads into shared memory
(fp32) and builds the levels in ascending cell size, each from the largest smaller level whose
size divides it. Every output is written once: no atomics, deterministic. This module plans the
strips (host-side, plain Python) and fills the argument struct; the public op sends fp64 inputs
to the torch reference.
"""
from __future__ import annotations

import math

import torch

from ._launch import device_index, dtype_code, extension_for, make_args, ptr, stream_handle

# Shared memory a strip should stay within (fp32 slots) so that several blocks share an SM;
# strips that must be larger (a cell as tall as the frame) may use the device's opt-in limit.
PREFERRED_SHARED_FLOATS = 12 * 1024
# Shared memory the kernel declares statically (two int tables of MAX_PYRAMID_LEVELS) plus a margin.
_STATIC_SHARED_BYTES = 1024


def _lcm(values: list[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def device_shared_floats(device: torch.device) -> int:
    """fp32 slots of dynamic shared memory one block may use on ``device`` (opt-in limit)."""
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block
    return (int(optin) - _STATIC_SHARED_BYTES) // 4


def strip_rows(h: int, w: int, sizes: list[int], shared_floats, limit_floats: int,
               preferred_floats: int = PREFERRED_SHARED_FLOATS) -> int:
    """Rows per strip for a frame of ``h`` x ``w`` tokens and the (ascending, distinct) cell
    ``sizes``: the largest multiple of lcm(sizes) whose strip fits ``preferred_floats`` fp32
    slots (``shared_floats(rows, w, sizes)``), at least one lcm, or the whole frame when a cell
    is as tall as it or the lcm reaches ``h``. ValueError naming ``grids`` when even that strip
    exceeds ``limit_floats`` (the device's shared memory per block)."""
    step = _lcm(sizes)
    if step >= h or sizes[-1] >= h or shared_floats(h, w, sizes) <= preferred_floats:
        rows = h
    else:
        fit = step
        while fit + step < h and shared_floats(fit + step, w, sizes) <= preferred_floats:
            fit += step
        rows = fit
    need = shared_floats(rows, w, sizes)
    if need > limit_floats:
        raise ValueError(
            f"grids: a frame of {h} x {w} tokens with cell sizes {sizes} needs strips of {rows} "
            f"rows ({need} fp32 values of shared memory per block); the CUDA grid_pyramid holds "
            f"at most {limit_floats} on this device (4-byte slots); use backend='triton' or "
            "'torch'")
    return rows


def plan_strips(grid_list: list[list[int]], sizes: list[int], shared_floats, limit_floats: int,
                preferred_floats: int = PREFERRED_SHARED_FLOATS):
    """Host tables of the kernel for images ``grid_list`` [(t, h, w), …] and cell ``sizes``
    (ascending, distinct).

    Returns (strips int64 [S, 3] of (first token, width, rows), cell_base int64 [S, L] of the
    output cell of each strip's first cell per level, cells per level [L], the largest
    shared_floats of any strip). Images and frames in order, strips top to bottom.
    """
    strips, bases = [], []
    cells = [0] * len(sizes)
    token = 0
    most = 1
    for t, h, w in grid_list:
        rows = strip_rows(h, w, sizes, shared_floats, limit_floats, preferred_floats)
        most = max(most, shared_floats(rows, w, sizes))
        grid = [(-(-h // s), -(-w // s)) for s in sizes]
        for f in range(t):
            for r0 in range(0, h, rows):
                n = min(rows, h - r0)
                strips.append((token + (f * h + r0) * w, w, n))
                bases.append([cells[l] + (f * ch + r0 // s) * cw
                              for l, (s, (ch, cw)) in enumerate(zip(sizes, grid))])
        for l, (ch, cw) in enumerate(grid):
            cells[l] += t * ch * cw
        token += t * h * w
    strips_t = torch.tensor(strips, dtype=torch.int64).reshape(-1, 3)
    bases_t = torch.tensor(bases, dtype=torch.int64).reshape(-1, len(sizes))
    return strips_t, bases_t, cells, most


def grid_pyramid_cuda(mass: torch.Tensor, grids: torch.Tensor,
                      levels: list[int]) -> list[torch.Tensor]:
    """CUDA ``grid_pyramid`` (inputs validated by :func:`kawhi_kernels.ops.grid_pyramid`).

    Args:
        mass: float [..., N] (fp16/bf16/fp32) CUDA tensor, N = Σ t·h·w.
        grids: int64 [n_images, 3] CPU tensor of (t, h, w) token grids.
        levels: cell sizes (positive ints, any order, repeats allowed).

    Returns:
        one fp32 [..., cells_l] tensor per entry of ``levels``.

    Raises:
        ValueError naming ``grids`` when a frame's strip does not fit the device's shared memory
        (a row of more than about 10k tokens, or a cell as tall as a frame of that size).
    """
    device = mass.device
    ext = extension_for(device, "grid_pyramid")
    code = dtype_code(ext, "mass", mass.dtype)
    grid_list = [[int(v) for v in g] for g in grids.tolist()]
    sizes = sorted(set(int(s) for s in levels))
    if len(sizes) > ext.MAX_PYRAMID_LEVELS:
        raise ValueError(f"levels: the CUDA grid_pyramid takes at most {ext.MAX_PYRAMID_LEVELS} "
                         f"distinct cell sizes, got {len(sizes)}")
    lead_shape = mass.shape[:-1]
    flat = mass.reshape(-1, mass.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    num_lead = flat.shape[0]
    limit = min(device_shared_floats(device), int(ext.MAX_STRIP_TOKENS))
    strips, bases, cells, most = plan_strips(grid_list, sizes, ext.grid_pyramid_shared_floats,
                                             limit)
    outs = [torch.empty(num_lead, c, dtype=torch.float32, device=device) for c in cells]
    if num_lead and strips.shape[0]:
        keep = [strips.to(device), bases.to(device),
                torch.tensor(sizes, dtype=torch.int32, device=device),
                torch.tensor([o.data_ptr() for o in outs], dtype=torch.int64, device=device),
                torch.tensor(cells, dtype=torch.int64, device=device)]
        strips_d, bases_d, sizes_d, outs_d, cells_d = keep
        a = make_args(
            ext, "grid_pyramid", mass=ptr(flat), dtype=code, num_lead=num_lead,
            num_tokens=flat.shape[1], mass_stride=flat.stride(0), strips=ptr(strips_d),
            num_strips=strips.shape[0], cell_sizes=ptr(sizes_d), num_levels=len(sizes),
            cell_base=ptr(bases_d), outs=ptr(outs_d), out_cells=ptr(cells_d),
            shared_floats=most, stream=stream_handle(device), device=device_index(device))
        ext.grid_pyramid(a)
        del keep  # stream-ordered reuse only (see attention_mass_cuda)
    by_size = {s: o.reshape(*lead_shape, c) for s, o, c in zip(sizes, outs, cells)}
    result, seen = [], set()
    for s in levels:
        s = int(s)
        result.append(by_size[s] if s not in seen else by_size[s].clone())
        seen.add(s)
    return result
