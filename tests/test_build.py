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
        for name in ("cuda_device_count", "cuda_device_capability", "attention_mass",
                     "cosine_alignment", "sguf_descriptors"):
            assert callable(getattr(ext, name)), name
    else:
        assert info["cuda"] is None and info["archs"] == []
        assert not hasattr(ext, "cuda_runtime_version")
        assert not hasattr(ext, "attention_mass")
    assert callable(ext.validate)  # host-side argument checks exist in every build
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


def _hidden_nvcc_dirs() -> set[str]:
    hidden = {"/usr/local/cuda/bin"}
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and (Path(d) / "nvcc").exists():
            hidden.add(d)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            hidden.add(str(Path(os.environ[var]) / "bin"))
    return hidden


def test_cmake_with_cuda_required_fails_without_nvcc(tmp_path):
    res = _configure(tmp_path, {"KAWHI_CUDA": "1", "CUDA_HOME": None, "CUDA_PATH": None,
                                "CUDACXX": None},
                     f"-DCMAKE_IGNORE_PATH={';'.join(sorted(_hidden_nvcc_dirs()))}")
    assert res.returncode != 0
    assert "nvcc not found" in res.stdout + res.stderr


def test_cmake_rejects_an_unknown_kawhi_cuda_value(tmp_path):
    res = _configure(tmp_path, {"KAWHI_CUDA": "maybe"})
    assert res.returncode != 0
    assert "KAWHI_CUDA='maybe': expected AUTO, 0/OFF or 1/ON" in res.stdout + res.stderr


def _nvcc() -> str | None:
    for d in [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]:
        if d and (Path(d) / "bin" / "nvcc").exists():
            return str(Path(d) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None or os.environ.get("KAWHI_CUDA", "").upper() in
                    ("0", "OFF", "FALSE", "NO", "N"),
                    reason="nvcc not found, or CUDA disabled with KAWHI_CUDA=0")
def test_installed_module_has_cuda_kernels_where_nvcc_exists():
    # The CUDA build is silently skipped when nvcc cannot compile; where nvcc exists that is a
    # failure (CUDA compile of tests/test_cuda_backend.py covers a one-arch build separately).
    ext = _ext()
    assert ext.has_cuda(), f"nvcc at {_nvcc()} but {ext.__file__} was built without CUDA"
    assert len([a for a in ext.build_info()["archs"] if a.startswith("sm_")]) >= 1


# ------------------------------------------------------------------------ wheel tooling

def _setup_version(label: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("KAWHI_LOCAL_VERSION", None)
    if label is not None:
        env["KAWHI_LOCAL_VERSION"] = label
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def test_setup_version_takes_the_local_label_from_the_environment():
    import kawhi_kernels

    plain = _setup_version(None)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip().splitlines()[-1] == kawhi_kernels.__version__
    labelled = _setup_version("cu130")
    assert labelled.stdout.strip().splitlines()[-1] == f"{kawhi_kernels.__version__}+cu130"
    bad = _setup_version("cu 13")
    assert bad.returncode != 0 and "is not a PEP 440 local version label" in bad.stderr


def _check_archs_module():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_cuda_archs
    finally:
        sys.path.pop(0)
    return check_cuda_archs


LIST_ELF = """ELF file    1: _C.cpython-311-x86_64-linux-gnu.1.sm_80.cubin
ELF file    2: _C.cpython-311-x86_64-linux-gnu.2.sm_90.cubin
ELF file    3: _C.cpython-311-x86_64-linux-gnu.3.sm_90a.cubin
"""
LIST_PTX = "PTX file    1: _C.cpython-311-x86_64-linux-gnu.1.sm_90.ptx\n"


def test_check_cuda_archs_parsing():
    m = _check_archs_module()
    assert m.parse_archs("80; 86,90a") == ["sm_80", "sm_86", "sm_90a"]
    with pytest.raises(ValueError, match="'sm90' is not an SM number"):
        m.parse_archs("sm90")
    assert m.elf_archs(LIST_ELF) == {"sm_80", "sm_90", "sm_90a"}
    assert m.ptx_archs(LIST_PTX) == {"sm_90"}


def test_check_cuda_archs_fails_for_a_missing_arch(tmp_path, capsys):
    m = _check_archs_module()
    fake = tmp_path / "cuobjdump"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --list-elf ]; then cat <<'E'\n" + LIST_ELF
                    + "E\nelse cat <<'E'\n" + LIST_PTX + "E\nfi\n")
    fake.chmod(0o755)
    so = tmp_path / "_C.so"
    so.write_bytes(b"")
    assert m.main([str(so), "--archs", "80;90", "--cuobjdump", str(fake)]) == 0
    assert m.main([str(so), "--archs", "80;86;90", "--cuobjdump", str(fake)]) == 1
    assert "no SASS for requested architecture(s) ['sm_86']" in capsys.readouterr().err
    assert m.main([str(tmp_path / "missing.so"), "--archs", "90", "--cuobjdump", str(fake)]) == 2


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed")
def test_check_cuda_archs_dependency_check_on_the_built_module():
    m = _check_archs_module()
    needed = m.needed_libraries(_ext().__file__)
    assert needed and not [lib for lib in needed if lib.startswith(m._FORBIDDEN_NEEDED)]


def test_build_wheel_script_rejects_bad_arguments(tmp_path):
    script = ROOT / "tools" / "build_wheel.sh"
    res = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown argument '--bogus'" in res.stderr
    res = subprocess.run(["bash", str(script), "--cuda-home", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and f"no executable {tmp_path}/bin/nvcc" in res.stderr
    res = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--cuda-home" in res.stdout
