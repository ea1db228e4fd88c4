"""Lazy, failure-tolerant loading of the compiled extension ``kawhi_kernels._C``.

The extension is optional: every op has a pure-Python/PyTorch path. When the import fails the
error is kept so ``kawhi-kernels info`` can say why. For a CUDA build,
:func:`cuda_backend_problem` says whether its kernels can run on a given device (the module
links its own CUDA runtime, so it can fail where torch's CUDA works, e.g. with a driver older
than the runtime it was built with, or a GPU it has no code for).
"""
from __future__ import annotations

import functools
import importlib
import re
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
    build, the statically linked runtime's version (``cuda_runtime_version``, e.g. 13000), the
    number of devices that runtime sees (``cuda_device_count``, None when the query fails) and
    why the CUDA kernels cannot run on the current device (``cuda_problem``, None when they can).
    """
    ext = load_extension()
    if ext is None:
        return {"available": False, "error": _error, "has_cuda": False, "build_info": None,
                "cuda_runtime_version": None, "cuda_device_count": None,
                "cuda_problem": "the compiled extension kawhi_kernels._C is not importable"}
    has_cuda = bool(ext.has_cuda())
    count = None
    if has_cuda:
        try:
            count = int(ext.cuda_device_count())
        except RuntimeError:
            count = None
    return {
        "available": True,
        "error": None,
        "has_cuda": has_cuda,
        "build_info": dict(ext.build_info()),
        "cuda_runtime_version": int(ext.cuda_runtime_version()) if has_cuda else None,
        "cuda_device_count": count,
        "cuda_problem": cuda_backend_problem(0),
    }


_ARCH = re.compile(r"(sm|compute)_(\d+)([a-z]?)")


def arch_covers(capability: int, archs) -> bool:
    """True when a build with targets ``archs`` (``build_info()["archs"]``: "sm_XY" SASS,
    "compute_XY" PTX, optional "a"/"f" suffix) can run on a device of compute capability
    ``capability`` (major * 10 + minor, e.g. 90).

    SASS for sm_XY (and the family variant sm_XYf) runs on the same major with minor >= Y; an
    architecture-specific sm_XYa only on exactly XY. Plain PTX compute_XY is JIT-compiled by the
    driver for any capability >= XY; compute_XYa/f follow the rules of their SASS twins.
    """
    for arch in archs:
        m = _ARCH.fullmatch(str(arch))
        if m is None:
            continue
        kind, number, suffix = m.group(1), int(m.group(2)), m.group(3)
        if suffix == "a":
            ok = capability == number
        elif suffix == "f" or kind == "sm":
            ok = capability // 10 == number // 10 and capability >= number
        else:  # plain PTX
            ok = capability >= number
        if ok:
            return True
    return False


def cuda_backend_problem(device_index: int) -> str | None:
    """None when the CUDA kernels of ``kawhi_kernels._C`` can launch on CUDA device
    ``device_index``, else a human-readable reason: the extension does not import, was built
    without CUDA, its runtime cannot query devices (no driver, or one too old for the runtime
    it links), the device does not exist, or the build has no code for its compute capability.
    The answer is computed once per device index."""
    return _cuda_backend_problem(int(device_index))


@functools.lru_cache(maxsize=None)
def _cuda_backend_problem(device_index: int) -> str | None:
    ext = load_extension()
    if ext is None:
        return f"the compiled extension kawhi_kernels._C is not importable ({_error})"
    if not ext.has_cuda():
        return "kawhi_kernels._C was built without CUDA (nvcc was not found at build time)"
    info = ext.build_info()
    try:
        count = int(ext.cuda_device_count())
    except RuntimeError as exc:
        driver = ext.cuda_driver_version()
        if not driver:                       # cudaDriverGetVersion reports 0: no driver loaded
            return "no NVIDIA GPU driver on this machine (the CUDA kernels need a GPU)"
        return (f"the CUDA runtime linked into kawhi_kernels._C (CUDA {info['cuda']}) cannot "
                f"query devices: {exc} (driver version {driver}: update the driver or install "
                "a build for an older CUDA)")
    if device_index < 0 or device_index >= count:
        return (f"kawhi_kernels._C sees {count} CUDA device(s); device index {device_index} "
                "is not one of them")
    try:
        capability = int(ext.cuda_device_capability(device_index))
    except RuntimeError as exc:
        return f"cannot read the compute capability of CUDA device {device_index}: {exc}"
    if not arch_covers(capability, info["archs"]):
        return (f"CUDA device {device_index} has compute capability {capability // 10}."
                f"{capability % 10}, which this build has no code for (targets "
                f"{', '.join(info['archs'])}); rebuild with KAWHI_CUDA_ARCHS including "
                f"{capability}")
    return None
