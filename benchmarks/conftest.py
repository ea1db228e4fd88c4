"""pytest-benchmark harness over the suite's cases (``pytest benchmarks/ --benchmark-only``).

Environment variables:
    KAWHI_BENCH_FULL=1       full (GPU) shapes instead of the quick tiny ones
    KAWHI_BENCH_SHAPES=REGEX only shapes whose name matches
    KAWHI_BENCH_DEVICE=cpu   device (default: cuda if available, else cpu)
The sweep CLI (``kawhi-kernels bench``) is the main tool: it also records OOM/unavailable rows,
memory and accuracy in one CSV; these files give pytest-benchmark statistics of the same cases.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kawhi_kernels.bench.cases import BenchContext, Unavailable  # noqa: E402
from kawhi_kernels.bench.runner import is_oom  # noqa: E402
from kawhi_kernels.bench.timing import peak_extra_mib, synchronize  # noqa: E402

from bench_params import DEVICE, FULL  # noqa: E402


@pytest.fixture(scope="session")
def bench_ctx():
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    ctx = BenchContext(DEVICE, dtype, copies=3 if FULL else 2)
    yield ctx
    ctx.release()


@pytest.fixture
def run_benchmark(benchmark, bench_ctx):
    """run_benchmark(case): build the case (skip when unavailable or out of memory), time it with
    pytest-benchmark (inputs rotated, device synchronised after every call) and store peak memory,
    max relative error and the note in ``extra_info``."""
    def run(case):
        try:
            prepared = case.build(bench_ctx)
        except Unavailable as exc:
            pytest.skip(f"unavailable: {exc}")
        calls = {"n": 0}

        def call():
            out = prepared.run(calls["n"] % prepared.copies)
            calls["n"] += 1
            synchronize(bench_ctx.device)
            return out

        try:
            benchmark.pedantic(call, rounds=5 if FULL else 3, warmup_rounds=2 if FULL else 1, iterations=1)
            out, peak = peak_extra_mib(prepared.run, bench_ctx.device)
        except Exception as exc:
            if is_oom(exc):
                pytest.skip(f"OOM: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise
        err = prepared.check(out) if prepared.check is not None else None
        benchmark.extra_info.update(device=str(bench_ctx.device), dtype=str(bench_ctx.dtype),
                                    peak_mib=peak, max_rel_err=err, note=prepared.note)
        return err
    return run
