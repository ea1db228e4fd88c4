"""The planner's tables, shared by the fused backends (Triton and CUDA), pure torch.

One convention: every function takes the batch layout as host (CPU) tensors, which a plan
copies from the device once, and returns tables on the kernels' device (row blocks and
segment lists on the CPU, uploaded once by the plan). Nothing here reads device values.

* :func:`row_blocks` — the units of work of the fused kernels;
* :func:`segment_block_lists` — the fixed summation order of deterministic segment sums;
* :func:`key_tiles` — per key tile, the span of region ids it holds (tiles without a region
  key are skipped);
* :func:`head_groups` — selected query heads grouped by KV head (GQA stacking);
* :func:`block_key_tiles`, :func:`region_tile_ranges` — per row block, the key tiles a pass over
  all visible keys / over region keys loops over; :func:`key_tile_visits` counts the QKᵀ tiles.

A row block is a run of at most ``block_rows`` consecutive query rows that share one sequence
and, for segmented output, one segment: the unit of work of the fused ``attention_mass`` and
``cosine_alignment`` kernels. The segment block lists fix the summation order of the
deterministic segment reduction.
"""
from __future__ import annotations

import torch


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ max(n, 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` when its last dim has stride 1 (other strides are passed to kernels), else a copy."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def row_blocks(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, block_rows: int,
               query_segment: torch.Tensor | None = None) -> torch.Tensor:
    """Row-block table, int32 [num_blocks, 4] on the CPU: (sequence, first global row, row count,
    segment) in increasing row order.

    Args:
        cu_seqlens_q, cu_seqlens_k: int [B+1] cumulative lengths (any device).
        block_rows: most rows per block (>= 1).
        query_segment: optional int [total_q] segment of each row (-1: row ignored).

    Rows are cut into runs at every sequence start and, with ``query_segment``, wherever the
    segment changes; each run is chopped into blocks of ``block_rows`` rows (the last one
    shorter). Runs of segment -1 and runs of sequences without keys are left out (they add
    nothing). The segment column is 0 without ``query_segment``.
    """
    if block_rows < 1:
        raise ValueError(f"block_rows: expected a positive int, got {block_rows}")
    cu_q = cu_seqlens_q.detach().to("cpu", torch.int64)
    cu_k = cu_seqlens_k.detach().to("cpu", torch.int64)
    lens_q = cu_q[1:] - cu_q[:-1]
    lens_k = cu_k[1:] - cu_k[:-1]
    total_q = int(cu_q[-1])
    if total_q == 0:
        return torch.zeros(0, 4, dtype=torch.int32)
    seq = torch.repeat_interleave(torch.arange(lens_q.numel()), lens_q)
    if query_segment is None:
        seg = torch.zeros(total_q, dtype=torch.int64)
    else:
        seg = query_segment.detach().to("cpu", torch.int64)
    run_start = torch.ones(total_q, dtype=torch.bool)
    run_start[1:] = (seq[1:] != seq[:-1]) | (seg[1:] != seg[:-1])
    starts = run_start.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([total_q])])
    run_of_row = torch.cumsum(run_start.to(torch.int64), 0) - 1
    rows = torch.arange(total_q)
    offset = rows - starts[run_of_row]
    first = (offset % block_rows == 0) & (seg >= 0) & (lens_k[seq] > 0)
    block_first = rows[first]
    count = torch.clamp(ends[run_of_row[first]] - block_first, max=block_rows)
    table = torch.stack([seq[first], block_first, count, seg[first]], dim=1)
    return table.to(torch.int32)


def segment_block_lists(blocks: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR lists of the blocks of each segment, in increasing block order (the fixed summation
    order of the deterministic reduction).

    Args:
        blocks: the int32 [num_blocks, 4] table of :func:`row_blocks` (segments in [0, S)).
        num_segments: S.

    Returns:
        (start int32 [S + 1], order int32 [num_blocks]): the blocks of segment s are
        order[start[s]:start[s + 1]].
    """
    seg = blocks[:, 3].to(torch.int64)
    order = torch.sort(seg, stable=True).indices
    start = torch.zeros(num_segments + 1, dtype=torch.int64)
    start[1:] = torch.cumsum(torch.bincount(seg, minlength=num_segments), 0)
    return start.to(torch.int32), order.to(torch.int32)


def head_groups(heads: list[int], group_size: int, max_group: int, device) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Selected query heads grouped by KV head: (kv int32 [G], head int32 [G, GP], slot int32
    [G, GP], GP) with −1 padding; GP = next power of two of the largest group.

    A KV head with more than ``max_group`` selected heads is split into near-equal groups of at
    most ``max_group`` heads (each reads that KV head's K once), so the stacked tile of
    M = rows × GP never outgrows what the tile configuration was checked for.
    """
    groups = split_head_groups(heads_by_kv(heads, group_size), max_group)
    return head_group_tables(groups, next_pow2(max(len(m) for _, m in groups)), device)


HeadGroups = list[tuple[int, list[tuple[int, int]]]]   # (kv head, [(query head, slot), ...])


def heads_by_kv(heads: list[int], group_size: int) -> dict[int, list[tuple[int, int]]]:
    """The selected query heads (with their output slots) of each KV head."""
    by_kv: dict[int, list[tuple[int, int]]] = {}
    for slot, h in enumerate(heads):
        by_kv.setdefault(h // group_size, []).append((h, slot))
    return by_kv


def split_head_groups(by_kv: dict[int, list[tuple[int, int]]], cap: int) -> HeadGroups:
    """Each KV head's selected heads split into near-equal groups of at most ``cap`` heads."""
    groups: HeadGroups = []
    for kv in sorted(by_kv):
        members = by_kv[kv]
        parts = -(-len(members) // cap)
        size = -(-len(members) // parts)
        groups.extend((kv, members[i:i + size]) for i in range(0, len(members), size))
    return groups


def head_group_tables(groups: HeadGroups, gp: int, device) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(kv int32 [G], head int32 [G, gp], slot int32 [G, gp], gp) of ``groups``, −1 padded."""
    head_tab = torch.full((len(groups), gp), -1, dtype=torch.int32)
    slot_tab = torch.full((len(groups), gp), -1, dtype=torch.int32)
    for i, (_, members) in enumerate(groups):
        for j, (h, slot) in enumerate(members):
            head_tab[i, j], slot_tab[i, j] = h, slot
    kv_tab = torch.tensor([kv for kv, _ in groups], dtype=torch.int32)
    return kv_tab.to(device), head_tab.to(device), slot_tab.to(device), gp


def key_tiles(cu_seqlens_k_host: torch.Tensor, key_region: torch.Tensor, block_n: int):
    """Per-sequence key tiles of ``block_n`` keys and the region span of each tile.

    Args:
        cu_seqlens_k_host: int [B+1] cumulative key counts on the CPU (tile counts come from it,
            so nothing is copied back from the device).
        key_region: int [total_k] region ids on the kernels' device.
        block_n: keys per tile.

    Returns (tile_base int32 [B] — index of each sequence's first tile, tile_rmin int32 [T],
    tile_rmax int32 [T]) on key_region's device; tile_rmax = −1 marks a tile without any region
    key (skipped by the second pass), otherwise [tile_rmin, tile_rmax] bounds its region ids.
    """
    device = key_region.device
    cu_k = cu_seqlens_k_host.to("cpu", torch.int64)
    lens_k = cu_k[1:] - cu_k[:-1]
    tiles_per_seq = (lens_k + block_n - 1) // block_n
    tile_base_host = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
    num_tiles = int(tiles_per_seq.sum())
    total_k = key_region.numel()
    # Tile of every key, built on the host from the layout alone and uploaded once.
    seq_of_key = torch.repeat_interleave(torch.arange(lens_k.numel()), lens_k, output_size=total_k)
    pos = torch.arange(total_k) - cu_k[:-1][seq_of_key]
    tile_of_key = (tile_base_host[seq_of_key] + pos // block_n).to(device)
    region = key_region.to(torch.int64)
    has = region >= 0
    big = torch.iinfo(torch.int32).max
    # Keys without a region scatter into a spare slot (index num_tiles), dropped afterwards:
    # no boolean-mask indexing, so no data-dependent shape.
    slot = torch.where(has, tile_of_key, torch.full_like(tile_of_key, num_tiles))
    tile_rmin = torch.full((num_tiles + 1,), big, dtype=torch.int64, device=device)
    tile_rmax = torch.full((num_tiles + 1,), -1, dtype=torch.int64, device=device)
    tile_rmin.scatter_reduce_(0, slot, region, reduce="amin")
    tile_rmax.scatter_reduce_(0, slot, region, reduce="amax")
    tile_rmin, tile_rmax = tile_rmin[:num_tiles], tile_rmax[:num_tiles]
    tile_rmin = torch.where(tile_rmax >= 0, tile_rmin, torch.zeros_like(tile_rmin))
    return (tile_base_host.to(device=device, dtype=torch.int32), tile_rmin.to(torch.int32),
            tile_rmax.to(torch.int32))


def block_key_tiles(blocks: torch.Tensor, cu_seqlens_q_host: torch.Tensor,
                    cu_seqlens_k_host: torch.Tensor, block_n: int, causal: bool) -> torch.Tensor:
    """Key tiles each row block sees, int64 [num_blocks] on the CPU: ⌈n_end / block_n⌉ with
    n_end the block's key end (its last row's bottom-right causal limit, or all keys) — the trip
    count of a pass over all visible keys.

    Args:
        blocks: the :func:`row_blocks` table. cu_seqlens_q_host, cu_seqlens_k_host: int [B+1] on
            the CPU. block_n: keys per tile. causal: bottom-right aligned causal mask.
    """
    cu_q = cu_seqlens_q_host.to("cpu", torch.int64)
    cu_k = cu_seqlens_k_host.to("cpu", torch.int64)
    seq = blocks[:, 0].to(torch.int64)
    lk = cu_k[seq + 1] - cu_k[seq]
    if causal:
        lq = cu_q[seq + 1] - cu_q[seq]
        last_local = blocks[:, 1].to(torch.int64) + blocks[:, 2].to(torch.int64) - cu_q[seq]
        n_end = torch.clamp(torch.minimum(last_local + lk - lq, lk), min=0)
    else:
        n_end = lk
    return (n_end + block_n - 1) // block_n


def region_tile_ranges(blocks: torch.Tensor, block_tiles: torch.Tensor,
                       cu_seqlens_k_host: torch.Tensor, tile_rmax: torch.Tensor,
                       block_n: int) -> torch.Tensor:
    """Per row block, the key tiles [t0, t1) (within its sequence) that a pass over region keys
    visits: from the sequence's first to its last tile holding a region key, cut at the block's
    visible tiles; empty (0, 0) when none. int32 [num_blocks, 2] on ``tile_rmax``'s device, built
    there without a sync (the loop bounds of the kernels' region passes: data, not a branch).

    Args:
        blocks: :func:`row_blocks` table (CPU). block_tiles: :func:`block_key_tiles` (CPU).
        cu_seqlens_k_host: int [B+1] on the CPU. tile_rmax: from :func:`key_tiles` (−1: no region
            key in the tile). block_n: keys per tile, as given to :func:`key_tiles`.
    """
    device = tile_rmax.device
    cu_k = cu_seqlens_k_host.to("cpu", torch.int64)
    lens_k = cu_k[1:] - cu_k[:-1]
    tiles_per_seq = (lens_k + block_n - 1) // block_n
    num_seqs, num_tiles = lens_k.numel(), int(tiles_per_seq.sum())
    tile_seq = torch.repeat_interleave(torch.arange(num_seqs), tiles_per_seq, output_size=num_tiles)
    local = torch.arange(num_tiles) - (torch.cumsum(tiles_per_seq, 0) - tiles_per_seq)[tile_seq]
    tile_seq, local = tile_seq.to(device), local.to(device)
    has = tile_rmax.to(torch.int64) >= 0
    first = torch.full((num_seqs,), num_tiles, dtype=torch.int64, device=device)
    last = torch.full((num_seqs,), -1, dtype=torch.int64, device=device)
    first.scatter_reduce_(0, tile_seq, torch.where(has, local, num_tiles), reduce="amin")
    last.scatter_reduce_(0, tile_seq, torch.where(has, local, -1), reduce="amax")
    seq = blocks[:, 0].to(device=device, dtype=torch.int64)
    t1 = torch.minimum(last[seq] + 1, block_tiles.to(device))
    t0 = torch.minimum(first[seq], t1)
    empty = t1 <= t0
    return torch.stack([torch.where(empty, 0, t0), torch.where(empty, 0, t1)], 1).to(torch.int32)


def key_tile_visits(block_tiles: torch.Tensor, region_ranges: torch.Tensor, num_groups: int, *,
                    normaliser_pass: bool, region_pass: bool) -> int:
    """QKᵀ tiles (one [M, block_n] score tile each) a launch visits over all its programs: per
    block × head group, the full pass over visible keys (``normaliser_pass``: pass 1, or the
    single pass) plus the region pass over ``region_ranges`` (``region_pass``). Host count from
    the same tables the kernels loop over (one device→host copy of the ranges)."""
    per_block = torch.zeros_like(block_tiles)
    if normaliser_pass:
        per_block += block_tiles
    if region_pass:
        ranges = region_ranges.to("cpu", torch.int64)
        per_block += ranges[:, 1] - ranges[:, 0]
    return int(per_block.sum()) * num_groups
