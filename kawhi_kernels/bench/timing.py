"""Timing and peak-memory measurement of one benchmark callable.

GPU: every call is bracketed by CUDA events on the current stream and the events are read after
one final synchronisation (no host round trip between calls). CPU: ``time.perf_counter`` around
each call (CPU torch ops are synchronous). Calls rotate over the pre-generated input copies
(call i uses copy i mod copies) so that caches do not hold the inputs of the previous call.

Peak extra memory (GPU only): ``torch.cuda.max_memory_allocated()`` during one call minus the
memory allocated before it, i.e. workspace plus output. On CPU no allocator statistics exist,
so peak memory is reported as not measured (``None`` → "n/a").
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Timing:
    """Per-call wall times in milliseconds: 20th, 50th and 80th percentiles over ``repeats``."""

    p20_ms: float
    p50_ms: float
    p80_ms: float
    repeats: int


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(times_ms, repeats: int | None = None) -> Timing:
    """:class:`Timing` of a non-empty list of per-call times (ms), linear interpolation."""
    values = np.asarray(list(times_ms), dtype=np.float64)
    if values.size == 0:
        raise ValueError("times_ms: expected at least one measurement")
    p20, p50, p80 = np.percentile(values, [20, 50, 80])
    return Timing(float(p20), float(p50), float(p80), int(values.size if repeats is None else repeats))


def time_calls(run: Callable[[int], object], copies: int, device: torch.device, *, warmup: int,
               repeats: int, max_seconds: float | None = None) -> Timing:
    """Time ``run(copy_index)``: ``warmup`` untimed calls, then up to ``repeats`` timed calls.

    Args:
        run: the benchmarked callable; its argument selects the input copy (0 … copies−1).
        copies: number of pre-generated input copies to rotate over (≥ 1).
        device: where the work runs (CUDA events on "cuda", perf_counter elsewhere).
        warmup: untimed calls first (compilation, autotuning, allocator warm-up).
        repeats: timed calls (≥ 1).
        max_seconds: optional budget: when one warm call is slow, the repeats are reduced so the
            timed calls take about this long (at least 3 repeats are kept).
    Returns:
        :class:`Timing` over the timed calls (``repeats`` field = calls actually timed).
    """
    if copies < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"copies/repeats must be >= 1 and warmup >= 0, got {copies}/{repeats}/{warmup}")
    call = 0
    for _ in range(warmup):
        run(call % copies)
        call += 1
    synchronize(device)
    if max_seconds is not None and repeats > 3:
        start = time.perf_counter()
        run(call % copies)
        call += 1
        synchronize(device)
        one = time.perf_counter() - start
        if one > 0:
            repeats = max(3, min(repeats, int(math.floor(max_seconds / one))))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start_event, end_event in events:
            start_event.record()
            run(call % copies)
            end_event.record()
            call += 1
        synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(call % copies)
            times.append((time.perf_counter() - start) * 1e3)
            call += 1
    return percentiles(times)


def peak_extra_mib(run: Callable[[int], object], device: torch.device,
                   copy_index: int = 0) -> tuple[object, float | None]:
    """Run ``run(copy_index)`` once; return (its output, peak extra memory in MiB or None).

    CUDA: max_memory_allocated during the call minus memory_allocated before it (the output
    counts: it is memory the call adds). Other devices: None (not measured).
    """
    if device.type != "cuda":
        return run(copy_index), None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = run(copy_index)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    return out, max(0.0, peak / 2**20)
