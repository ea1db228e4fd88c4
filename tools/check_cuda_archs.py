#!/usr/bin/env python3
"""Check that a built kawhi_kernels extension holds SASS for every requested GPU architecture.

Runs ``cuobjdump --list-elf`` (and ``--list-ptx``) on the shared object, and fails (exit 1) when
an architecture of ``--archs`` has no ELF (SASS) image, or, with ``--check-deps``, when the
module links libtorch/libc10 or a dynamic CUDA runtime. Prints a one-line summary per check.

cuobjdump is looked up in this order: ``--cuobjdump``, ``$CUDA_HOME/bin``, ``PATH``, then the
``nvidia/cu*/bin`` folders of the running Python's site-packages and other ``sys.path`` entries
(PyPI package ``nvidia-cuda-cuobjdump``).

Usage:
    python tools/check_cuda_archs.py path/to/_C.so --archs "80;86;89;90" [--check-deps]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

_ELF = re.compile(r"\.(sm_\d+[a-z]?)\.cubin\b")
_PTX = re.compile(r"\.(sm_\d+[a-z]?)\.ptx\b")
_FORBIDDEN_NEEDED = ("libtorch", "libc10", "libcudart.so")


def parse_archs(spec: str) -> list[str]:
    """ "80;86, 90a" -> ["sm_80", "sm_86", "sm_90a"] (commas, semicolons or spaces separate)."""
    out = []
    for item in re.split(r"[;, ]+", spec.strip()):
        if not item:
            continue
        if not re.fullmatch(r"\d+[a-z]?", item):
            raise ValueError(f"--archs: '{item}' is not an SM number like 80 or 90a")
        out.append(f"sm_{item}")
    if not out:
        raise ValueError("--archs: expected at least one architecture")
    return out


def elf_archs(listing: str) -> set[str]:
    """Architectures of the ELF (SASS) images in ``cuobjdump --list-elf`` output."""
    return set(_ELF.findall(listing))


def ptx_archs(listing: str) -> set[str]:
    """Architectures of the PTX images in ``cuobjdump --list-ptx`` output."""
    return set(_PTX.findall(listing))


def find_cuobjdump(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() else None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "cuobjdump").is_file():
        return str(Path(cuda_home) / "bin" / "cuobjdump")
    found = shutil.which("cuobjdump")
    if found:
        return found
    # site-packages first, then the rest of sys.path (directories a .pth file added, e.g. the
    # dependency layer of tools/check_wheels.sh)
    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             *getattr(site, "getsitepackages", lambda: [])(), *(p for p in sys.path if p)]
    for root in dict.fromkeys(roots):
        for candidate in sorted(Path(root).glob("nvidia/cu*/bin/cuobjdump")):
            return str(candidate)
    return None


def needed_libraries(so: str) -> list[str]:
    """DT_NEEDED entries of a shared object (readelf -d)."""
    out = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def run(cuobjdump: str, flag: str, so: str) -> str:
    res = subprocess.run([cuobjdump, flag, so], capture_output=True, text=True)
    if res.returncode != 0 and "does not contain" not in (res.stdout + res.stderr):
        raise RuntimeError(f"{cuobjdump} {flag} {so} failed ({res.returncode}):\n"
                           f"{res.stdout}{res.stderr}")
    return res.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared_object")
    parser.add_argument("--archs", required=True, help='requested SM list, e.g. "80;86;89;90"')
    parser.add_argument("--cuobjdump", help="path of cuobjdump (default: searched)")
    parser.add_argument("--check-deps", action="store_true",
                        help="also fail when the module links libtorch/libc10/libcudart.so")
    args = parser.parse_args(argv)

    try:
        requested = parse_archs(args.archs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    so = args.shared_object
    if not Path(so).is_file():
        print(f"error: {so}: no such file", file=sys.stderr)
        return 2
    tool = find_cuobjdump(args.cuobjdump)
    if tool is None:
        print("error: cuobjdump not found (pass --cuobjdump, set CUDA_HOME, or "
              "pip install nvidia-cuda-cuobjdump into this Python)", file=sys.stderr)
        return 2

    elf = elf_archs(run(tool, "--list-elf", so))
    ptx = ptx_archs(run(tool, "--list-ptx", so))
    print(f"{so}: SASS {sorted(elf) or 'none'}, PTX {sorted(ptx) or 'none'} (cuobjdump: {tool})")
    status = 0
    missing = [a for a in requested if a not in elf]
    if missing:
        print(f"FAIL: no SASS for requested architecture(s) {missing}", file=sys.stderr)
        status = 1
    else:
        print(f"OK: SASS for every requested architecture {requested}")
    if args.check_deps:
        needed = needed_libraries(so)
        bad = [lib for lib in needed if lib.startswith(_FORBIDDEN_NEEDED)]
        if bad:
            print(f"FAIL: links {bad} (needed: {needed})", file=sys.stderr)
            status = 1
        else:
            print(f"OK: no libtorch/libc10/dynamic libcudart (needed: {needed})")
    return status


if __name__ == "__main__":
    sys.exit(main())
