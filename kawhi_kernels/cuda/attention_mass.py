"""CUDA ``attention_mass`` (hand-written kernels in csrc/attention_mass*.cu), thin wrapper.

Builds the row-block table on the host, hands raw pointers, sizes, strides, the dtype code and
torch's current stream to ``kawhi_kernels._C.attention_mass`` and returns the fp32 output.

Two kernels, chosen here (:func:`tensor_core_slots`):

* tensor cores (csrc/attention_mass_mma.cu) for fp16/bf16 inputs with a head dim that is a
  multiple of 16: a CTA per (row block, group of output slots sharing a KV head), mma.sync
  scores over cp.async-staged K tiles, online softmax, then the probabilities multiplied on the
  tensor cores by a one-hot region tile (R ≤ 64: one accumulator for the whole pass; R > 64: a
  per-tile one, flushed after each tile). Per-row outputs have one writer per element; segment
  outputs add shared-memory column sums with fp32 atomics, or with ``deterministic=True`` write
  per-block partial rows summed in a fixed order;
* one warp per (row block, head) (csrc/attention_mass.cu) for everything else (fp32 inputs,
  other head dims, an explicit ``block_rows``): an online-softmax pass (skipped when ``lse`` is
  given), then a pass adding p = exp(s − lse) into the row's regions. Per-row outputs are
  written without atomics; segment outputs use fp32 atomicAdd, or with ``deterministic=True``
  per-block partial rows summed in a fixed order (bit-identical runs).

The public op sends fp64 inputs to the torch reference; the kernel reads fp16/bf16/fp32.
"""
from __future__ import annotations

import math

import torch

from .._backend import check_head_dim
from .._fused_host import last_dim_contiguous, row_blocks, segment_block_lists
from ._launch import (device_index, dtype_code, extension_for, int32_on, make_args, ptr,
                      stream_handle)

# Default rows per block of the warp-per-row kernel: small blocks give many warps; with
# deterministic segment sums every block owns a partial output row, so larger blocks keep that
# buffer small.
DEFAULT_BLOCK_ROWS = 8
DEFAULT_PARTIAL_BLOCK_ROWS = 64

# The tensor-core kernel (csrc/attention_mass_mma.cu): 4 warps of 16 rows per CTA, shared by
# the output slots of one KV head (1, 2 or 4 slots per CTA).
MMA_WARPS, MMA_WARP_ROWS = 4, 16
MMA_DTYPES = (torch.float16, torch.bfloat16)


def tensor_core_slots(q: torch.Tensor, k: torch.Tensor, heads: list[int], hq: int, hk: int,
                      block_rows: int | None) -> int:
    """Slots per CTA (1, 2 or 4) when the tensor-core kernel takes this call, else 0.

    It takes fp16/bf16 q and k with a head dim that is a multiple of 16 and 16-byte aligned rows
    (cp.async), deterministic or not; an explicit ``block_rows`` asks for the warp-per-row
    kernel. The C++ launcher checks the same rules.
    """
    d = q.shape[2]
    if (block_rows is not None or q.dtype not in MMA_DTYPES or d % 16
            or any(x.data_ptr() % 16 or x.stride(0) % 8 or x.stride(1) % 8 for x in (q, k))):
        return 0
    per_kv = torch.bincount(torch.tensor(heads, dtype=torch.int64) // (hq // hk), minlength=hk)
    largest = int(per_kv.max())
    return 1 if largest == 1 else 2 if largest == 2 else 4


def slot_groups(heads: list[int], hq: int, hk: int, slots_per_cta: int) -> torch.Tensor:
    """int32 [num_groups, slots_per_cta] (CPU): output slots whose query heads share a KV head,
    in chunks of ``slots_per_cta``, padded with -1; groups in KV-head order."""
    by_kv: dict[int, list[int]] = {}
    for slot, head in enumerate(heads):
        by_kv.setdefault(head // (hq // hk), []).append(slot)
    rows = []
    for kv in sorted(by_kv):
        slots = by_kv[kv]
        for i in range(0, len(slots), slots_per_cta):
            chunk = slots[i:i + slots_per_cta]
            rows.append(chunk + [-1] * (slots_per_cta - len(chunk)))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, slots_per_cta)


def attention_mass_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    key_region: torch.Tensor,
    num_regions: int,
    *,
    query_segment: torch.Tensor | None = None,
    num_segments: int = 0,
    heads: list[int] | None = None,
    lse: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    block_rows: int | None = None,
) -> torch.Tensor:
    """CUDA ``attention_mass`` (inputs validated by :func:`kawhi_kernels.ops.attention_mass`).

    Args:
        q: [total_q, Hq, D] fp16/bf16/fp32 CUDA tensor D ≤ 256.
        k: [total_k, Hk, D] same dtype and device, Hq % Hk == 0 (K is never repeated).
        cu_seqlens_q, cu_seqlens_k: int32/int64 [B+1].
        key_region: int32/int64 [total_k] in [0, R) or −1.
        num_regions: R.
        query_segment: optional int [total_q] in [0, num_segments) or −1; num_segments: S.
        heads: selected query heads in output order (default all).
        lse: optional fp32 [Hq, total_q] natural-log normalisers (skips the first pass).
        causal: bottom-right aligned causal mask per sequence.
        softmax_scale: default 1/√D.
        deterministic: bit-identical segment sums (no float atomics).
        block_rows: rows per warp of the warp-per-row kernel (default 8, or 64 for
            deterministic segment sums); giving it selects that kernel. The tensor-core
            kernel's row blocks are 64 / slots-per-CTA rows (:func:`tensor_core_slots`).

    Returns:
        fp32 [num_segments or total_q, len(heads), R].
    """
    hq, hk, d = q.shape[1], k.shape[1], q.shape[2]
    heads = list(range(hq)) if heads is None else list(heads)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    segmented = query_segment is not None
    device = q.device
    ext = extension_for(device, "attention_mass")
    check_head_dim("q", d, "CUDA")
    code = dtype_code(ext, "q", q.dtype)
    num_out = num_segments if segmented else q.shape[0]
    partial = segmented and deterministic
    q = last_dim_contiguous(q)
    k = last_dim_contiguous(k)
    slots_per_cta = tensor_core_slots(q, k, heads, hq, hk, block_rows)
    if slots_per_cta:
        block_rows = MMA_WARP_ROWS * (MMA_WARPS // slots_per_cta)
    elif block_rows is None:
        block_rows = DEFAULT_PARTIAL_BLOCK_ROWS if partial else DEFAULT_BLOCK_ROWS
    blocks = row_blocks(cu_seqlens_q, cu_seqlens_k, block_rows, query_segment)
    if num_out == 0 or num_regions == 0 or blocks.shape[0] == 0:
        return torch.zeros(num_out, len(heads), num_regions, dtype=torch.float32, device=device)

    out = torch.empty(num_out, len(heads), num_regions, dtype=torch.float32, device=device)
    keep = [int32_on(cu_seqlens_q, device), int32_on(cu_seqlens_k, device),
            int32_on(key_region, device), torch.tensor(heads, dtype=torch.int32, device=device),
            blocks.to(device)]
    cu_q, cu_k, region, head_tab, block_tab = keep
    fields = dict(
        q=ptr(q), k=ptr(k), dtype=code, total_q=q.shape[0], total_k=k.shape[0], hq=hq, hk=hk,
        head_dim=d, q_stride_t=q.stride(0), q_stride_h=q.stride(1), k_stride_t=k.stride(0),
        k_stride_h=k.stride(1), cu_seqlens_q=ptr(cu_q), cu_seqlens_k=ptr(cu_k),
        num_seqs=cu_q.numel() - 1, key_region=ptr(region), num_regions=num_regions,
        heads=ptr(head_tab), num_heads=len(heads), row_blocks=ptr(block_tab),
        num_row_blocks=block_tab.shape[0], causal=bool(causal), softmax_scale=float(scale),
        segmented=segmented, num_segments=num_segments if segmented else 0,
        deterministic=bool(deterministic), out=ptr(out), stream=stream_handle(device),
        device=device_index(device))
    if lse is not None:
        fields.update(lse=ptr(lse), lse_stride_h=lse.stride(0), lse_stride_t=lse.stride(1))
    if slots_per_cta:
        groups = slot_groups(heads, hq, hk, slots_per_cta).to(device)
        keep.append(groups)
        fields.update(slots_per_cta=slots_per_cta, slot_groups=ptr(groups),
                      num_slot_groups=groups.shape[0])
    if partial:
        start, order = segment_block_lists(blocks, num_segments)
        scratch = torch.empty(block_tab.shape[0], len(heads), num_regions, dtype=torch.float32,
                              device=device)
        keep += [start.to(device), order.to(device), scratch]
        fields.update(segment_block_start=ptr(keep[-3]), segment_blocks=ptr(keep[-2]),
                      partial=ptr(scratch))
    a = make_args(ext, "attention_mass", **fields)
    ext.attention_mass(a)
    # Temporaries in `keep` are freed after the launch was queued on the current stream: torch's
    # caching allocator only hands their memory to later work on that same stream.
    del keep
    return out
