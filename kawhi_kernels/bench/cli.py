"""``kawhi-kernels bench``: sweep shapes × backends for every op, write CSV, markdown and plots.

    kawhi-kernels bench --quick --device cpu             # tiny shapes, seconds, CPU
    python -m kawhi_kernels.bench.cli --device cuda      # the full GPU sweep
    python -m kawhi_kernels.bench.cli --ops attention_mass --shapes 'target|seq' --backends naive,triton,flash

The top-level ``kawhi-kernels`` parser passes every option after ``bench`` through; a leading
``--`` is accepted and ignored. Results go to ``--out`` (default ``./kawhi-bench-out``).
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

import torch

# Shapes per op that run before the rest of the sweep (see collect_cases).
PRIORITY_SHAPES = 2

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kawhi-kernels bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (seq 256-512, rows 64, image 64) that finish in seconds, e.g. on CPU")
    p.add_argument("--ops", default=None,
                   help="comma list of attention_mass,cosine_alignment,sguf,kawhi_step (default: all)")
    p.add_argument("--shapes", default=None, help="regular expression on shape names (re.search)")
    p.add_argument("--backends", default=None,
                   help="comma list of backends to keep (e.g. naive,triton,triton+lse,flash); default: all")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="q/k dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--out", default="kawhi-bench-out",
                   help="output folder: results.csv is appended, report/plots written (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default: 3 quick, 10 full)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 1 on CPU, 3 on CUDA)")
    p.add_argument("--copies", type=int, default=None,
                   help="pre-generated input copies rotated over calls (default: 2 quick, 3 full)")
    p.add_argument("--max-case-seconds", type=float, default=20.0,
                   help="fewer repeats (min 3) for cases whose calls are slow (default: %(default)s s)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole sweep; later cases are recorded as skipped")
    p.add_argument("--triton-interpreter", action="store_true",
                   help="on CPU, time the Triton backend under TRITON_INTERPRET=1 (slow; off by default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--quiet", action="store_true", help="do not print the markdown table")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any case errored")
    return p


def _resolve_device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA was requested but torch sees no GPU")
    return device


def collect_cases(ops: list[str], quick: bool, shapes_pattern: str | None, backends: list[str] | None):
    """All cases of the sweep, baseline first within a shape. The first ``PRIORITY_SHAPES``
    shapes of every op come before all other shapes, so a sweep cut short by ``--time-budget``
    still has every op's headline shapes."""
    from .cases import cases_for, filter_backends
    from .shapes import filter_shapes, shapes_for

    tiers: list[list] = [[], []]
    for op in ops:
        for index, shape in enumerate(filter_shapes(shapes_for(op, quick), shapes_pattern)):
            tiers[0 if index < PRIORITY_SHAPES else 1].extend(filter_backends(cases_for(op, shape), backends))
    return tiers[0] + tiers[1]


def run_bench_cli(argv: list[str] | None = None) -> int:
    """Entry point of ``kawhi-kernels bench``; returns the process exit status.

    argv: the bench options (a leading "--" is ignored). Writes into ``--out``: ``results.csv``
    (appended), ``report-<run_id>.md`` and two PNGs; prints the markdown table unless ``--quiet``.
    """
    from .cases import BenchContext
    from .env import run_metadata
    from .report import append_csv, write_outputs
    from .runner import SweepInterrupted, run_cases
    from .shapes import parse_ops

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        device = _resolve_device(args.device)
        ops = parse_ops(args.ops)
        backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
        cases = collect_cases(ops, args.quick, args.shapes, backends)
    except ValueError as exc:
        print(f"kawhi-kernels bench: error: {exc}", file=sys.stderr)
        return 2
    for name, value in (("repeats", args.repeats), ("copies", args.copies)):
        if value is not None and value < 1:
            print(f"kawhi-kernels bench: error: --{name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.list:
        for case in cases:
            print(case.label)
        return 0
    if not cases:
        print("kawhi-kernels bench: error: no case matches --ops/--shapes/--backends", file=sys.stderr)
        return 2

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    copies = args.copies or (2 if args.quick else 3)
    meta = run_metadata(device, dtype, "kawhi-kernels bench " + shlex.join(argv))
    ctx = BenchContext(device, dtype, copies, args.seed, allow_interpreter=args.triton_interpreter)
    out_dir = Path(args.out)
    csv_path = out_dir / "results.csv"
    try:
        append_csv(csv_path, [])  # header check before any work; rows are appended as they finish
    except ValueError as exc:
        print(f"kawhi-kernels bench: error: {exc}", file=sys.stderr)
        return 2

    def on_sigterm(signum, frame):
        raise SweepInterrupted(f"signal {signum}")

    try:  # SIGTERM (e.g. from `timeout`) ends the sweep early but still writes the report
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        records = run_cases(cases, ctx, meta, warmup=warmup, repeats=repeats,
                            max_case_seconds=args.max_case_seconds, time_budget=args.time_budget,
                            progress=not args.no_progress, on_record=lambda r: append_csv(csv_path, [r]))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    outputs = write_outputs(records, meta, out_dir, warmup=warmup, copies=copies,
                            plots=not args.no_plots, append=False)
    if not args.quiet:
        print(outputs["markdown_text"])
    print(f"results appended to {outputs['csv']}; report {outputs['markdown']}; plots "
          + (", ".join(str(p) for p in outputs["plots"]) or (outputs["plot_error"] or "skipped")),
          file=sys.stderr)
    errors = [r for r in records if r["status"].startswith("error")]
    return 1 if args.strict and errors else 0


if __name__ == "__main__":
    raise SystemExit(run_bench_cli())
