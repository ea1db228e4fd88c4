"""Head-sharded reductions for KAWHI statistics under Ulysses sequence parallelism.

Inside a DeepSpeed-Ulysses attention (verl's ``ulysses_sequence_parallel_size > 1``) every rank of
the sequence-parallel group holds, after the all-to-all, the *whole* sequence for a contiguous
slice of the query heads: rank r of P owns global heads ``[r·H/P, (r+1)·H/P)``. KAWHI's alignment

    α_t = mean over h ∈ heads of  q̂_t^h · k̄^h

is then a mean over heads that are spread across ranks. Each rank computes the partial sum over
ITS heads and the number of those heads; one all-reduce (SUM) of both, then a division, gives
exactly the single-process mean over all heads — also when ranks hold different numbers of the
selected heads (a mean of per-rank means would be wrong then).
"""
from __future__ import annotations

import torch

from .._validation import FLOAT_DTYPES, check_positive_int, check_tensor

__all__ = ["allreduce_head_partial_sums", "group_rank_and_size", "local_head_range"]


def group_rank_and_size(group=None) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``; (0, 1) when torch.distributed is not
    initialised (single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("group: a process group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def local_head_range(num_heads: int, group=None) -> tuple[int, int]:
    """Global query-head indices ``[start, stop)`` held by this rank after a Ulysses all-to-all.

    Args:
        num_heads: total number of query heads H of the layer; must be divisible by the group size.
        group: the sequence-parallel process group (None: default group, or a single process).
    Returns:
        (start, stop) with stop − start = H / P, rank r getting ``[r·H/P, (r+1)·H/P)`` — the
        contiguous split of verl's ``gather_seq_scatter_heads``.
    """
    check_positive_int("num_heads", num_heads)
    rank, size = group_rank_and_size(group)
    if num_heads % size != 0:
        raise ValueError(f"num_heads: {num_heads} heads cannot be split evenly over a group of {size} ranks")
    per_rank = num_heads // size
    return rank * per_rank, (rank + 1) * per_rank


def allreduce_head_partial_sums(partial_sum: torch.Tensor, partial_count, group=None) -> torch.Tensor:
    """Mean over all heads from per-rank partial sums over local heads.

    Args:
        partial_sum: float tensor [N] (any shape) — on this rank, the sum over its local selected
            heads of the per-head statistic (e.g. q̂_t^h · k̄^h for each of N tokens). Every rank
            must pass the same shape, dtype and device (a CUDA device with NCCL, CPU with gloo).
        partial_count: number of local heads summed: an int, a 0-d tensor, or a tensor of
            ``partial_sum``'s shape (per-entry counts).
        group: process group to reduce over (the Ulysses sequence-parallel group); None uses the
            default group, or just divides locally when torch.distributed is not initialised.
    Returns:
        float32 (float64 for float64 input) tensor shaped like ``partial_sum``:
        Σ_ranks partial_sum / Σ_ranks partial_count, and 0 where the total count is 0.
    The inputs are not modified.
    """
    check_tensor("partial_sum", partial_sum, dtypes=FLOAT_DTYPES)
    cdtype = torch.float64 if partial_sum.dtype == torch.float64 else torch.float32
    device = partial_sum.device
    if isinstance(partial_count, torch.Tensor):
        if partial_count.dim() == 0:
            count = partial_count.to(device=device, dtype=cdtype).expand(partial_sum.shape)
        elif tuple(partial_count.shape) == tuple(partial_sum.shape):
            count = partial_count.to(device=device, dtype=cdtype)
        else:
            raise ValueError(f"partial_count: expected a scalar or shape {tuple(partial_sum.shape)} "
                             f"(as partial_sum), got {tuple(partial_count.shape)}")
    elif isinstance(partial_count, (int, float)) and not isinstance(partial_count, bool):
        count = torch.full(partial_sum.shape, float(partial_count), dtype=cdtype, device=device)
    else:
        raise TypeError(f"partial_count: expected an int or a tensor, got {type(partial_count).__name__}")
    if bool((count < 0).any()):
        raise ValueError("partial_count: head counts must be >= 0")

    # One collective for both: [sum..., count...].
    packed = torch.cat([partial_sum.detach().to(cdtype).reshape(-1), count.reshape(-1)])
    _, size = group_rank_and_size(group)
    if size > 1:
        import torch.distributed as dist

        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    n = partial_sum.numel()
    total_sum, total_count = packed[:n], packed[n:]
    mean = torch.where(total_count > 0, total_sum / total_count.clamp_min(1.0), torch.zeros_like(total_sum))
    return mean.view(partial_sum.shape)
