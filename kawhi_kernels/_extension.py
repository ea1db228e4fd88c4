"""Lazy, failure-tolerant loading of the compiled extension ``kawhi_kernels._C``.

The extension is optional: every op has a pure-Python/PyTorch path. When the import fails the
error is kept so ``kawhi-kernels info`` can say why.
"""
from __future__ import annotations

import importlib
import threading
from types import ModuleType

_lock = threading.Lock()
_attempted = False
_module: ModuleType | None = None
_error: str | None = None


def load_extension() -> ModuleType | None:
    """Import ``kawhi_kernels._C`` once; return the module, or None when it cannot be imported.

    The import error (if any) is available from :func:`extension_error`.
    """
    global _attempted, _module, _error
    if _attempted:
        return _module
    with _lock:
        if not _attempted:
            try:
                _module = importlib.import_module("kawhi_kernels._C")
                _error = None
            except ImportError as exc:
                _module = None
                _error = f"{type(exc).__name__}: {exc}"
            _attempted = True
    return _module


def extension_available() -> bool:
    """True when ``kawhi_kernels._C`` imports."""
    return load_extension() is not None


def extension_error() -> str | None:
    """Why ``kawhi_kernels._C`` could not be imported (None when it imports)."""
    load_extension()
    return _error


def extension_info() -> dict:
    """Facts for ``kawhi-kernels info``: available, error, has_cuda, build_info and, for a CUDA
    build, the statically linked runtime's version (``cuda_runtime_version``, e.g. 13000)."""
    ext = load_extension()
    if ext is None:
        return {"available": False, "error": _error, "has_cuda": False, "build_info": None,
                "cuda_runtime_version": None}
    has_cuda = bool(ext.has_cuda())
    return {
        "available": True,
        "error": None,
        "has_cuda": has_cuda,
        "build_info": dict(ext.build_info()),
        "cuda_runtime_version": int(ext.cuda_runtime_version()) if has_cuda else None,
    }
