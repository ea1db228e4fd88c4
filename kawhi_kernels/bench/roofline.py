"""Roofline of ``attention_mass`` rows: softmax scores per second and the fraction of the chip's
binding limit (DESIGN §7).

A QK-only kernel computes each visible score once with a D-long dot product (2·D FLOPs on
tensor cores) and one exponential (MUFU ``ex2``). Its physical time bound is
max(scores / exp rate, 2·D·scores / tensor-core rate); the fraction of the limit reported for a
row is that bound divided by the measured time (1.0 = at the limit). Chip rates come from the
device's SM count and clock: 16 ``ex2`` per SM per clock (sm_80 to sm_90) and the dense fp16/bf16
tensor-core FLOPs per SM per clock of the architecture (sm_80: 2048, sm_90: 4096; other archs are
not tabulated, then only the exp bound is used).
"""
from __future__ import annotations

import torch

EXP2_PER_SM_CLOCK = 16
TENSOR_FLOPS_PER_SM_CLOCK = {(8, 0): 2048, (9, 0): 4096}


def chip_limits(sm_count: int, clock_hz: float, capability: tuple[int, int]) -> dict:
    """{"exp_per_s", "tensor_flops_per_s" (None when the arch is not tabulated)} of a chip."""
    if sm_count <= 0 or clock_hz <= 0:
        raise ValueError(f"sm_count, clock_hz: expected positive values, got {sm_count}, {clock_hz}")
    per_clock = TENSOR_FLOPS_PER_SM_CLOCK.get(tuple(capability))
    return {"exp_per_s": EXP2_PER_SM_CLOCK * sm_count * clock_hz,
            "tensor_flops_per_s": None if per_clock is None else per_clock * sm_count * clock_hz}


def device_limits(device: torch.device) -> dict | None:
    """:func:`chip_limits` of a CUDA device (SM count and maximum SM clock from its properties or
    NVML), None off CUDA or when the clock is unknown."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "clock_rate", None)              # kHz where torch exposes it
    if not clock_khz:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            clock_khz = 1000 * pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
        except Exception:
            return None
    return chip_limits(props.multi_processor_count, clock_khz * 1e3, (props.major, props.minor))


def softmax_scores(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, num_heads: int,
                   causal: bool) -> int:
    """Visible (query row, key) pairs × heads of a packed batch: Σ per sequence of Lq·Lk, or with
    the bottom-right causal mask Σ over its rows i of clamp(i + 1 + Lk − Lq, 0, Lk)."""
    lens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to("cpu", torch.int64)
    lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to("cpu", torch.int64)
    total = 0
    for lq, lk in zip(lens_q.tolist(), lens_k.tolist()):
        if not causal:
            total += lq * lk
            continue
        rows = torch.arange(lq, dtype=torch.int64)
        total += int(torch.clamp(rows + 1 + lk - lq, 0, lk).sum())
    return total * num_heads


def roofline(scores: int, head_dim: int, seconds: float, limits: dict) -> dict:
    """{"scores_per_s", "bound_s" (physical time bound), "limit" ("exp" or "tensor"),
    "fraction" (bound ÷ measured time)} of one measured row."""
    if seconds <= 0:
        raise ValueError(f"seconds: expected a positive time, got {seconds}")
    exp_s = scores / limits["exp_per_s"]
    tensor = limits.get("tensor_flops_per_s")
    tensor_s = 2.0 * head_dim * scores / tensor if tensor else 0.0
    bound = max(exp_s, tensor_s)
    return {"scores_per_s": scores / seconds, "bound_s": bound,
            "limit": "exp" if exp_s >= tensor_s else "tensor", "fraction": bound / seconds}
