"""NumPy emulation of the tensor-core attention_mass kernel's register-level data movement
(csrc/attention_mass_mma.cu), no GPU needed.

The fragment layouts of ``mma.sync.aligned.m16n8k16`` (f16/bf16 inputs, f32 accumulators) are
written out below from the PTX ISA tables, independently of csrc/mma_layout.h; an emulated
mma.sync gathers the operand matrices from per-lane registers with them, multiplies, and
scatters the result back. The kernel's own index functions (``_C.mma_layout``: the P -> A
repacking, the one-hot B operand, the accumulator coordinates, the scatter columns) then drive
the emulation, so a wrong index in any of them gives a wrong product here.
"""
from __future__ import annotations

import numpy as np
import pytest

from kawhi_kernels._extension import load_extension

EXT = load_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="kawhi_kernels._C is not importable")
L = EXT.mma_layout if EXT is not None else None
LANES = range(32)


# ----------------------------------------------------------------- PTX ISA fragment layouts
# groupID = lane >> 2, threadID_in_group = lane % 4; element i of a lane's fragment.

def ptx_a(lane: int, i: int) -> tuple[int, int]:
    """A (16 x 16, .f16/.bf16): 8 elements a0..a7 in 4 registers (2 per register)."""
    g, t = lane >> 2, lane % 4
    row = g if i in (0, 1, 4, 5) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def ptx_b(lane: int, i: int) -> tuple[int, int]:
    """B (16 x 8): 4 elements b0..b3 in 2 registers; (k row, n col)."""
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def ptx_c(lane: int, i: int) -> tuple[int, int]:
    """C/D (16 x 8, .f32): 4 elements c0..c3."""
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def emulate_mma(a_regs, b_regs, c_regs):
    """mma.sync m16n8k16 on per-lane fragments: a_regs [32][8], b_regs [32][4] (fp16 values as
    float64), c_regs [32][4] float; returns d_regs [32][4] (exact products, float64 sums)."""
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    C = np.full((16, 8), np.nan)
    for lane in LANES:
        for i in range(8):
            A[ptx_a(lane, i)] = a_regs[lane][i]
        for i in range(4):
            B[ptx_b(lane, i)] = b_regs[lane][i]
            C[ptx_c(lane, i)] = c_regs[lane][i]
    assert not (np.isnan(A).any() or np.isnan(B).any() or np.isnan(C).any())
    D = A @ B + C
    return [[D[ptx_c(lane, i)] for i in range(4)] for lane in LANES]


# ----------------------------------------------------------------- the kernel's pieces, emulated

def scores_to_acc(S: np.ndarray):
    """A warp's 16 x 64 tile in the first MMA's accumulators: acc[lane][n-tile][element]."""
    return [[[S[ptx_c(lane, i)[0], nt * 8 + ptx_c(lane, i)[1]] for i in range(4)]
             for nt in range(8)] for lane in LANES]


def split_hi_lo(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's split (mass_mma): hi = fp16(x), lo = fp16(x - float(hi)), round to nearest."""
    x = np.asarray(x, dtype=np.float32)
    hi = x.astype(np.float16)
    lo = (x - hi.astype(np.float32)).astype(np.float16)
    return hi, lo


def repack_a(acc, kc: int, part: int):
    """A fragments of k-chunk kc of P from the accumulators via _C.mma_layout.p_a_source;
    part 0: hi, 1: lo. Register r holds elements 2r (low half) and 2r + 1."""
    regs = []
    for lane in LANES:
        vals = []
        for r in range(4):
            nt, e = L.p_a_source(kc, r)
            pair = np.array([acc[lane][nt][e], acc[lane][nt][e + 1]], dtype=np.float32)
            vals.extend(split_hi_lo(pair)[part].astype(np.float64))
        regs.append(vals)
    return regs


def one_hot_b(columns, kc: int, rt: int):
    """B fragments (one-hot) of k-chunk kc, region n-tile rt, as the kernel builds them."""
    regs = []
    for lane in LANES:
        n = L.one_hot_col(lane, rt)
        regs.append([1.0 if columns[L.one_hot_key(lane, kc, r, h)] == n else 0.0
                     for r in range(2) for h in range(2)])
    return regs


def mass_mma(acc, columns, ntiles: int):
    """The kernel's second MMA over one tile: mass[lane][rt][i]."""
    mass = [[[0.0] * 4 for _ in range(8)] for _ in LANES]
    for kc in range(4):
        for rt in range(ntiles):
            b = one_hot_b(columns, kc, rt)
            for part in (0, 1):
                c = [mass[lane][rt] for lane in LANES]
                d = emulate_mma(repack_a(acc, kc, part), b, c)
                for lane in LANES:
                    mass[lane][rt] = d[lane]
    return mass


def mass_matrix(mass, ntiles: int) -> np.ndarray:
    """Gather mass[lane][rt][i] into 16 x (8 ntiles) with the kernel's c_coord."""
    out = np.full((16, 8 * ntiles), np.nan)
    for lane in LANES:
        for rt in range(ntiles):
            for i in range(4):
                row, col = L.c_coord(lane, i)
                out[row, rt * 8 + col] = mass[lane][rt][i]
    return out


def probabilities(rng, rows=16, keys=64):
    p = rng.random((rows, keys)) ** 4             # many small values, a few near 1
    p[rng.random((rows, keys)) < 0.2] = 0.0       # invisible keys
    p[0, :5] = [1.0, 2.0 ** -20, 2.0 ** -39, 0.5 + 2.0 ** -23, 1.0 - 2.0 ** -24]
    return p.astype(np.float32)


# ----------------------------------------------------------------- tests

def test_the_kernels_layout_functions_are_the_ptx_layouts():
    for lane in LANES:
        for i in range(4):
            assert L.c_coord(lane, i) == ptx_c(lane, i)
        for r in range(4):
            for h in range(2):
                assert L.a_coord(lane, r, h) == ptx_a(lane, 2 * r + h)
        for r in range(2):
            for h in range(2):
                assert L.b_coord(lane, r, h) == ptx_b(lane, 2 * r + h)


def test_emulated_mma_multiplies():
    rng = np.random.default_rng(0)
    A, B, C = rng.standard_normal((16, 16)), rng.standard_normal((16, 8)), rng.standard_normal((16, 8))
    a = [[A[ptx_a(lane, i)] for i in range(8)] for lane in LANES]
    b = [[B[ptx_b(lane, i)] for i in range(4)] for lane in LANES]
    c = [[C[ptx_c(lane, i)] for i in range(4)] for lane in LANES]
    d = emulate_mma(a, b, c)
    D = np.array([[0.0] * 8 for _ in range(16)])
    for lane in LANES:
        for i in range(4):
            D[ptx_c(lane, i)] = d[lane][i]
    np.testing.assert_allclose(D, A @ B + C, rtol=1e-12)


def test_p_accumulators_repack_into_the_a_operand():
    """The scores' C fragments, reread with p_a_source, are the A fragments of P: every
    element of k-chunk kc sits where the A layout expects key 16 kc + col of that row."""
    S = np.arange(16 * 64, dtype=np.float64).reshape(16, 64)
    acc = scores_to_acc(S)
    for kc in range(4):
        for lane in LANES:
            for r in range(4):
                nt, e = L.p_a_source(kc, r)
                for h in range(2):
                    row, col = ptx_a(lane, 2 * r + h)
                    assert acc[lane][nt][e + h] == S[row, 16 * kc + col], (kc, lane, r, h)


@pytest.mark.parametrize("num_regions", [1, 5, 8, 37, 64])
def test_coarse_mass_mma_is_p_times_the_region_one_hot(num_regions):
    rng = np.random.default_rng(num_regions)
    P = probabilities(rng) * np.float32(L.MASS_SCALE)
    region = rng.integers(-1, num_regions, 64)          # -1: no region (text key)
    acc = scores_to_acc(P.astype(np.float64))
    ntiles = L.region_ntiles(num_regions)
    assert ntiles * 8 >= num_regions > (ntiles - 1) * 8
    got = mass_matrix(mass_mma(acc, region.tolist(), ntiles), ntiles)[:, :num_regions]
    onehot = (region[:, None] == np.arange(num_regions)[None, :]).astype(np.float64)
    want = P.astype(np.float64) @ onehot
    # per key: 2^-22 relative, plus half an fp16 subnormal step (2^-25) of the lo part, in
    # units of P * MASS_SCALE (2^-40 in probability units)
    np.testing.assert_allclose(got, want, rtol=2.0 ** -21, atol=64 * 2.0 ** -25)
    assert not got[:, num_regions:].any() if got.shape[1] > num_regions else True


def test_a_wrong_one_hot_key_changes_the_result():
    """Negative control: the emulation notices a B fragment built for the wrong keys."""
    rng = np.random.default_rng(5)
    P = probabilities(rng) * np.float32(L.MASS_SCALE)
    region = rng.integers(0, 16, 64)
    acc = scores_to_acc(P.astype(np.float64))
    right = mass_matrix(mass_mma(acc, region.tolist(), 2), 2)
    shifted = np.roll(region, 1).tolist()               # columns of the neighbouring key
    wrong = mass_matrix(mass_mma(acc, shifted, 2), 2)
    assert np.abs(right - wrong).max() > 1.0


def test_hi_lo_split_is_exact_to_about_22_bits():
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.random(20000, dtype=np.float32) ** 8,
                        np.float32([1.0, 0.0, 2.0 ** -39, 2.0 ** -30, 0.999999, 1e-12])])
    x = p * np.float32(L.MASS_SCALE)
    assert float(np.float16(np.float32(L.MASS_SCALE))) == L.MASS_SCALE   # p = 1 fits fp16
    hi, lo = split_hi_lo(x)
    assert np.isfinite(hi).all() and np.isfinite(lo).all()
    err = np.abs(hi.astype(np.float64) + lo.astype(np.float64) - x.astype(np.float64))
    # relative 2^-22 for normal hi, plus half an fp16 subnormal step (2^-25) in absolute terms
    assert (err <= x.astype(np.float64) * 2.0 ** -22 + 2.0 ** -25).all()
    # the hi part alone would not do (negative control of the bound)
    hi_err = np.abs(hi.astype(np.float64) - x.astype(np.float64))
    assert (hi_err > x.astype(np.float64) * 2.0 ** -14).any()


def test_column_sums_of_the_accumulator_over_the_warp_rows():
    """warp_column_sums: rows g and g + 8 in each lane, then xor shuffles 4, 8, 16 over g;
    lanes 0..3 write columns c_coord(lane, e).col + 8 rt."""
    rng = np.random.default_rng(2)
    M = rng.standard_normal((16, 64))
    mass = [[[M[L.c_coord(lane, i)[0], rt * 8 + L.c_coord(lane, i)[1]] for i in range(4)]
             for rt in range(8)] for lane in LANES]
    colsum = np.full(64, np.nan)
    for rt in range(8):
        for e in range(2):
            v = [mass[lane][rt][e] + mass[lane][rt][2 + e] for lane in LANES]
            for mask in (4, 8, 16):
                v = [v[lane] + v[lane ^ mask] for lane in LANES]
            for lane in range(4):
                colsum[L.c_coord(lane, e)[1] + rt * 8] = v[lane]
    np.testing.assert_allclose(colsum, M.sum(0), rtol=1e-12)


def emulate_scatter_columns(tile_region):
    """The kernel's scatter_column over warps 0 and 1 (match_any within a warp, then warp 1
    scans warp 0's ids by shuffles)."""
    cols = []
    for key in range(64):
        rg = tile_region[key]
        base = (key // 32) * 32
        same = [j for j in range(32) if tile_region[base + j] == rg]
        first = base + same[0]                                   # __ffs(__match_any_sync) - 1
        if key >= 32:
            for j in range(32):
                if tile_region[j] == rg and first >= 32:
                    first = j
        cols.append(-1 if rg < 0 else first)
    return cols


@pytest.mark.parametrize("kind", ["runs", "random", "patches", "text"])
def test_scatter_columns_give_every_region_of_a_tile_one_column(kind):
    # a fixed seed per case (str hash() is salted per process, which made this test flaky)
    rng = np.random.default_rng(["runs", "random", "patches", "text"].index(kind))
    if kind == "runs":
        region = np.repeat(rng.integers(0, 500, 12), 6)[:64]
    elif kind == "random":
        region = rng.integers(-1, 20, 64)
    elif kind == "patches":
        region = np.arange(100, 164)
    else:
        region = np.full(64, -1)
    region = region.astype(np.int32)
    region[rng.random(64) < 0.1] = -1
    tile = region.tolist()
    cols = [L.scatter_column(tile, key) for key in range(64)]
    assert cols == emulate_scatter_columns(tile)
    owners = {}
    for key, c in enumerate(cols):
        if tile[key] < 0:
            assert c == -1
            continue
        assert 0 <= c <= key and tile[c] == tile[key] and cols[c] == c
        owners.setdefault(tile[key], set()).add(c)
    assert all(len(v) == 1 for v in owners.values())          # one column per region
    # the scatter flush writes column c (cols[c] == c) to region tile[c]: per tile, every
    # (row, region) element has one writing lane
    P = probabilities(rng)
    acc = scores_to_acc(P.astype(np.float64) * L.MASS_SCALE)
    mass = mass_mma(acc, cols, 8)
    out = np.zeros((16, 1000))
    writers = {}
    for lane in LANES:
        for rt in range(8):
            for i in range(4):
                row, c8 = L.c_coord(lane, i)
                c = rt * 8 + c8
                if cols[c] == c:
                    assert (row, tile[c]) not in writers
                    writers[(row, tile[c])] = lane
                    out[row, tile[c]] += mass[lane][rt][i] / L.MASS_SCALE
    want = np.zeros((16, 1000))
    for key in range(64):
        if tile[key] >= 0:
            want[:, tile[key]] += P[:, key]
    # atol: below fp16's normal range the lo half rounds to a subnormal step of 2^-24, i.e.
    # 2^-39 after removing MASS_SCALE (2^15); half a step per key, 64 keys of a tile at most
    assert L.MASS_SCALE == 2.0 ** 15
    np.testing.assert_allclose(out, want, rtol=2.0 ** -20, atol=64 * 2.0 ** -40)


def test_scatter_column_host_rejects_keys_outside_the_tile():
    with pytest.raises(ValueError, match="key"):
        L.scatter_column([1, 2], 2)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("tiles", [[0], [0, 1, 2, 3, 4, 5], [1, 4, 5, 9], [], [3], [2, 7]])
def test_ring_schedule_reads_each_tile_from_its_stage_after_it_landed(stages, tiles):
    """for_each_tile step by step (prologue of stages - 1 commit groups; per tile:
    wait_group(stages - 2), barrier, refill of the stage read in the previous step, commit,
    body): every tile is read from the stage it was issued to, after its group completed, and
    a refill never overwrites a tile that is in flight or not yet read."""
    seq = iter(tiles)
    nxt = lambda: next(seq, None)  # noqa: E731
    groups, holds, consumed = [], {}, set()
    issue_t = nxt()
    for s in range(stages - 1):
        group = []
        if issue_t is not None:
            group.append((issue_t, s))
            holds[s] = issue_t
            issue_t = nxt()
        groups.append(group)
    stage = 0
    for t in tiles:
        complete = len(groups) - (stages - 2)      # at most stages - 2 groups still pending
        assert (t, stage) in {x for g in groups[:complete] for x in g}
        assert holds[stage] == t
        refill = stage - 1 if stage else stages - 1
        group = []
        if issue_t is not None:
            assert refill != stage and (refill not in holds or holds[refill] in consumed)
            group.append((issue_t, refill))
            holds[refill] = issue_t
            issue_t = nxt()
        groups.append(group)
        consumed.add(t)                            # the body reads the stage
        stage = (stage + 1) % stages
    assert issue_t is None and consumed == set(tiles)


@pytest.mark.parametrize("num_regions,tile", [(7, 0), (7, 2), (300, 1)])
def test_one_warp_tile_of_pass_two_gives_the_reference_mass(num_regions, tile):
    """Pass 2 of one warp on key tile `tile`, as the kernel does it: p = min(2^(s log2e - lse2),
    1) for keys below each row's causal limit (key index t * 64 + 8 nt + c_coord col), scaled,
    the second MMA against region columns (coarse) or first-key columns (scatter), then the
    per-row flush and the column sums; against a direct NumPy evaluation."""
    rng = np.random.default_rng(num_regions + tile)
    lq, lk = 40, 200
    first_local = 17                                   # the warp's rows 17..32 of the sequence
    S = rng.standard_normal((16, lk)) * 2.0            # scaled scores, natural log units
    limits = [L.visible_keys(first_local + r, lq, lk, True) for r in range(16)]
    lse = np.array([np.log(np.exp(S[r, :limits[r]]).sum()) for r in range(16)])
    region = rng.integers(-1, num_regions if num_regions <= 64 else 40, lk).astype(np.int32)
    if num_regions > 64:
        region[region >= 0] += 250                     # ids near the top of R
    keys = slice(tile * 64, tile * 64 + 64)
    tile_region = region[keys]
    coarse = num_regions <= L.COARSE_MAX_REGIONS
    cols = (tile_region.tolist() if coarse else
            [L.scatter_column(tile_region.tolist(), key) for key in range(64)])
    log2e = 1.4426950408889634
    acc = scores_to_acc(S[:, keys])                    # q.k x softmax_scale; x log2e below
    for lane in LANES:
        for nt in range(8):
            for i in range(4):
                row, c = L.c_coord(lane, i)
                key = tile * 64 + nt * 8 + c
                s2 = np.float32(acc[lane][nt][i]) * np.float32(log2e)
                p = min(2.0 ** (s2 - lse[row] * log2e), 1.0) if key < limits[row] else 0.0
                acc[lane][nt][i] = np.float32(p) * np.float32(L.MASS_SCALE)
    ntiles = L.region_ntiles(num_regions) if coarse else 8
    mass = mass_mma(acc, cols, ntiles)
    out = np.zeros((16, num_regions))
    for lane in LANES:
        for rt in range(ntiles):
            for i in range(4):
                row, c8 = L.c_coord(lane, i)
                c = rt * 8 + c8
                if coarse and c < num_regions:
                    out[row, c] = mass[lane][rt][i] / L.MASS_SCALE
                elif not coarse and cols[c] == c:
                    out[row, tile_region[c]] += mass[lane][rt][i] / L.MASS_SCALE
    want = np.zeros((16, num_regions))
    for r in range(16):
        for j in range(tile * 64, min(tile * 64 + 64, limits[r])):
            if region[j] >= 0:
                want[r, region[j]] += min(np.exp(S[r, j] - lse[r]), 1.0)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-9)
    assert want.sum() > 0.05
