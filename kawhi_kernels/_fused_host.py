"""Host-side preparation shared by the fused backends (Triton and CUDA), pure torch.

A row block is a run of at most ``block_rows`` consecutive query rows that share one sequence
and, for segmented output, one segment: the unit of work of the fused ``attention_mass`` and
``cosine_alignment`` kernels. The segment block lists fix the summation order of the
deterministic segment reduction.
"""
from __future__ import annotations

import torch


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
