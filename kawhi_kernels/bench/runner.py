"""Run benchmark cases one after the other and turn each into a results record.

A case never crashes the sweep: an unavailable backend becomes status "unavailable: reason", an
out-of-memory error "OOM" (memory is freed and the sweep continues), any other exception
"error: <type>: <message>". A global time budget turns the remaining cases into
"skipped: time budget" rows so a bounded GPU session still writes all its outputs.
"""
from __future__ import annotations

import gc
import sys
import time
from typing import Callable, Iterable

import torch

from .cases import BenchContext, Case, Unavailable
from .cases import _attention_data as attention_data
from .roofline import device_limits, roofline, softmax_scores
from .timing import peak_extra_mib, synchronize, time_calls

MAX_STATUS_CHARS = 300


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors (torch.OutOfMemoryError, MemoryError, allocator
    messages)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def base_record(case: Case, ctx: BenchContext, meta: dict) -> dict:
    """The descriptive part of a results row (no measurements yet)."""
    return {
        "run_id": meta["run_id"], "date": meta["date"], "device": meta["device"], "gpu": meta["gpu"],
        "op": case.op, "backend": case.backend, "lse": case.lse, "family": case.shape.family,
        **case.shape.columns(), "dtype": meta["dtype"],
        "p50_ms": None, "p20_ms": None, "p80_ms": None, "repeats": None, "peak_mib": None,
        "max_rel_err": None, "status": "", "note": "",
        "torch": meta["torch"], "triton": meta["triton"], "cuda": meta["cuda"],
        "git_commit": meta["git_commit"], "command": meta["command"],
        "scores_per_s": None, "roofline_frac": None,
    }


def _roofline_columns(case: Case, ctx: BenchContext, p50_ms: float) -> dict:
    """scores_per_s / roofline_frac of an attention_mass row on a GPU (empty otherwise)."""
    limits = device_limits(ctx.device) if case.op == "attention_mass" else None
    if limits is None or not p50_ms:
        return {}
    data = attention_data(ctx, case.shape)                      # the case's cached inputs
    scores = softmax_scores(data.cu_seqlens_q, data.cu_seqlens_k, data.qs[0].shape[1], data.causal)
    line = roofline(scores, data.qs[0].shape[2], p50_ms / 1e3, limits)
    return {"scores_per_s": line["scores_per_s"], "roofline_frac": line["fraction"]}


def run_case(case: Case, ctx: BenchContext, meta: dict, *, warmup: int, repeats: int,
             max_case_seconds: float | None = None) -> dict:
    """Build, time, measure memory of and check one case; return its record."""
    record = base_record(case, ctx, meta)
    prepared = out = None
    try:
        prepared = case.build(ctx)
        timing = time_calls(prepared.run, prepared.copies, ctx.device, warmup=warmup, repeats=repeats,
                            max_seconds=max_case_seconds)
        out, peak = peak_extra_mib(prepared.run, ctx.device)
        err = prepared.check(out) if prepared.check is not None else None
        synchronize(ctx.device)
        record.update(p50_ms=timing.p50_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                      repeats=timing.repeats, peak_mib=peak, max_rel_err=err, status="ok")
        record.update(_roofline_columns(case, ctx, timing.p50_ms))
    except Unavailable as exc:
        record["status"] = f"unavailable: {exc}"[:MAX_STATUS_CHARS]
    except Exception as exc:  # recorded, never fatal: OOM or a broken backend
        record["status"] = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:MAX_STATUS_CHARS]
        if is_oom(exc):
            record["note"] = str(exc).splitlines()[0][:MAX_STATUS_CHARS] if str(exc) else ""
    finally:
        if prepared is not None and not record["note"]:
            record["note"] = prepared.note
        del prepared, out
    if record["status"] == "OOM" or record["status"].startswith("error"):
        _free(ctx.device)
    record["status"] = " ".join(record["status"].split())  # one line in CSV and markdown
    record["note"] = " ".join(str(record["note"]).split())
    return record


class SweepInterrupted(BaseException):
    """Raised (e.g. from a SIGTERM handler) to stop a sweep early; the cases not finished are
    recorded as "skipped: interrupted". A BaseException, like KeyboardInterrupt, so that the
    per-case error handling does not swallow it."""


def run_cases(cases: Iterable[Case], ctx: BenchContext, meta: dict, *, warmup: int, repeats: int,
              max_case_seconds: float | None = None, time_budget: float | None = None,
              progress: bool = True, on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``cases`` in order with a tqdm progress bar; return one record per case.

    time_budget: seconds for the whole sweep; cases not started in time are recorded as
    "skipped: time budget". KeyboardInterrupt or :class:`SweepInterrupted` stops the sweep: the
    remaining cases are recorded as "skipped: interrupted". ``on_record(record)`` is called as
    soon as each record exists (e.g. to append it to the CSV right away).
    """
    cases = list(cases)
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional
        tqdm = None
    bar = tqdm(cases, desc="kawhi bench", unit="case", file=sys.stderr, disable=not progress,
               dynamic_ncols=True) if tqdm is not None else cases
    start = time.monotonic()
    records: list[dict] = []
    stop_reason = None
    try:
        for case in bar:
            if tqdm is not None:
                bar.set_postfix_str(case.label, refresh=False)
            if stop_reason is None and time_budget is not None and time.monotonic() - start > time_budget:
                stop_reason = "skipped: time budget"
            if stop_reason is not None:
                record = base_record(case, ctx, meta)
                record["status"] = stop_reason
            else:
                record = run_case(case, ctx, meta, warmup=warmup, repeats=repeats,
                                  max_case_seconds=max_case_seconds)
            records.append(record)
            if on_record is not None:
                on_record(record)
    except (KeyboardInterrupt, SweepInterrupted):
        for case in cases[len(records):]:
            record = base_record(case, ctx, meta)
            record["status"] = "skipped: interrupted"
            records.append(record)
            if on_record is not None:
                on_record(record)
    finally:
        if tqdm is not None:
            bar.close()
        ctx.release()
    return records
