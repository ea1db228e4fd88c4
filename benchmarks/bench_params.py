"""Case parameters shared by the pytest-benchmark files (see conftest.py for the variables)."""
import os

import pytest
import torch

from kawhi_kernels.bench.cases import cases_for
from kawhi_kernels.bench.shapes import filter_shapes, shapes_for

FULL = os.environ.get("KAWHI_BENCH_FULL", "0") == "1"
DEVICE = torch.device(os.environ.get("KAWHI_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def bench_cases(op):
    """pytest params (one per case of ``op``) for the selected shapes, ids = case labels."""
    shapes = filter_shapes(shapes_for(op, quick=not FULL), os.environ.get("KAWHI_BENCH_SHAPES"))
    return [pytest.param(case, id=case.label.split("/", 1)[1])
            for shape in shapes for case in cases_for(op, shape)]
