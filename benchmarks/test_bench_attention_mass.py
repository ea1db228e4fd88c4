"""pytest-benchmark: attention_mass backends and baselines (naive, torch, triton, cuda, ± lse,
flex_attention, flash forward yardstick, flash-colreduce) on the suite's shapes."""
import pytest

from bench_params import bench_cases


@pytest.mark.parametrize("case", bench_cases("attention_mass"))
def test_attention_mass(case, run_benchmark):
    err = run_benchmark(case)
    if err is not None:
        assert err < 5e-2, f"max relative error {err:.3e} vs the fp64 reference"
