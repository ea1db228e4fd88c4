"""GPU correctness of every backend at realistic shapes, for the one-command session (run_gpu.sh).

    python benchmarks/gpu_checks.py --device cuda --out DIR [--section correctness|plan]
    BENCH_DEVICE=cpu TRITON_INTERPRET=1 python benchmarks/gpu_checks.py --device cpu --out DIR

Section "correctness" (phase 2): for Qwen2.5-VL-7B (Hq 28, Hk 4, D 128) and Qwen3-VL-4B (Hq 32,
Hk 8, D 128) heads, two ragged sequences of 4096 / 3072 tokens with 1024 image tokens and
2048 / 1536 response rows, in fp32, bf16 and fp16 (fp16: 7B only), each backend (torch, triton,
cuda) against the fp64 torch reference of the same (cast) inputs: per-row mass, a vision-head
subset, 16 segments per sequence (one empty, some rows ignored) atomic and deterministic, the
deterministic result bit-identical over repeated runs, and ``lse`` from SDPA's own flash kernel
(units checked against a logsumexp: natural log vs log2). Then a small layout with rows that
see no key, a sequence without rows and one without keys, and an empty segment: no NaN, zeros
where the contract says so. cosine_alignment per backend on the same inputs. Then grid_pyramid
on Qwen-like image grids (ragged cells, non-dividing cell sizes, a frame the CUDA kernel cuts
into strips) and cosine_alignment on layouts that take the CUDA scalar fallbacks (odd head dim,
unaligned rows), fp32 and bf16, every backend against the fp64 reference.

Section "plan" (phase 3, GPU only): ``AttentionMassPlan``/``CosineAlignmentPlan.run`` with the
CUDA backend (the Triton one is covered by tests/test_plan.py's GPU test) and Triton with an lse,
under ``torch.cuda.set_sync_debug_mode("error")`` and replayed in a CUDA graph.

CPU mode (``--device cpu``): the same checks on tiny shapes (real head counts, D 16); Triton runs
under its interpreter when TRITON_INTERPRET=1 (fp32 only), CUDA-only items are recorded as
"skipped: no CUDA". Every check appends one row to DIR/<section>.csv as soon as it finishes and
rewrites DIR/<section>.md, so a run cut short still returns what it did. Exit status: 0 when no
check failed or errored.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kawhi_kernels import (AttentionMassPlan, CosineAlignmentPlan, attention_mass,  # noqa: E402
                           cosine_alignment, grid_pyramid, vision_critical_heads)
from kawhi_kernels._backend import available_backends  # noqa: E402
from kawhi_kernels.bench.accuracy import attention_lse  # noqa: E402
from kawhi_kernels.bench.flash_lse import lse_units, sdpa_flash_lse, to_natural_log  # noqa: E402

COLUMNS = ("check", "model", "dtype", "backend", "status", "max_abs_err", "max_rel_err", "atol",
           "rtol", "seconds", "detail")
# Tolerances against the fp64 reference of the same (cast) inputs. Half inputs: the fused kernels
# may round P to the input dtype for the tensor-core region sum.
TOL = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (4e-3, 3e-2), torch.float16: (1e-3, 1e-2)}
MODELS = {"qwen2.5-vl-7b": (28, 4), "qwen3-vl-4b": (32, 8)}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Recorder:
    """Appends check rows to ``out/<section>.csv`` and keeps ``out/<section>.md`` current."""

    def __init__(self, out: Path, section: str, device: str):
        self.csv = out / f"{section}.csv"
        self.md = out / f"{section}.md"
        self.rows: list[dict] = []
        self.title = (f"{section} checks on {device}" +
                      ("" if device == "cuda" else " — CPU DRY RUN (tiny shapes), not GPU results"))
        out.mkdir(parents=True, exist_ok=True)
        with self.csv.open("w", newline="") as fh:
            csv.DictWriter(fh, fieldnames=COLUMNS).writeheader()

    def add(self, **row) -> None:
        row = {c: row.get(c, "") for c in COLUMNS}
        for key in ("max_abs_err", "max_rel_err"):
            if isinstance(row[key], float):
                row[key] = f"{row[key]:.3e}"
        if isinstance(row["seconds"], float):
            row["seconds"] = f"{row['seconds']:.2f}"
        row["detail"] = " ".join(str(row["detail"]).split())[:400]
        self.rows.append(row)
        with self.csv.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=COLUMNS).writerow(row)
        failed = sum(r["status"] in ("FAIL", "error") for r in self.rows)
        lines = [f"# {self.title}", "", f"{len(self.rows)} checks, {failed} failed or errored", "",
                 "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(str(r[c]).replace("|", "/") for c in COLUMNS) + " |" for r in self.rows]
        self.md.write_text("\n".join(lines) + "\n")
        print(f"[{row['status']:>7}] {row['check']} {row['model']} {row['dtype']} {row['backend']} "
              f"abs {row['max_abs_err']} rel {row['max_rel_err']} {row['detail'][:120]}", flush=True)

    @property
    def failures(self) -> int:
        return sum(r["status"] in ("FAIL", "error") for r in self.rows)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> tuple[bool, float, float, str]:
    """(ok, max abs err, max rel err, detail): shapes equal, no NaN/Inf, |got − ref| ≤ atol + rtol·|ref|."""
    if tuple(got.shape) != tuple(ref.shape):
        return False, math.nan, math.nan, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not bool(torch.isfinite(got).all()):
        return False, math.nan, math.nan, f"{int((~torch.isfinite(got)).sum())} non-finite values"
    diff = (got.double() - ref.double()).abs()
    if diff.numel() == 0:
        return True, 0.0, 0.0, "empty"
    rel = diff / ref.double().abs().clamp_min(1e-3 * float(ref.abs().max()) + 1e-30)
    ok = bool((diff <= atol + rtol * ref.double().abs()).all())
    return ok, float(diff.max()), float(rel.max()), ""


# ----------------------------------------------------------------------------- layouts

class Layout:
    """Packed sequences: the full token stream (for SDPA's lse), the response rows (queries),
    image-cell regions, paragraph segments."""

    def __init__(self, device: torch.device, hq: int, hk: int, d: int, lengths: list[int],
                 rows: list[int], grid: tuple[int, int], cell: int, segments_per_seq: int,
                 prefix: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.device, self.hq, self.hk, self.d = device, hq, hk, d
        self.lengths, self.rows = lengths, rows
        total = sum(lengths)
        self.q_full = torch.randn(total, hq, d, generator=gen)
        self.k_full = torch.randn(total, hk, d, generator=gen)
        self.cu_full = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
        row_index = torch.cat([torch.arange(int(self.cu_full[b + 1]) - r, int(self.cu_full[b + 1]))
                               for b, r in enumerate(rows)])
        self.row_index = row_index
        self.cu_q = torch.tensor([0] + list(torch.tensor(rows).cumsum(0)), dtype=torch.int32, device=device)
        self.cu_k = self.cu_full.to(device)
        gh, gw = grid
        cells_w = (gw + cell - 1) // cell
        ids = torch.tensor([(i // gw // cell) * cells_w + (i % gw) // cell for i in range(gh * gw)])
        self.num_regions = int(ids.max()) + 1
        region = torch.full((total,), -1, dtype=torch.int32)
        for b in range(len(lengths)):
            s0 = int(self.cu_full[b]) + prefix
            region[s0:s0 + gh * gw] = ids.to(torch.int32)
        self.key_region = region.to(device)
        # Segments: contiguous runs per sequence; segment 1 of each sequence is empty, every
        # 17th row is ignored (−1).
        seg = []
        for b, r in enumerate(rows):
            bounds = torch.linspace(0, r, segments_per_seq + 1).long()
            s = torch.empty(r, dtype=torch.int32)
            for j in range(segments_per_seq):
                s[bounds[j]:bounds[j + 1]] = b * segments_per_seq + j
            s[bounds[1]:bounds[2]] = b * segments_per_seq + 2 if segments_per_seq > 2 else -1
            s[::17] = -1
            seg.append(s)
        self.query_segment = torch.cat(seg).to(device)
        self.num_segments = segments_per_seq * len(rows)
        self.scale = 1.0 / math.sqrt(d)

    def qk(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.q_full[self.row_index].to(self.device, dtype)
        k = self.k_full.to(self.device, dtype)
        return q, k

    def kwargs(self) -> dict:
        return dict(causal=True, softmax_scale=self.scale)


def segment_sum(per_row: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum rows of ``per_row`` [total_q, H, R] by segment id (−1 ignored)."""
    out = torch.zeros(num_segments, *per_row.shape[1:], dtype=per_row.dtype, device=per_row.device)
    keep = segment >= 0
    return out.index_add_(0, segment[keep].long(), per_row[keep])


def backends_here(device: torch.device) -> dict[str, str | None]:
    """backend → None (runs) or the skip reason, for torch / triton / cuda."""
    avail = available_backends(device)
    out = {}
    for b in ("torch", "triton", "cuda"):
        reason = avail.get(b)
        if reason is not None and device.type == "cpu" and b == "cuda":
            reason = "skipped: no CUDA"
        out[b] = None if reason is None else (reason if reason.startswith("skipped") else f"skipped: {reason}")
    return out


# ----------------------------------------------------------------------------- correctness

def run_check(rec: Recorder, name: str, model: str, dtype, backend: str, fn) -> None:
    """Run ``fn() -> (ok, abs, rel, detail, tol)``; record ok / FAIL / error."""
    t0 = time.perf_counter()
    try:
        ok, abs_err, rel_err, detail, (atol, rtol) = fn()
        status = "ok" if ok else "FAIL"
    except Exception as exc:
        status, abs_err, rel_err, atol, rtol = "error", "", "", "", ""
        detail = f"{type(exc).__name__}: {exc} @ {traceback.format_exc().strip().splitlines()[-3].strip()}"
    rec.add(check=name, model=model, dtype=DTYPE_NAMES.get(dtype, str(dtype)), backend=backend,
            status=status, max_abs_err=abs_err, max_rel_err=rel_err, atol=atol, rtol=rtol,
            seconds=time.perf_counter() - t0, detail=detail)


def correctness(rec: Recorder, device: torch.device, budget: float) -> None:
    start = time.monotonic()
    gpu = device.type == "cuda"
    backends = backends_here(device)
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    if gpu:
        geometry = dict(d=128, lengths=[4096, 3072], rows=[2048, 1536], grid=(32, 32), cell=4,
                        segments_per_seq=16, prefix=16)
        plan = [("qwen2.5-vl-7b", torch.float32), ("qwen2.5-vl-7b", torch.bfloat16),
                ("qwen2.5-vl-7b", torch.float16), ("qwen3-vl-4b", torch.bfloat16),
                ("qwen3-vl-4b", torch.float32)]
    else:
        geometry = dict(d=16, lengths=[96, 64], rows=[48, 40], grid=(4, 4), cell=2,
                        segments_per_seq=4, prefix=4)
        plan = [("qwen2.5-vl-7b", torch.float32), ("qwen2.5-vl-7b", torch.bfloat16),
                ("qwen3-vl-4b", torch.float32)]
    for index, (model, dtype) in enumerate(plan):
        if time.monotonic() - start > budget:
            rec.add(check="remaining (model, dtype) pairs", model=model, dtype=DTYPE_NAMES[dtype],
                    status="skipped: time budget", detail=f"{len(plan) - index} pairs not started")
            break
        hq, hk = MODELS[model]
        lay = Layout(device, hq, hk, seed=100 + index, **geometry)
        q, k = lay.qk(dtype)
        t0 = time.perf_counter()
        ref = attention_mass(q.double(), k.double(), lay.cu_q, lay.cu_k, lay.key_region,
                             lay.num_regions, backend="torch", **lay.kwargs())          # [Tq, Hq, R]
        ref_seg = segment_sum(ref, lay.query_segment, lay.num_segments)
        sync(device)
        rec.add(check="fp64 reference", model=model, dtype=DTYPE_NAMES[dtype], backend="torch/fp64",
                status="ok", seconds=time.perf_counter() - t0,
                detail=f"q {tuple(q.shape)} k {tuple(k.shape)} R={lay.num_regions} "
                       f"segments={lay.num_segments}; row mass in [{float(ref.sum(-1).min()):.3f}, "
                       f"{float(ref.sum(-1).max()):.3f}]")
        heads = vision_critical_heads(model)
        tol = TOL[dtype]
        # A segment sums n rows whose rounding errors are independent: atol grows like sqrt(n).
        rows_per_segment = int(torch.bincount(lay.query_segment[lay.query_segment >= 0].long()).max())
        seg_tol = (tol[0] * math.sqrt(rows_per_segment), tol[1])
        repeats = 3 if gpu else 1          # the CPU dry run's Triton interpreter is slow
        lse = lse_check(rec, lay, model, dtype, q, k)
        for backend, skip in backends.items():
            if skip is None and backend == "triton" and not gpu and dtype != torch.float32:
                skip = "skipped: Triton interpreter has no bf16/fp16 math"
            if skip is None and backend == "triton" and not gpu and not interpreter:
                skip = "skipped: Triton on CPU needs TRITON_INTERPRET=1"
            if skip is None and backend == "triton" and not gpu and index > 0:
                skip = "skipped: CPU dry run times the interpreter on the first pair only"
            if skip is not None:
                rec.add(check="all", model=model, dtype=DTYPE_NAMES[dtype], backend=backend, status=skip)
                continue
            common = dict(backend=backend, **lay.kwargs())
            args = (lay.cu_q, lay.cu_k, lay.key_region, lay.num_regions)

            def rows_check(common=common):
                out = attention_mass(q, k, *args, **common)
                return (*compare(out, ref.float(), *tol), tol)

            def heads_check(common=common):
                out = attention_mass(q, k, *args, heads=heads, **common)
                ok, a, r, d = compare(out, ref[:, heads].float(), *tol)
                return ok, a, r, f"heads {heads} {d}", tol

            def segments_check(deterministic: bool, common=common):
                seg = dict(query_segment=lay.query_segment, num_segments=lay.num_segments,
                           deterministic=deterministic)
                first = attention_mass(q, k, *args, **seg, **common)
                again = [attention_mass(q, k, *args, **seg, **common) for _ in range(repeats)]
                identical = all(torch.equal(first, x) for x in again)
                ok, a, r, d = compare(first, ref_seg.float(), *seg_tol)
                empty = float(first[1::lay.num_segments // len(lay.rows)].abs().max()) if \
                    lay.num_segments // len(lay.rows) > 2 else 0.0
                ok = ok and (identical or not deterministic) and empty == 0.0
                detail = (f"{repeats + 1} runs bit-identical: {identical}; empty segments max {empty:g}"
                          + (" (atomic order may differ; not required)" if not deterministic else "") + f" {d}")
                return ok, a, r, detail, seg_tol

            def lse_run(common=common):
                if lse is None:
                    raise RuntimeError("no lse (see the lse row)")
                out = attention_mass(q, k, *args, lse=lse, **common)
                return (*compare(out, ref.float(), tol[0] * 2, tol[1] * 2), (tol[0] * 2, tol[1] * 2))

            run_check(rec, "rows", model, dtype, backend, rows_check)
            run_check(rec, "heads subset", model, dtype, backend, heads_check)
            run_check(rec, "segments atomic", model, dtype, backend, lambda: segments_check(False))
            run_check(rec, "segments deterministic", model, dtype, backend, lambda: segments_check(True))
            run_check(rec, "lse from SDPA flash", model, dtype, backend, lse_run)
            run_check(rec, "cosine_alignment", model, dtype, backend,
                      lambda b=backend: cosine_check(lay, q, k, heads, b, dtype))
        del q, k, ref, ref_seg, lse
        if gpu:
            torch.cuda.empty_cache()
    edge_cases(rec, device, backends, interpreter)
    layout_cases(rec, device, backends, interpreter)


def layout_cases(rec: Recorder, device: torch.device, backends: dict, interpreter: bool) -> None:
    """grid_pyramid on Qwen-like image grids (several images, a video, ragged edges, cell sizes
    that do not divide each other, a frame cut into strips by the CUDA kernel) and
    cosine_alignment on layouts that take the kernels' scalar fallbacks (odd head dim, rows not
    16-byte aligned), each backend against the fp64 reference, bf16 included."""
    gpu = device.type == "cuda"
    gen = torch.Generator().manual_seed(11)
    grids = [[1, 36, 28], [2, 18, 24], [1, 7, 13], [1, 160, 96]] if gpu else [[1, 6, 5], [2, 3, 4]]
    n = sum(t * h * w for t, h, w in grids)
    lead = (256, 9) if gpu else (4, 3)
    for dtype in (torch.float32, torch.bfloat16):
        mass = (torch.rand(*lead, n + 1, generator=gen) / n).to(device, dtype)[..., 1:]
        for backend, skip in backends.items():
            if skip is None and backend == "triton" and not gpu and (
                    dtype != torch.float32 or not interpreter):
                skip = "skipped: Triton on CPU: interpreter, fp32 only"
            if skip is not None:
                rec.add(check="grid_pyramid", model="image grids", dtype=DTYPE_NAMES[dtype],
                        backend=backend, status=skip)
                continue

            def pyramid(backend=backend, mass=mass):
                worst_a, worst_r, ok_all, details = 0.0, 0.0, True, []
                for levels in (3, [1, 3, 6], [2, 5, 160]):
                    want = grid_pyramid(mass.double(), grids, levels, backend="torch")
                    got = grid_pyramid(mass, grids, levels, backend=backend)
                    for s, a, b in zip(range(len(want)), got, want):
                        ok, ea, er, d = compare(a, b.float(), 1e-6, 1e-5)
                        ok_all &= ok
                        worst_a, worst_r = max(worst_a, ea), max(worst_r, er)
                        if not ok:
                            details.append(f"levels {levels} #{s}: {d or 'outside tolerance'}")
                return ok_all, worst_a, worst_r, "; ".join(details) or f"grids {grids}", (1e-6, 1e-5)
            run_check(rec, "grid_pyramid", "image grids", dtype, backend, pyramid)

    hq, hk = 28, 4
    for dtype in (torch.float32, torch.bfloat16):
        for d, offset in ((100, 0), (128, 1), (64, 0)):
            total = 300 if gpu else 40
            full_q = torch.randn(total, hq, d + offset, generator=gen).to(device, dtype)
            q = full_q[..., offset:]                       # offset 1: rows not 16-byte aligned
            k = torch.randn(total, hk, d + 1, generator=gen).to(device, dtype)[..., 1:]  # unaligned
            cu = torch.tensor([0, total // 3, total], dtype=torch.int32, device=device)
            region = torch.randint(-1, 5, (total,), generator=gen, dtype=torch.int32).to(device)
            ref = cosine_alignment(q.double(), k.double(), cu, cu, region, 5, heads=[0, 5, 27],
                                   per_head=True, backend="torch")
            tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-3, 2e-2)
            for backend, skip in backends.items():
                if skip is None and backend == "triton" and not gpu and (
                        dtype != torch.float32 or not interpreter):
                    skip = "skipped: Triton on CPU: interpreter, fp32 only"
                label = f"cosine_alignment D={d} q offset={offset} k offset=1"
                if skip is not None:
                    rec.add(check=label, model="28/4", dtype=DTYPE_NAMES[dtype], backend=backend,
                            status=skip)
                    continue

                def cosine(backend=backend, q=q, k=k, cu=cu, region=region, ref=ref, tol=tol):
                    out = cosine_alignment(q, k, cu, cu, region, 5, heads=[0, 5, 27],
                                           per_head=True, backend=backend)
                    return (*compare(out, ref.float(), *tol), tol)
                run_check(rec, label, "28/4", dtype, backend, cosine)


def lse_check(rec: Recorder, lay: Layout, model: str, dtype, q, k):
    """The natural-log lse of the response rows from SDPA's flash kernel (fp16/bf16 on CUDA, any
    on CPU), its units checked against an fp32 logsumexp; fp32 on CUDA uses the fp32 logsumexp
    (the CUDA flash kernel takes no fp32). Returns fp32 [Hq, total_q] or None."""
    t0 = time.perf_counter()
    try:
        reference = attention_lse(q, k, lay.cu_q, lay.cu_k, True, lay.scale)
        if lay.device.type == "cuda" and dtype == torch.float32:
            rec.add(check="lse source", model=model, dtype="fp32", backend="sdpa", status="ok",
                    seconds=time.perf_counter() - t0,
                    detail="CUDA flash SDPA takes fp16/bf16 only: fp32 logsumexp used instead")
            return reference
        raw = sdpa_flash_lse(lay.q_full.to(lay.device, dtype), k, lay.cu_k, lay.rows,
                             softmax_scale=lay.scale)
        units, err = lse_units(raw, reference)
        lse = to_natural_log(raw, units)
        ok = err < 1e-2
        rec.add(check="lse source", model=model, dtype=DTYPE_NAMES[dtype], backend="sdpa flash",
                status="ok" if ok else "FAIL", max_abs_err=err, seconds=time.perf_counter() - t0,
                detail=f"aten flash logsumexp [B, H, L] is in {units} units (max |err| {err:.2e} vs "
                       f"fp32 logsumexp); converted to natural-log [Hq, total_q]")
        return lse
    except Exception as exc:
        rec.add(check="lse source", model=model, dtype=DTYPE_NAMES[dtype], backend="sdpa flash",
                status="error", seconds=time.perf_counter() - t0, detail=f"{type(exc).__name__}: {exc}")
        return None


def cosine_check(lay: Layout, q, k, heads, backend: str, dtype):
    selected = torch.where(lay.key_region >= 0, 0, -1).to(torch.int32)
    args = (lay.cu_q, lay.cu_k, selected, 1)
    ref = cosine_alignment(q.double(), k.double(), *args, heads=heads, backend="torch")
    out = cosine_alignment(q, k, *args, heads=heads, backend=backend)
    tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-3, 2e-2)
    return (*compare(out, ref.float(), *tol), tol)


def edge_cases(rec: Recorder, device: torch.device, backends: dict, interpreter: bool) -> None:
    """Rows without a visible key, a sequence without rows, one without keys, an empty segment:
    finite output, exact zeros where nothing is visible, close to the reference, with and
    without an lse (−inf for the rows without keys, as FlashAttention writes it)."""
    gen = torch.Generator().manual_seed(7)
    lens_q, lens_k = [6, 0, 5, 9], [3, 5, 0, 40]           # seq 0: rows 0-2 see no key
    cu_q = torch.tensor([0, 6, 6, 11, 20], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 3, 8, 8, 48], dtype=torch.int32, device=device)
    hq, hk, d, r = 28, 4, 128 if device.type == "cuda" else 32, 5
    region = torch.randint(-1, r, (48,), generator=gen, dtype=torch.int32).to(device)
    seg = torch.tensor([0, 0, 0, 2, 2, -1, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 5, 5, 5, 5],
                       dtype=torch.int32, device=device)        # segment 1 is empty
    no_key_rows = [0, 1, 2] + list(range(6, 11))
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(20, hq, d, generator=gen).to(device, dtype)
        k = torch.randn(48, hk, d, generator=gen).to(device, dtype)
        ref = attention_mass(q.double(), k.double(), cu_q, cu_k, region, r, backend="torch")
        lse = attention_lse(q, k, cu_q, cu_k, True, 1.0 / math.sqrt(d))
        for backend, skip in backends.items():
            if skip is None and backend == "triton" and device.type == "cpu" and (
                    dtype != torch.float32 or not interpreter):
                skip = "skipped: Triton on CPU: interpreter, fp32 only"
            if skip is not None:
                rec.add(check="edge: empty rows/segments", model="28/4", dtype=DTYPE_NAMES[dtype],
                        backend=backend, status=skip)
                continue

            def fn(backend=backend):
                tol = TOL[dtype]
                details, ok_all, worst_a, worst_r = [], True, 0.0, 0.0
                for label, kw, want in (
                        ("rows", {}, ref),
                        ("rows+lse", {"lse": lse}, ref),
                        ("segments", {"query_segment": seg, "num_segments": 6}, segment_sum(ref, seg, 6)),
                        ("segments det", {"query_segment": seg, "num_segments": 6, "deterministic": True},
                         segment_sum(ref, seg, 6))):
                    out = attention_mass(q, k, cu_q, cu_k, region, r, backend=backend, **kw)
                    ok, a, rel, d_ = compare(out, want.float(), tol[0] * 8, tol[1])
                    if "segments" in label:
                        zero = float(out[1].abs().max())
                    else:
                        zero = float(out[no_key_rows].abs().max())
                    ok = ok and zero == 0.0
                    ok_all &= ok
                    worst_a, worst_r = max(worst_a, a if a == a else 1.0), max(worst_r, rel if rel == rel else 1.0)
                    details.append(f"{label}: {'ok' if ok else 'FAIL'} zeros-max {zero:g} {d_}")
                return ok_all, worst_a, worst_r, "; ".join(details), (tol[0] * 8, tol[1])
            run_check(rec, "edge: empty rows/segments", "28/4", dtype, backend, fn)


# ----------------------------------------------------------------------------- plan (GPU)

def plan_checks(rec: Recorder, device: torch.device) -> None:
    """Plan.run under sync debug 'error' and replayed in a CUDA graph, CUDA backend (and Triton
    with an lse); GPU only."""
    backends = backends_here(device)
    if device.type != "cuda":
        rec.add(check="plan sync-free + CUDA graph", backend="cuda,triton", status="skipped: no CUDA")
        return
    lay = Layout(device, 28, 4, 128, [2048, 1024], [700, 300], (32, 32), 4, 6, 16, seed=5)
    q, k = lay.qk(torch.bfloat16)
    lse = attention_lse(q, k, lay.cu_q, lay.cu_k, True, lay.scale)
    for backend, with_lse in (("cuda", False), ("cuda", True), ("triton", True)):
        if backends[backend] is not None:
            rec.add(check="plan sync-free + CUDA graph", backend=backend, status=backends[backend])
            continue
        for segmented, deterministic in ((False, False), (True, True)):
            name = f"plan sync-free + graph seg={segmented} det={deterministic} lse={with_lse}"

            def fn(backend=backend, segmented=segmented, deterministic=deterministic, with_lse=with_lse):
                seg = (dict(query_segment=lay.query_segment, num_segments=lay.num_segments)
                       if segmented else {})
                plan = AttentionMassPlan(lay.cu_q, lay.cu_k, lay.key_region, lay.num_regions,
                                         num_heads=28, num_kv_heads=4, head_dim=128, dtype=torch.bfloat16,
                                         heads=[0, 3, 22, 27], deterministic=deterministic,
                                         backend=backend, **seg, **lay.kwargs())
                cos = CosineAlignmentPlan(lay.cu_q, lay.cu_k, lay.key_region, lay.num_regions,
                                          num_heads=28, num_kv_heads=4, head_dim=128,
                                          dtype=torch.bfloat16, backend=backend)
                x = lse if with_lse else None
                eager = plan.run(q, k, x)
                cos.run(q, k)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    plan.run(q, k, x)
                    cos.run(q, k)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    plan.run(q, k, x)
                    cos.run(q, k)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured, captured_cos = plan.run(q, k, x), cos.run(q, k)
                graph.replay()
                torch.cuda.synchronize()
                ok, a, r, d = compare(captured, eager, 1e-5, 1e-4)
                ok_c, a_c, r_c, d_c = compare(captured_cos, cos.run(q, k), 1e-5, 1e-4)
                return ok and ok_c, max(a, a_c), max(r, r_c), f"graph replay == eager; {d} {d_c}", (1e-5, 1e-4)
            run_check(rec, name, "qwen2.5-vl-7b", torch.bfloat16, backend, fn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=os.environ.get("BENCH_DEVICE", "cuda"), choices=("cuda", "cpu"))
    p.add_argument("--out", required=True)
    p.add_argument("--section", default="correctness", choices=("correctness", "plan"))
    p.add_argument("--time-budget", type=float, default=80.0,
                   help="seconds after which no further (model, dtype) pair is started")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_checks: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    rec = Recorder(Path(args.out), args.section, args.device)
    if args.section == "correctness":
        correctness(rec, device, args.time_budget)
    else:
        plan_checks(rec, device)
    print(f"gpu_checks {args.section}: {len(rec.rows)} rows, {rec.failures} failed or errored; {rec.md}")
    return 1 if rec.failures else 0


if __name__ == "__main__":
    sys.exit(main())
