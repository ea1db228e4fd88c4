"""The CUDA ``grid_pyramid`` (csrc/grid_pyramid.cu + kawhi_kernels/cuda/grid_pyramid.py).

Host-side (no GPU needed): the strip plan the wrapper builds (strips partition every frame,
start on rows that are multiples of every cell size, and with the kernel's level-from-divisor
algorithm replayed in torch give the reference sums, every output cell written once), the
shared-memory sizing shared with the kernel, the error for frames that do not fit, the wrapper's
refusal of CPU tensors, and that ``auto`` never picks the CUDA backend. GPU tests (marked
``gpu``, skipped without a usable device) compare the kernel with the torch reference on
awkward grids, cell sizes, leading shapes, misaligned rows and bf16.
"""
from __future__ import annotations

import math

import pytest
import torch

from kawhi_kernels._extension import cuda_backend_problem, load_extension
from kawhi_kernels.cuda.grid_pyramid import (PREFERRED_SHARED_FLOATS, grid_pyramid_cuda,
                                             plan_strips, strip_rows)
from kawhi_kernels.ops.grid_pyramid import _clamp_cells
from kawhi_kernels.reference.grid_pyramid import grid_pyramid_reference

EXT = load_extension()
HAS_CUDA_BUILD = EXT is not None and EXT.has_cuda()


def _gpu_problem() -> str | None:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return cuda_backend_problem(torch.cuda.current_device())


GPU_PROBLEM = _gpu_problem()


def gpu_test(fn):
    fn = pytest.mark.skipif(GPU_PROBLEM is not None, reason=f"no usable CUDA device: {GPU_PROBLEM}")(fn)
    return pytest.mark.gpu(fn)


def shared_floats(rows: int, width: int, sizes: list[int]) -> int:
    """The kernel's shared-memory slots (the same formula as csrc/ops.h, written out): the strip,
    4 slots of alignment slack, the cells of every level above size 1."""
    return rows * width + 4 + sum(-(-rows // s) * -(-width // s) for s in sizes if s > 1)


AWKWARD_GRIDS = [
    [[1, 5, 7]],
    [[2, 3, 3], [1, 1, 1], [3, 13, 17]],
    [[1, 16, 16], [1, 9, 31]],
    [[4, 2, 40]],
]
LEVEL_SETS = [[1, 2, 4], [3, 2, 6, 1, 5], [4, 4, 1], [8], [2, 4, 8, 16]]


def _emulate(mass2d, strips, bases, cells, sizes):
    """The kernel's algorithm replayed in fp64 torch on the wrapper's tables: per strip, levels
    in ascending size, each from the largest earlier size dividing it (else the tokens)."""
    lead = mass2d.shape[0]
    outs = [torch.full((lead, c), math.nan, dtype=torch.float64) for c in cells]
    writes = [torch.zeros(c, dtype=torch.int64) for c in cells]
    for (token0, width, rows), base in zip(strips.tolist(), bases.tolist()):
        done = {1: mass2d[:, token0:token0 + rows * width].reshape(lead, rows, width)}
        for level, s in enumerate(sizes):
            p = max(q for q in done if s % q == 0)
            src, f = done[p], s // p
            ch, cw = -(-rows // s), -(-width // s)
            padded = torch.zeros(lead, ch * f, cw * f, dtype=torch.float64)
            padded[:, :src.shape[1], :src.shape[2]] = src
            cell = padded.reshape(lead, ch, f, cw, f).sum((2, 4))
            done[s] = cell
            outs[level][:, base[level]:base[level] + ch * cw] = cell.reshape(lead, -1)
            writes[level][base[level]:base[level] + ch * cw] += 1
    return outs, writes


@pytest.mark.parametrize("grids", AWKWARD_GRIDS)
@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("preferred", [PREFERRED_SHARED_FLOATS, 40, 1])
def test_strip_plan_with_the_kernel_algorithm_gives_the_reference(grids, levels, preferred):
    sizes = sorted(set(_clamp_cells(levels, grids)))
    strips, bases, cells, most = plan_strips(grids, sizes, shared_floats, 10**9, preferred)
    # strips tile every frame in order, start on rows divisible by every size (or hold the frame)
    token = 0
    for t, h, w in grids:
        for _ in range(t):
            r0 = 0
            while r0 < h:
                first, width, rows = strips[0].tolist()
                strips_left = strips[1:]
                assert (first, width) == (token + r0 * w, w) and 1 <= rows <= h - r0
                assert rows == h - r0 or all(rows % s == 0 for s in sizes)
                r0 += rows
                strips = strips_left
            token += h * w
    assert strips.shape[0] == 0
    strips, bases, cells, most = plan_strips(grids, sizes, shared_floats, 10**9, preferred)
    assert most == max(shared_floats(r, w, sizes) for _, w, r in strips.tolist())
    g = torch.Generator().manual_seed(len(sizes) * 31 + preferred)
    mass = torch.rand(3, sum(t * h * w for t, h, w in grids), generator=g, dtype=torch.float64)
    got, writes = _emulate(mass, strips, bases, cells, sizes)
    want = grid_pyramid_reference(mass, torch.tensor(grids), sizes)
    for level, (a, b, n) in enumerate(zip(got, want, writes)):
        assert torch.equal(n, torch.ones_like(n)), (level, n)   # every cell written once
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_strip_rows_prefers_bands_that_fit_and_whole_frames_for_tall_cells():
    # 160 x 96 tokens at sizes 1..32: 15360 tokens exceed the preferred 12288 slots -> bands of 32k rows
    sizes = [1, 2, 4, 8, 16, 32]
    rows = strip_rows(160, 96, sizes, shared_floats, 10**9)
    assert rows % 32 == 0 and rows < 160 and shared_floats(rows, 96, sizes) <= PREFERRED_SHARED_FLOATS
    assert shared_floats(rows + 32, 96, sizes) > PREFERRED_SHARED_FLOATS
    # a cell as tall as the frame: the whole frame, even beyond the preferred size
    assert strip_rows(160, 96, [1, 160], shared_floats, 10**9) == 160
    assert strip_rows(5, 7, [1, 2, 4], shared_floats, 10**9) == 5


def test_frames_beyond_the_shared_memory_limit_raise_naming_grids():
    with pytest.raises(ValueError, match=r"grids: a frame of 400 x 400 tokens with cell sizes "
                                         r"\[1, 400\] needs strips of 400 rows \(160005 fp32"):
        strip_rows(400, 400, [1, 400], shared_floats, 41_000)
    with pytest.raises(ValueError, match=r"at most 100 on this device"):
        plan_strips([[1, 4, 300]], [1, 2], shared_floats, 100)


@pytest.mark.skipif(EXT is None, reason="kawhi_kernels._C is not importable")
@pytest.mark.parametrize("rows,width,sizes", [(5, 7, [1, 2, 4]), (32, 96, [2, 3, 6]), (1, 1, [1]),
                                               (13, 17, [3, 5, 17]), (0, 4, [2])])
def test_shared_floats_of_the_extension_match_the_formula(rows, width, sizes):
    assert EXT.grid_pyramid_shared_floats(rows, width, sizes) == shared_floats(rows, width, sizes)


@pytest.mark.skipif(EXT is None, reason="kawhi_kernels._C is not importable")
def test_shared_floats_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"sizes: cell sizes must be >= 1, got 0"):
        EXT.grid_pyramid_shared_floats(4, 4, [1, 0])
    with pytest.raises(ValueError, match=r"rows/width: expected non-negative sizes"):
        EXT.grid_pyramid_shared_floats(-1, 4, [1])
    assert EXT.MAX_PYRAMID_LEVELS == 17


def test_wrapper_refuses_cpu_tensors():
    with pytest.raises(RuntimeError, match=r"grid_pyramid: the CUDA backend needs CUDA tensors"):
        grid_pyramid_cuda(torch.rand(2, 12), torch.tensor([[1, 3, 4]]), [1, 2])


def test_public_op_reports_why_cuda_backend_cannot_run_on_cpu():
    from kawhi_kernels import grid_pyramid

    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run grid_pyramid"):
        grid_pyramid(torch.rand(12), [[1, 3, 4]], 2, backend="cuda")


def test_auto_never_picks_cuda_for_grid_pyramid(monkeypatch):
    from kawhi_kernels import _backend
    from kawhi_kernels.ops.grid_pyramid import IMPLEMENTATIONS

    assert "cuda" in IMPLEMENTATIONS
    monkeypatch.setattr(_backend, "cuda_unavailable_reason", lambda device: None)
    monkeypatch.setattr(_backend, "triton_unavailable_reason", lambda device: None)
    cuda = torch.device("cuda", 0)
    assert _backend.resolve_backend("auto", cuda, "grid_pyramid", tuple(IMPLEMENTATIONS)) == "triton"
    assert _backend.resolve_backend("auto", cuda, "grid_pyramid", ("torch", "cuda")) == "torch"
    assert _backend.resolve_backend("cuda", cuda, "grid_pyramid", tuple(IMPLEMENTATIONS)) == "cuda"


# ----------------------------------------------------------------------------- on a GPU

TOL = dict(rtol=2e-6, atol=2e-5)


def _mass(seed, lead, n, dtype, offset=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.rand(*lead, n + offset, generator=g) * 4 - 1
    return full.to("cuda", dtype)[..., offset:]   # offset > 0: rows not 16-byte aligned


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grids", AWKWARD_GRIDS)
@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_gpu_grid_pyramid_matches_reference(dtype, grids, levels):
    n = sum(t * h * w for t, h, w in grids)
    for lead, offset in (((), 0), ((3,), 1), ((2, 3), 3)):
        mass = _mass(n + len(levels), lead, n, dtype, offset)
        sizes = _clamp_cells(levels, grids)
        want = grid_pyramid_reference(mass, torch.tensor(grids), sizes)
        got = grid_pyramid_cuda(mass, torch.tensor(grids), sizes)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == torch.float32 and a.shape == b.shape
            torch.testing.assert_close(a, b, **TOL)
        again = grid_pyramid_cuda(mass, torch.tensor(grids), sizes)
        assert all(torch.equal(a, b) for a, b in zip(got, again))    # deterministic


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_frames_in_strips_and_whole(dtype):
    # 160 x 96 at sizes 1..32 is cut into bands; [1, 160] needs the whole frame at once
    grids = [[1, 160, 96], [2, 37, 53]]
    n = sum(t * h * w for t, h, w in grids)
    mass = _mass(5, (2,), n, dtype)
    for levels in ([1, 2, 4, 8, 16, 32], [1, 160], [3, 7]):
        sizes = _clamp_cells(levels, grids)
        want = grid_pyramid_reference(mass, torch.tensor(grids), sizes)
        for a, b in zip(grid_pyramid_cuda(mass, torch.tensor(grids), sizes), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-3)


@gpu_test
def test_gpu_public_op_with_cuda_backend_and_fp64_fallback():
    from kawhi_kernels import grid_pyramid

    grids = [[1, 6, 10], [2, 4, 4]]
    mass = _mass(9, (4, 2), 92, torch.bfloat16)
    got = grid_pyramid(mass, grids, 3, backend="cuda")
    want = grid_pyramid(mass, grids, 3, backend="torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    m64 = mass.double()
    for a, b in zip(grid_pyramid(m64, grids, 3, backend="cuda"),
                    grid_pyramid(m64, grids, 3, backend="torch")):
        assert a.dtype == torch.float64 and torch.equal(a, b)


@gpu_test
def test_gpu_expanded_and_strided_mass():
    grids = torch.tensor([[1, 5, 6], [2, 3, 3]])
    row = _mass(3, (), 48, torch.bfloat16)
    for mass in (row.expand(4, 48), torch.rand(48, 6, device="cuda").t()):   # stride 0 / 1 x 6
        want = grid_pyramid_reference(mass, grids, [1, 2, 4])
        for a, b in zip(grid_pyramid_cuda(mass, grids, [1, 2, 4]), want):
            torch.testing.assert_close(a, b, **TOL)


@gpu_test
def test_gpu_frame_beyond_shared_memory_raises_naming_grids():
    mass = torch.zeros(1000 * 1000, device="cuda")
    with pytest.raises(ValueError, match=r"grids: a frame of 1000 x 1000 tokens"):
        grid_pyramid_cuda(mass, torch.tensor([[1, 1000, 1000]]), [1, 1000])


@gpu_test
def test_gpu_cuda_backend_under_torch_compile():
    from kawhi_kernels import grid_pyramid

    grids = [[1, 3, 5], [1, 2, 2]]
    mass = torch.rand(4, 19, device="cuda")
    compiled = torch.compile(lambda m: grid_pyramid(m, grids, levels=2, backend="cuda"),
                             fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(mass), grid_pyramid(mass, grids, levels=2, backend="torch")):
        torch.testing.assert_close(a, b, **TOL)
