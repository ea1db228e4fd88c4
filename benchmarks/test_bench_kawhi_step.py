"""pytest-benchmark: one KAWHI step on a random Qwen2.5-VL forward, with and without capture."""
import pytest

from bench_params import bench_cases


@pytest.mark.parametrize("case", bench_cases("kawhi_step"))
def test_kawhi_step(case, run_benchmark):
    err = run_benchmark(case)
    if case.backend == "forward+capture":
        assert err == 0.0, "capturing q/k changed the logits"
