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


def test_headline_shape_tile_counts_one_pass_visits_fewer_than_two_passes():
    plan, (batch, keys, rows, prefix, image) = _headline_plan()
    block_rows, block_n = plan.constexprs["BLOCK_ROWS"], plan.constexprs["BLOCK_N"]
    groups = plan.kv_tab.numel()
    assert (block_rows, block_n, groups) == (8, 64, 2)          # GP 8 (3 and 6 heads), M = 64
    # Independent model: block i of a sequence ends at row rows - keys.. (bottom-right causal);
    # its visible key tiles are ⌈(keys - rows + 8 (i + 1)) / 64⌉, its region tiles the image's.
    per_seq_blocks = rows // block_rows
    visible = sum(-(-(keys - rows + block_rows * (i + 1)) // block_n) for i in range(per_seq_blocks))
    image_tiles = -(-(prefix + image) // block_n) - prefix // block_n
    programs = batch * per_seq_blocks * groups
    one_pass = batch * visible * groups
    with_lse = programs * image_tiles
    two_pass = one_pass + with_lse
    tables = (plan.block_key_tiles, plan.region_tiles, groups)
    assert key_tile_visits(*tables, normaliser_pass=True, region_pass=True) == two_pass
    assert key_tile_visits(*tables, normaliser_pass=True, region_pass=False) == one_pass
    assert key_tile_visits(*tables, normaliser_pass=False, region_pass=True) == with_lse
    # What the runs do: single pass without lse, the region pass alone with lse.
    assert plan.key_tile_visits(has_lse=False) == one_pass
    assert plan.key_tile_visits(has_lse=True) == with_lse
    assert one_pass < two_pass and with_lse < one_pass
    # 48.5 vs 65.5 tiles per program (17 image tiles; 17 with lse).
    assert one_pass / programs == 48.5 and image_tiles == 17
    # Per-patch regions cannot take the single pass: lse-free they visit both passes.
    patch, _ = _headline_plan(num_regions=1024)
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
