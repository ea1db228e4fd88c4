"""The native extension kawhi_kernels._C: it imports, exposes its API, is independent of
libtorch, and the CMake project configures/builds without CUDA."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from kawhi_kernels._extension import (
    extension_available,
    extension_error,
    extension_info,
    load_extension,
)

ROOT = Path(__file__).resolve().parents[1]


def _ext():
    ext = load_extension()
    if ext is None:
        pytest.fail(f"kawhi_kernels._C is not importable ({extension_error()}); "
                    "build it with `pip install -e .`")
    return ext


def test_extension_imports_and_exposes_api():
    ext = _ext()
    assert extension_available() and extension_error() is None
    for name in ("union_find_merge", "has_cuda", "build_info"):
        assert callable(getattr(ext, name)), name
    labels = ext.union_find_merge(np.zeros(4), np.zeros(4), np.array([0.0, 0, 50, 50]),
                                  2, 2, 0.5, 30.0, 1e-6)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 1, 1]


def test_build_info_is_consistent():
    ext = _ext()
    info = ext.build_info()
    assert {"compiler", "cuda", "archs", "build_type", "pybind11"} <= set(info)
    assert isinstance(info["compiler"], str) and info["compiler"] != "unknown"
    if ext.has_cuda():
        assert re.fullmatch(r"\d+\.\d+", info["cuda"])
        assert info["archs"] and all(re.fullmatch(r"(sm|compute)_\d+[a-z]?", a) for a in info["archs"])
        assert sum(a.startswith("compute_") for a in info["archs"]) == 1  # PTX for the highest only
        major, minor = (int(x) for x in info["cuda"].split("."))
        assert ext.cuda_runtime_version() == major * 1000 + minor * 10
        assert isinstance(ext.cuda_driver_version(), int)
    else:
        assert info["cuda"] is None and info["archs"] == []
        assert not hasattr(ext, "cuda_runtime_version")
    summary = extension_info()
    assert summary["available"] and summary["has_cuda"] == ext.has_cuda()


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("ldd") is None,
                    reason="ldd check is Linux-only")
def test_shared_object_does_not_link_torch_or_dynamic_cudart():
    ext = _ext()
    out = subprocess.run(["ldd", ext.__file__], capture_output=True, text=True, check=True).stdout
    for lib in ("libtorch", "libc10", "libpython"):
        assert lib not in out, f"{ext.__file__} links {lib}:\n{out}"
    if ext.has_cuda():
        assert "libcudart.so" not in out, f"CUDA runtime must be linked statically:\n{out}"


# ------------------------------------------------------------------------ the CMake project

def _cmake():
    if shutil.which("cmake") is None or importlib.util.find_spec("pybind11") is None:
        pytest.skip("cmake or pybind11 (build requirements) not installed")
    return shutil.which("cmake")


def _configure(build_dir: Path, env_updates: dict, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_updates}
    for k in [k for k, v in env_updates.items() if v is None]:
        env.pop(k)
    return subprocess.run(
        [_cmake(), "-S", str(ROOT), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}",
         f"-DKAWHI_OUTPUT_DIR={build_dir / 'out'}", *extra],
        capture_output=True, text=True, env=env)


def test_cmake_without_nvcc_builds_cpu_only_with_a_clear_message(tmp_path):
    # Hide every nvcc this machine has from CMake's search.
    hidden = {"/usr/local/cuda/bin"}
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and (Path(d) / "nvcc").exists():
            hidden.add(d)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            hidden.add(str(Path(os.environ[var]) / "bin"))
    res = _configure(tmp_path, {"KAWHI_CUDA": None, "CUDA_HOME": None, "CUDA_PATH": None,
                                "CUDACXX": None},
                     f"-DCMAKE_IGNORE_PATH={';'.join(sorted(hidden))}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "nvcc not found: building without CUDA kernels" in res.stdout + res.stderr


def test_cmake_cpu_only_build_imports(tmp_path):
    res = _configure(tmp_path, {"KAWHI_CUDA": "0"},
                     f"-DKAWHI_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "building without CUDA kernels" in res.stdout
    build = subprocess.run([_cmake(), "--build", str(tmp_path), "-j", str(os.cpu_count() or 1)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    built = list((tmp_path / "out").glob("_C*"))
    assert len(built) == 1
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import _C, numpy as np; "
             "assert not _C.has_cuda() and _C.build_info()['cuda'] is None; "
             "print(_C.union_find_merge(np.zeros(2), np.zeros(2), np.zeros(2), 1, 2, .5, 30., 1e-6))")
    run = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[0 0]"
