"""pytest-benchmark: SGUF key regions (select_key_regions) vs the NumPy/scikit-image pipeline."""
import pytest

from bench_params import bench_cases


@pytest.mark.parametrize("case", bench_cases("sguf"))
def test_sguf(case, run_benchmark):
    err = run_benchmark(case)
    if err is not None:
        assert err < 1e-3, f"descriptor max relative error {err:.3e} vs the fp64 NumPy pipeline"
