"""Lazy lookup of backend implementations, so that importing the package never imports Triton
or the compiled extension."""
from __future__ import annotations

import importlib
from typing import Callable


def load_implementation(path: str) -> Callable:
    """``"package.module:function"`` → the function."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def implementation_for(implementations: dict[str, str], backend: str, dtype) -> Callable:
    """The backend's function; float64 inputs always go to the torch reference (the fused
    kernels compute in fp32, and fp64 exists for exact checks, not for speed)."""
    import torch

    if dtype == torch.float64:
        backend = "torch"
    return load_implementation(implementations[backend])
