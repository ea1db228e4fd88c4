"""Benchmark suite of kawhi_kernels (``kawhi-kernels bench``).

Modules: ``shapes`` (named shapes, head configs), ``inputs`` (synthetic packed inputs),
``baselines`` (naive / flex / flash / NumPy-SGUF baselines), ``accuracy`` (fp64 references and the
error metric), ``cases`` (one builder per op and backend), ``timing`` (CUDA events or perf_counter,
peak memory), ``runner`` (status handling: ok / OOM / unavailable / error), ``report`` (CSV,
markdown, PNG) and ``cli`` (:func:`run_bench_cli`). See benchmarks/README.md.
"""
from .cases import BenchContext, Case, Prepared, Unavailable, cases_for
from .report import CSV_COLUMNS, append_csv, markdown_report, plot_vs_seq_len, read_csv, write_outputs
from .runner import run_case, run_cases
from .shapes import HEAD_CONFIGS, OPS, AttentionShape, CosineShape, KawhiShape, SgufShape, shapes_for
from .timing import Timing, peak_extra_mib, time_calls



def run_bench_cli(argv: list[str] | None = None) -> int:
    """``kawhi-kernels bench`` entry point (see :func:`kawhi_kernels.bench.cli.run_bench_cli`)."""
    from .cli import run_bench_cli as _run

    return _run(argv)


__all__ = [
    "AttentionShape", "BenchContext", "CSV_COLUMNS", "Case", "CosineShape", "HEAD_CONFIGS", "KawhiShape",
    "OPS", "Prepared", "SgufShape", "Timing", "Unavailable", "append_csv", "cases_for", "markdown_report",
    "peak_extra_mib", "plot_vs_seq_len", "read_csv", "run_bench_cli", "run_case", "run_cases", "shapes_for",
    "time_calls", "write_outputs",
]
