"""Lazy lookup of backend implementations, so that importing the package never imports Triton
or the compiled extension."""
from __future__ import annotations

import importlib
from typing import Callable


def load_implementation(path: str) -> Callable:
    """``"package.module:function"`` → the function."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
