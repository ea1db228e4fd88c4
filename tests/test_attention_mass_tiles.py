"""The planner's loop tables of the Triton ``attention_mass`` and the QKᵀ tile counts they imply
(DESIGN §7 headline shape): pure host, nothing launched."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported anywhere below

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from triton_helpers import coarse_regions, cu_seqlens, fresh_seed, patch_regions, run_segments  # noqa: E402

from kawhi_kernels._fused_host import (  # noqa: E402
    block_key_tiles,
    key_tile_visits,
    key_tiles,
    region_tile_ranges,
    row_blocks,
)
from kawhi_kernels.triton import attention_mass as am  # noqa: E402

# DESIGN §7: Qwen2.5-VL-7B (Hq 28, Hk 4, D 128), 8 sequences of 4096 tokens, an image of 1024
# tokens after 16 text tokens, the last 2048 tokens are the response rows; the KAWHI heads.
HEADLINE_HEADS = [0, 1, 3, 22, 23, 24, 25, 26, 27]


def _headline_plan(num_regions=16):
    batch, keys, rows, prefix, image = 8, 4096, 2048, 16, 1024
    cu_k = cu_seqlens([keys] * batch, "cpu").long()
    cu_q = cu_seqlens([rows] * batch, "cpu").long()
    region = torch.full((batch * keys,), -1, dtype=torch.int32)
    for b in range(batch):
        ids = torch.arange(image, dtype=torch.int32) * num_regions // image
        region[b * keys + prefix:b * keys + prefix + image] = ids
    # fp16 tiles = the compiled bf16 tiles (the interpreter plans bf16 as fp32).
    plan = am.plan_attention_mass_triton(cu_q, cu_k, region, num_regions, dtype=torch.float16,
                                         num_heads=28, num_kv_heads=4, head_dim=128,
                                         heads=HEADLINE_HEADS)
    return plan, (batch, keys, rows, prefix, image)


def _visible_tiles(keys, rows, block_rows, block_n):
    """Independent model of one causal sequence: per row block (the last one shorter), its
    visible key tiles and its interior tiles (seen in full by its first row)."""
    out = []
    for row0 in range(0, rows, block_rows):
        nrows = min(block_rows, rows - row0)
        out.append((-(-(keys - rows + row0 + nrows) // block_n), (keys - rows + row0 + 1) // block_n))
    return out


def test_headline_shape_tile_counts_one_pass_visits_fewer_than_two_passes():
    plan, (batch, keys, rows, prefix, image) = _headline_plan()
    block_rows, block_n = plan.constexprs["BLOCK_ROWS"], plan.constexprs["BLOCK_N"]
    groups = plan.kv_tab.numel()
    # Packed without power-of-two padding: 3 groups of 3 heads ({0,1,3}, {22,23,24},
    # {25,26,27}) × 21 rows = 63 of M = 64 stacked rows.
    assert (block_rows, block_n, groups, plan.constexprs["GP"]) == (21, 64, 3, 3)
    assert plan.constexprs["BLOCK_M"] == 64
    per_seq = _visible_tiles(keys, rows, block_rows, block_n)
    visible = sum(v for v, _ in per_seq)
    image_tiles = -(-(prefix + image) // block_n) - prefix // block_n
    programs = batch * len(per_seq) * groups
    one_pass = batch * visible * groups
    with_lse = programs * image_tiles
    two_pass = one_pass + with_lse
    tables = (plan.block_key_tiles, plan.region_tiles, groups)
    assert key_tile_visits(*tables, normaliser_pass=True, region_pass=True) == two_pass
    assert key_tile_visits(*tables, normaliser_pass=True, region_pass=False) == one_pass
    assert key_tile_visits(*tables, normaliser_pass=False, region_pass=True) == with_lse
    # What the runs do: single pass without lse; with lse the region pass alone, pipelined at
    # 32 keys per tile (its table entry): 33 tiles of 32 over the image's keys 16..1039.
    assert plan.key_tile_visits(has_lse=False) == one_pass
    lse_n = plan.tables[True].block_n
    lse_tiles = -(-(prefix + image) // lse_n) - prefix // lse_n
    assert (lse_n, lse_tiles) == (32, 33)
    assert plan.key_tile_visits(has_lse=True) == programs * lse_tiles
    assert plan.score_columns(True) == programs * lse_tiles * lse_n
    assert plan.score_columns(False) == one_pass * block_n
    assert one_pass < two_pass and with_lse < one_pass
    assert plan.score_columns(True) < plan.score_columns(False)
    assert image_tiles == 17 and len(per_seq) == 98
    # Interior (unmasked) tiles: all but the diagonal and partial tiles of each block.
    interior = sum(i for _, i in per_seq) * batch * groups
    assert int(plan.interior_tiles.sum()) * groups == interior
    masked = one_pass - interior
    assert masked <= programs * 2                    # ≤ 2 masked tiles per program (21 rows)
    # The power-of-two padding it replaces: 2 groups of 8 stacked heads × 8 rows.
    padded = batch * 2 * sum(v for v, _ in _visible_tiles(keys, rows, 8, block_n))
    assert padded == 198656 and one_pass < 0.75 * padded
    # Per-patch regions cannot take the single pass: lse-free they visit both passes.
    patch, _ = _headline_plan(num_regions=1024)
    assert patch.tables[False] is patch.tables[True]         # same BLOCK_N: tables shared
    assert patch.key_tile_visits(has_lse=False) == two_pass
    assert patch.key_tile_visits(has_lse=True) == with_lse


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("regions", ["coarse", "patch"])
def test_region_ranges_cover_every_visible_region_tile(causal, regions):
    """For every row block: [t0, t1) contains each key tile that holds a region key visible to
    one of its rows, and lies within the block's visible tiles; blocks without one are empty (or
    hold only the partial last tile)."""
    seed = fresh_seed()
    lens_q, lens_k = [5, 0, 37, 12, 9, 20], [9, 4, 30, 0, 40, 70]
    block_n, block_rows = 16, 4
    cu_q, cu_k = cu_seqlens(lens_q, "cpu").long(), cu_seqlens(lens_k, "cpu").long()
    make = coarse_regions if regions == "coarse" else patch_regions
    region = make(seed, lens_k, 7 if regions == "coarse" else 50, device="cpu")
    region[cu_k[5]:cu_k[5] + 48] = -1                        # first tiles of seq 5: text only
    blocks = row_blocks(cu_q, cu_k, block_rows, run_segments(seed, lens_q, 3, device="cpu"))
    ends = block_key_tiles(blocks, cu_q, cu_k, block_n, causal)
    _, _, tile_rmax = key_tiles(cu_k, region, block_n)
    ranges = region_tile_ranges(blocks, ends, cu_k, tile_rmax, block_n)
    for (seq, row0, nrows, _), end, (t0, t1) in zip(blocks.tolist(), ends.tolist(), ranges.tolist()):
        lq, lk = lens_q[seq], lens_k[seq]
        n_end = min(row0 - int(cu_q[seq]) + nrows + lk - lq, lk) if causal else lk
        assert end == -(-max(n_end, 0) // block_n)
        keys = region[cu_k[seq]:cu_k[seq] + max(n_end, 0)]
        needed = {int(i) // block_n for i in (keys >= 0).nonzero().flatten()}
        if needed:
            assert t0 <= min(needed) and max(needed) < t1 <= end, (seq, row0, t0, t1, needed)
        else:               # at most the block's partial last tile, whose region keys it cannot see
            assert (t0, t1) == (0, 0) or (t1 == end and t1 - t0 == 1), (seq, row0, t0, t1)


@pytest.mark.parametrize("causal", [True, False])
def test_interior_tiles_are_the_longest_prefix_every_real_row_sees_in_full(causal):
    """interior_key_tiles: every key of tiles [0, ti) is visible to every row of the block and
    lies inside the sequence, and tile ti is not (maximal); the loop table splits the region
    range at ti."""
    seed = fresh_seed()
    lens_q, lens_k = [5, 0, 37, 12, 9, 20, 3], [9, 4, 30, 0, 40, 70, 3]
    block_n, block_rows = 16, 4
    cu_q, cu_k = cu_seqlens(lens_q, "cpu").long(), cu_seqlens(lens_k, "cpu").long()
    region = coarse_regions(seed, lens_k, 5, device="cpu")
    blocks = row_blocks(cu_q, cu_k, block_rows)
    ends = block_key_tiles(blocks, cu_q, cu_k, block_n, causal)
    _, _, tile_rmax = key_tiles(cu_k, region, block_n)
    ranges = region_tile_ranges(blocks, ends, cu_k, tile_rmax, block_n)
    interior = am.interior_key_tiles(blocks, cu_q, cu_k, block_n, causal)
    table = am.loop_tiles_table(interior, ranges)
    assert (interior > 0).any() and (interior < ends).any()
    for (seq, row0, nrows, _), ti, end, (t0, t1), row in zip(
            blocks.tolist(), interior.tolist(), ends.tolist(), ranges.tolist(), table.tolist()):
        lq, lk = lens_q[seq], lens_k[seq]
        limits = [min(row0 - int(cu_q[seq]) + i + 1 + lk - lq, lk) if causal else lk
                  for i in range(nrows)]

        def full(t):
            return all((t + 1) * block_n <= lim for lim in limits)
        assert all(full(t) for t in range(ti)) and not full(ti) and ti <= end
        assert row == [ti, t0, min(max(ti, t0), t1), t1]


@pytest.mark.parametrize("heads,group_size,stacked,cap,want_gp,want_groups", [
    (HEADLINE_HEADS, 7, 64, 64, 3, 3),          # KAWHI: 63 of 64 rows instead of 9 of 16
    (list(range(28)), 7, 64, 64, 7, 4),         # all heads: 9 rows × 7 = 63 of 64
    (list(range(8)), 4, 64, 64, 4, 2),          # power of two: unchanged
    (list(range(28)), 7, 16, 16, 1, 28),        # fp32 tiles: 16 rows × 1 head beats 2 × 7
    (list(range(28)), 7, 64, 2, 1, 28),         # capped at 2: 1 × 64 beats 2 × 32 (16 groups)
    ([0, 1, 7, 8], 7, 64, 2, 2, 2),             # capped at 2: {0, 1} {7, 8}, 32 rows each
])
def test_head_packing_wastes_fewer_stacked_rows_than_power_of_two_padding(
        heads, group_size, stacked, cap, want_gp, want_groups):
    kv, head, slot, gp = am.pack_head_groups(heads, group_size, stacked, cap, "cpu")
    assert (gp, kv.numel()) == (want_gp, want_groups) and head.shape == (want_groups, gp)
    real = head[head >= 0]
    assert sorted(real.tolist()) == sorted(heads)                 # every head exactly once
    assert all(int(kv[i]) == int(h) // group_size for i, row in enumerate(head.tolist())
               for h in row if h >= 0)
    assert sorted(slot[slot >= 0].tolist()) == list(range(len(heads)))
    assert gp <= cap
    # Real stacked rows per computed stacked row, vs padding each KV group to a power of two.
    rows = stacked // gp
    used = real.numel() * rows / (kv.numel() * stacked)
    by_kv = {}
    for h in heads:
        by_kv[h // group_size] = by_kv.get(h // group_size, 0) + 1
    pow2 = 1 << (max(min(n, cap) for n in by_kv.values()) - 1).bit_length()
    padded_groups = sum(-(-n // min(cap, pow2)) for n in by_kv.values())
    used_pow2 = len(heads) * (stacked // pow2) / (padded_groups * stacked)
    assert used >= used_pow2
