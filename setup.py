"""Build script: drives CMake to build the native extension ``kawhi_kernels._C``.

Metadata lives in pyproject.toml; this file only declares the CMake-built extension. The
companion distributions' setup script (tools/native_dist/setup.py) imports CMakeExtension and
CMakeBuild from here, so setup() runs only when this file is the script.

Environment variables:
    KAWHI_CUDA=0          build without CUDA kernels even when nvcc is available
    KAWHI_CUDA=1          require the CUDA kernels (fail when nvcc is missing or broken)
    KAWHI_PURE=1          build no native module at all: the pure-Python py3-none-any wheel
                          (tools/build_wheel.sh); the native module then comes from a companion
                          distribution kawhi-kernels-cuda12/13 (tools/native_dist/)
    KAWHI_LOCAL_VERSION   PEP 440 local version label appended to the version, e.g. "cu130"
                          gives 0.1.0+cu130 (for private builds only: public indexes refuse it)
    KAWHI_CUDA_ARCHS      SM list for CUDA code (default: the GPUs nvidia-smi sees, else
                          "80;86;89;90"; PTX for the highest)
    KAWHI_BUILD_DIR       CMake build folder (default build/cmake-<python>-<cfg> in the source tree,
                          kept between installs so unchanged sources are not recompiled)
    CUDA_HOME             where to look for bin/nvcc first (then PATH, then /usr/local/cuda)
    CMAKE_BUILD_PARALLEL_LEVEL   parallel compile jobs (default: number of CPUs)
    CMAKE_GENERATOR       CMake generator (default: Ninja when available, else CMake's default)
    KAWHI_CMAKE_ARGS      extra arguments for the CMake configure step (shell-split)
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _native_sources() -> list[str]:
    """Files the native build reads, relative to the project root (listed so sdists carry them)."""
    files = ["CMakeLists.txt"]
    csrc = ROOT / "csrc"
    if csrc.is_dir():
        files += sorted(p.relative_to(ROOT).as_posix() for p in csrc.rglob("*")
                        if p.is_file() and p.suffix in {".cpp", ".cu", ".h", ".cuh", ".hpp"})
    return files


def _version() -> str:
    """``kawhi_kernels.__version__`` plus the local label from KAWHI_LOCAL_VERSION, if set."""
    init = (ROOT / "kawhi_kernels" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', init, re.M)
    if match is None:
        raise RuntimeError("kawhi_kernels/__init__.py defines no __version__ = \"...\"")
    version = match.group(1)
    label = os.environ.get("KAWHI_LOCAL_VERSION", "").strip()
    if label:
        if not re.fullmatch(r"[a-z0-9]+(\.[a-z0-9]+)*", label):
            raise RuntimeError(f"KAWHI_LOCAL_VERSION={label!r} is not a PEP 440 local version "
                               "label (lowercase letters and digits separated by dots, e.g. cu130)")
        version += "+" + label
    return version


class CMakeExtension(Extension):
    """An extension whose build is delegated to the CMake project in ``sourcedir``."""

    def __init__(self, name: str, sourcedir: Path) -> None:
        super().__init__(name, sources=_native_sources())
        self.sourcedir = Path(sourcedir).resolve()


class CMakeBuild(build_ext):
    """Configure and build the CMake project, writing the module where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        ext_path.parent.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        build_temp = _persistent_build_dir(ext, cfg) or Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        _choose_cuda_archs()

        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ext_path.suffix
        configure = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DKAWHI_OUTPUT_DIR={ext_path.parent}",
            f"-DKAWHI_EXT_SUFFIX={suffix}",
        ]
        try:  # the pybind11 of this interpreter (build requirement), if CMake cannot find one
            import pybind11

            configure.append(f"-Dpybind11_DIR={_stable_pybind11_dir(pybind11, build_temp)}")
        except ImportError:
            pass
        if not os.environ.get("CMAKE_GENERATOR") and shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        configure += shlex.split(os.environ.get("KAWHI_CMAKE_ARGS", ""))

        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        cmake = _cmake_executable()
        cache = build_temp / "CMakeCache.txt"
        if cache.exists() and _cached_source_dir(cache) != str(ext.sourcedir):
            cache.unlink()  # a build dir configured for another checkout
        _forget_cache_if_options_changed(build_temp, configure)
        subprocess.run([cmake, "-S", str(ext.sourcedir), "-B", str(build_temp), *configure],
                       check=True)
        subprocess.run([cmake, "--build", str(build_temp), "--config", cfg, "-j", jobs],
                       check=True)
        if not ext_path.exists():
            raise RuntimeError(f"CMake finished but {ext_path} was not produced")


def _persistent_build_dir(ext: Extension, cfg: str) -> Path | None:
    """``build/cmake-<python>-<cfg>`` in the source tree (or KAWHI_BUILD_DIR), kept between
    installs so that reinstalling (e.g. with other extras) recompiles only changed sources.
    None (setuptools' temporary dir) when the source tree is not writable."""
    chosen = os.environ.get("KAWHI_BUILD_DIR", "").strip()
    path = Path(chosen) if chosen else ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{cfg.lower()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path.resolve() if os.access(path, os.W_OK) else None


def _stable_pybind11_dir(pybind11, build_dir: Path) -> str:
    """pybind11's CMake dir, copied once per pybind11 version into the build dir: pip's isolated
    build environment lives at a new temporary path on every install, and a changed include path
    would make CMake recompile every source."""
    package = Path(pybind11.__file__).resolve().parent
    cmake_dir = Path(pybind11.get_cmake_dir()).resolve()
    copy = build_dir / f"pybind11-{pybind11.__version__}"
    if not copy.exists():
        partial = copy.parent / (copy.name + ".partial")
        shutil.copytree(package, partial, dirs_exist_ok=True)
        partial.rename(copy)
    return str(copy / cmake_dir.relative_to(package))


def _visible_gpu_archs() -> list[str]:
    """Compute capabilities of the GPUs nvidia-smi sees, as SM numbers ("90"); [] without any."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    archs = sorted({line.strip().replace(".", "") for line in out.splitlines() if line.strip()})
    return [a for a in archs if a.isdigit()]


def _choose_cuda_archs() -> None:
    """PyTorch's convention: device code for the GPUs this machine can see, else the default
    list. KAWHI_CUDA_ARCHS, when set, always wins. Says which in one line (pip shows it with -v,
    and in the build log)."""
    if os.environ.get("KAWHI_CUDA_ARCHS", "").strip() or os.environ.get("KAWHI_CUDA") == "0":
        return
    archs = _visible_gpu_archs()
    if archs:
        os.environ["KAWHI_CUDA_ARCHS"] = ";".join(archs)
        print(f"kawhi-kernels: building CUDA code for the visible GPU(s): sm_{', sm_'.join(archs)} "
              "(set KAWHI_CUDA_ARCHS to choose)", file=sys.stderr)
    else:
        print("kawhi-kernels: no GPU visible; building CUDA code for sm_80, sm_86, sm_89, sm_90 "
              "(about 30 s on 2 cores; KAWHI_CUDA_ARCHS=90 builds one arch, KAWHI_CUDA=0 none)",
              file=sys.stderr)


def _forget_cache_if_options_changed(build_dir: Path, configure: list[str]) -> None:
    """Drop the CMake cache of a persistent build dir when the options it was configured with
    changed (arch list, CUDA on/off, CUDA_HOME, configure arguments): cached values such as the
    CUDA architectures would otherwise outlive the change. Objects are still reused where their
    compile commands did not change."""
    # The output dir is a new temporary folder on every pip install: not an option that should
    # discard the cache.
    stable = [arg for arg in configure if not arg.startswith("-DKAWHI_OUTPUT_DIR=")]
    options = {"configure": stable, **{name: os.environ.get(name, "") for name in
               ("KAWHI_CUDA", "KAWHI_CUDA_ARCHS", "CUDA_HOME", "KAWHI_CMAKE_ARGS")}}
    stamp = build_dir / "kawhi-options.txt"
    text = repr(sorted(options.items()))
    if stamp.exists() and stamp.read_text() != text:
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
    stamp.write_text(text)


def _cmake_executable() -> str:
    """The cmake from the `cmake` build requirement when installed, else the one on PATH."""
    try:
        import cmake

        candidate = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if candidate.exists():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("cmake")
    if found is None:
        raise RuntimeError("cmake >= 3.24 is required to build kawhi_kernels._C: pip install cmake")
    return found


def _cached_source_dir(cache: Path) -> str | None:
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:INTERNAL="):
            return str(Path(line.split("=", 1)[1]).resolve())
    return None


def _ext_modules() -> list[Extension]:
    if os.environ.get("KAWHI_PURE", "").strip() == "1":
        return []
    return [CMakeExtension("kawhi_kernels._C", ROOT)]


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__
    setup(
        version=_version(),
        ext_modules=_ext_modules(),
        cmdclass={"build_ext": CMakeBuild},
    )
