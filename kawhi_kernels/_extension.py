"""Lazy, failure-tolerant loading of the compiled extension ``_C``.

The extension is optional: every op has a pure-Python/PyTorch path. It comes from one of:

* the in-tree build ``kawhi_kernels._C`` (``pip install -e .`` / ``pip install .`` with nvcc or
  a C++ compiler present: the developer's build), or
* a native companion distribution, one per CUDA major: ``kawhi-kernels-cuda13`` (module
  ``kawhi_kernels_cuda13._C``) or ``kawhi-kernels-cuda12`` (``kawhi_kernels_cuda12._C``),
  installed as the extras ``kawhi-kernels[cuda13]`` / ``kawhi-kernels[cuda12]`` next to the
  pure-Python wheel.

The in-tree build wins when present. Of the companions, the first whose CUDA runtime can query
devices wins (so with both installed a CUDA 12 driver gets the CUDA 12 build), else the first
that imports. Why each candidate was or was not taken is kept for ``kawhi-kernels info``. For a
CUDA build, :func:`cuda_backend_problem` says whether its kernels can run on a given device (the
module links its own CUDA runtime, so it can fail where torch's CUDA works, e.g. with a driver
older than the runtime it was built with, or a GPU it has no code for).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import threading
from dataclasses import dataclass
from types import ModuleType

# (module, distribution, CUDA major of the companion; None for the in-tree build), in order of
# preference.
CANDIDATES: tuple[tuple[str, str, int | None], ...] = (
    ("kawhi_kernels._C", "kawhi-kernels (in-tree build)", None),
    ("kawhi_kernels_cuda13._C", "kawhi-kernels-cuda13", 13),
    ("kawhi_kernels_cuda12._C", "kawhi-kernels-cuda12", 12),
)


@dataclass(frozen=True)
class Candidate:
    """One place the native module may come from, and what happened when it was tried.

    ``status`` is "loaded", "not installed", "load error", "no usable CUDA runtime" (it imports
    but its CUDA runtime cannot query devices: no driver, or one older than that runtime; only
    decisive between companions) or "not tried" (a better candidate was loaded first).
    """

    module: str
    distribution: str
    cuda_major: int | None
    status: str
    reason: str | None = None


_lock = threading.Lock()
_attempted = False
_module: ModuleType | None = None
_error: str | None = None
_candidates: tuple[Candidate, ...] = ()
_chosen: Candidate | None = None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the companion package itself is absent
        return False


def _runtime_problem(module: ModuleType) -> str | None:
    """None when the module's CUDA runtime can count devices (or it has no CUDA code)."""
    if not module.has_cuda():
        return None
    try:
        module.cuda_device_count()
    except RuntimeError as exc:
        driver = module.cuda_driver_version()
        return (f"its CUDA {module.build_info()['cuda']} runtime cannot query devices: {exc} "
                f"(driver version {driver or 'none'})")
    return None


def find_native_module(candidates=CANDIDATES):
    """Try ``candidates`` ((module, distribution, cuda_major) triples) in order; return
    (module or None, the Candidate it came from or None, every Candidate tried, error text or
    None). Imports modules but keeps no state (``load_extension`` caches its answer)."""
    tried: list[Candidate] = []
    imported: list[tuple[ModuleType, Candidate]] = []
    for name, dist, major in candidates:
        if _chosen_now(imported):
            tried.append(Candidate(name, dist, major, "not tried"))
            continue
        if not _installed(name):
            tried.append(Candidate(name, dist, major, "not installed"))
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            tried.append(Candidate(name, dist, major, "load error", f"{type(exc).__name__}: {exc}"))
            continue
        problem = None if major is None else _runtime_problem(module)  # in-tree build: always
        cand = Candidate(name, dist, major, "no usable CUDA runtime" if problem else "loaded",
                         problem)
        imported.append((module, cand))
        tried.append(cand)
    usable = [(m, c) for m, c in imported if c.status == "loaded"]
    pick = usable[0] if usable else (imported[0] if imported else None)
    if pick is None:
        error = "; ".join(f"{c.module}: {c.status}{' (' + c.reason + ')' if c.reason else ''}"
                          for c in tried)
        return None, None, tuple(tried), error
    return pick[0], pick[1], tuple(tried), None


def _load() -> None:
    global _module, _error, _candidates, _chosen
    _module, _chosen, _candidates, _error = find_native_module()


def _chosen_now(imported) -> bool:
    """A usable candidate was already imported: later ones are not tried."""
    return any(c.status == "loaded" for _, c in imported)


def load_extension() -> ModuleType | None:
    """Import the native module once (see the module docstring for where it comes from); return
    it, or None when no candidate imports. Why is available from :func:`extension_error` and
    :func:`extension_candidates`.
    """
    global _attempted
    if _attempted:
        return _module
    with _lock:
        if not _attempted:
            _load()
            _attempted = True
    return _module


def extension_candidates() -> tuple[Candidate, ...]:
    """Every place the native module was looked for, in order, with what happened there."""
    load_extension()
    return _candidates


def extension_available() -> bool:
    """True when a native module (in-tree or companion) imports."""
    return load_extension() is not None


def extension_error() -> str | None:
    """Why no native module could be imported (None when one imports)."""
    load_extension()
    return _error


def extension_info() -> dict:
    """Facts for ``kawhi-kernels info``: available, error, has_cuda, build_info, where the module
    came from (``module``, ``distribution``, ``cuda_major``: None for the in-tree build), every
    candidate tried (``candidates``) and, for a CUDA build, the statically linked runtime's
    version (``cuda_runtime_version``, e.g. 13000), the number of devices that runtime sees
    (``cuda_device_count``, None when the query fails) and why the CUDA kernels cannot run on the
    current device (``cuda_problem``, None when they can).
    """
    ext = load_extension()
    where = {"module": None, "distribution": None, "cuda_major": None,
             "candidates": list(_candidates)}
    if ext is None:
        return {"available": False, "error": _error, "has_cuda": False, "build_info": None,
                "cuda_runtime_version": None, "cuda_device_count": None,
                "cuda_problem": "no compiled extension is importable", **where}
    where.update(module=_chosen.module, distribution=_chosen.distribution,
                 cuda_major=_chosen.cuda_major)
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
        **where,
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
        return f"no compiled extension is importable ({_error})"
    if not ext.has_cuda():
        return (f"{ext.__name__} was built without CUDA (nvcc was not found at build time; "
                "pip install 'kawhi-kernels[cuda12]' or '[cuda13]' for prebuilt kernels)")
    info = ext.build_info()
    try:
        count = int(ext.cuda_device_count())
    except RuntimeError as exc:
        driver = ext.cuda_driver_version()
        if not driver:                       # cudaDriverGetVersion reports 0: no driver loaded
            return "no NVIDIA GPU driver on this machine (the CUDA kernels need a GPU)"
        return (f"the CUDA runtime linked into {ext.__name__} (CUDA {info['cuda']}) cannot "
                f"query devices: {exc} (driver version {driver}: update the driver or install "
                "a build for an older CUDA, e.g. pip install 'kawhi-kernels[cuda12]')")
    if device_index < 0 or device_index >= count:
        return (f"{ext.__name__} sees {count} CUDA device(s); device index {device_index} "
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
