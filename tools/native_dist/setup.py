"""Build script of a native companion distribution (kawhi-kernels-cudaNN).

tools/build_wheel.sh lays out a source tree holding this file, the generated pyproject.toml, the
package kawhi_kernels_cudaNN/, CMakeLists.txt, csrc/ and the main project's setup.py renamed
kawhi_build.py, whose CMake build is reused as it is: the module is the same ``_C``, written into
the companion package instead of kawhi_kernels/.
"""
from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kawhi_build import CMakeBuild, CMakeExtension  # noqa: E402  (the main project's setup.py)

packages = sorted(p.parent.name for p in HERE.glob("kawhi_kernels_cuda*/__init__.py"))
if len(packages) != 1:
    raise RuntimeError(f"expected one kawhi_kernels_cudaNN package in {HERE}, found {packages}")

setup(
    ext_modules=[CMakeExtension(f"{packages[0]}._C", HERE)],
    cmdclass={"build_ext": CMakeBuild},
)
