"""pytest-benchmark: grid_pyramid backends (torch reference, Triton, CUDA) and a read/write bound."""
import pytest

from bench_params import bench_cases


@pytest.mark.parametrize("case", bench_cases("grid_pyramid"))
def test_grid_pyramid(case, run_benchmark):
    err = run_benchmark(case)
    if err is not None:
        assert err < 1e-4, f"max relative error {err:.3e} vs the fp64 reference"
