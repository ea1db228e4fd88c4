"""pytest-benchmark: cosine_alignment backends vs the materialising naive form."""
import pytest

from bench_params import bench_cases


@pytest.mark.parametrize("case", bench_cases("cosine_alignment"))
def test_cosine_alignment(case, run_benchmark):
    err = run_benchmark(case)
    if err is not None:
        assert err < 5e-2, f"max relative error {err:.3e} vs the fp64 reference"
