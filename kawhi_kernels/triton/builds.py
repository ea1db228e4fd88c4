"""Static GPU checks of the Triton kernels, without a GPU: compile every configuration the
launchers can choose for a GPU arch and read the cubin's resources and SASS.

Each kernel module lists its own configurations (``kernel_builds()`` next to the launcher,
built from the same parameter-choosing function the launcher calls), so a new tile or mode
cannot escape the check. For each (build, arch) this module reports registers per thread,
shared memory per block (Triton's dynamic allocation and the cubin's static part), local memory
(register spills), and the count of tensor-core (HMMA, HGMMA) and asynchronous-copy (LDGSTS
cp.async, UTMALDG TMA) instructions; builds whose key loop must be pipelined are required to
have asynchronous copies.

Usage (prints a markdown table, optionally writes JSON)::

    python -m kawhi_kernels.triton.builds --arch 80 90 --jobs 2 [--json out.json] [--only TEXT ...]

Do not run it with ``TRITON_INTERPRET=1`` set: the interpreter replaces compilation.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from .._compat import compile_for_target, cuobjdump_path

# Most shared memory one block may use (opt-in maximum), bytes, per compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class KernelBuild:
    """One compiled configuration of a ``@triton.jit`` kernel.

    Attributes:
        name: readable label (kernel, dtype, tiles, modes).
        kernel: the JIT function.
        pointer_types: Triton types of the ``*_ptr`` arguments that are not ``*i32``.
        float_args: non-pointer arguments passed as Python floats (fp32); the others are i32.
        constexprs: values of the constexpr arguments.
        num_warps, num_stages: launch options, as the launcher passes them (or Triton's defaults).
        tensor_cores: whether the kernel's products must run on tensor cores (HMMA/HGMMA).
        maxnreg: register limit per thread given to ptxas (as the launcher passes it), or None.
        async_copies: whether its key loop must be software-pipelined, i.e. its SASS must hold
            asynchronous global→shared copies (LDGSTS cp.async or UTMALDG TMA).
        table_key: the launcher's tile-table key this build checks (None: no table).
    """

    name: str
    kernel: object
    pointer_types: dict = field(hash=False)
    float_args: tuple
    constexprs: dict = field(hash=False)
    num_warps: int
    num_stages: int
    tensor_cores: bool
    async_copies: bool = False
    maxnreg: int | None = None
    table_key: tuple | None = None

    def signature(self) -> dict:
        sig = {}
        for arg in self.kernel.arg_names:
            if arg in self.constexprs:
                sig[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                sig[arg] = self.pointer_types.get(arg, "*i32")
            else:
                sig[arg] = "fp32" if arg in self.float_args else "i32"
        return sig


def all_kernel_builds() -> list[KernelBuild]:
    """The configurations of every Triton kernel of the package, from the launchers' own lists."""
    from . import attention_mass, cosine_alignment, grid_pyramid, sguf_descriptors

    builds = []
    for module in (attention_mass, cosine_alignment, grid_pyramid, sguf_descriptors):
        builds.extend(module.kernel_builds())
    return builds


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SASS_COUNTS = {"hmma": r"\bHMMA\b", "hgmma": r"\bHGMMA\b", "ldgsts": r"\bLDGSTS\b",
                "tma": r"\bUTMALDG\b", "local_ops": r"\b(LDL|STL)\b"}


def inspect_cubin(cubin: bytes) -> dict:
    """Resources and instruction counts of a single-kernel cubin, read with Triton's cuobjdump.

    Returns:
        {"registers", "stack", "static_shared", "local", "hmma", "hgmma", "ldgsts", "tma",
        "local_ops"}: ints (bytes for memory, instruction counts for the rest).
    """
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("Triton's NVIDIA backend ships no cuobjdump: cannot read cubins")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True)
    match = _RES_USAGE.search(res.stdout)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{res.stdout[-2000:]}")
    registers, stack, static_shared, local = (int(v) for v in match.groups())
    out = {"registers": registers, "stack": stack, "static_shared": static_shared, "local": local}
    for key, pattern in _SASS_COUNTS.items():
        out[key] = len(re.findall(pattern, sass.stdout))
    return out


def compile_and_inspect(build: KernelBuild, arch: int) -> dict:
    """Compile ``build`` for ``sm_<arch>`` and return its :func:`inspect_cubin` report plus
    ``shared`` (bytes per block: Triton's dynamic allocation + static), ``name`` and ``arch``;
    a compile failure is reported as ``error`` instead of raising."""
    row = {"name": build.name, "arch": arch, "tensor_cores": build.tensor_cores,
           "async_copies": build.async_copies,
           "num_warps": build.num_warps, "num_stages": build.num_stages}
    try:
        compiled = compile_for_target(build.kernel, build.signature(), build.constexprs, arch=arch,
                                      num_warps=build.num_warps, num_stages=build.num_stages,
                                      maxnreg=build.maxnreg)
    except Exception as exc:  # a config that does not compile is what the check reports
        row["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        return row
    row.update(inspect_cubin(compiled.asm["cubin"]))
    row["shared"] = int(compiled.metadata.shared) + row["static_shared"]
    return row


def problems(row: dict) -> list[str]:
    """What is wrong with one report row (empty when the build passes every check)."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    found = []
    # ptxas puts register spills in the stack frame (cuobjdump's STACK), explicit local arrays
    # in LOCAL; either shows up as LDL/STL in the SASS.
    if row["stack"] or row["local"] or row["local_ops"]:
        found.append(f"uses local memory (stack {row['stack']} B, local {row['local']} B, "
                     f"{row['local_ops']} LDL/STL): register spills")
    limit = SHARED_LIMIT.get(row["arch"])
    if limit is not None and row["shared"] > limit:
        found.append(f"needs {row['shared']} bytes of shared memory, sm_{row['arch']} allows {limit}")
    if row["tensor_cores"] and row["hmma"] + row["hgmma"] == 0:
        found.append("no tensor-core instruction (HMMA/HGMMA) in its SASS")
    if row.get("async_copies") and row["ldgsts"] + row["tma"] == 0:
        found.append("no cp.async/TMA load (LDGSTS/UTMALDG) in its SASS: its key loop is not "
                     "software-pipelined")
    return found


def _job(args):
    index, arch = args
    os.environ.pop("TRITON_INTERPRET", None)
    return compile_and_inspect(all_kernel_builds()[index], arch)


def run_checks(archs, jobs: int = 1, only: list[str] | None = None) -> list[dict]:
    """Compile every build (or those whose name contains every string of ``only``) for every
    arch (``jobs`` processes) and return the report rows."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: unset it to compile for a GPU target")
    names = [b.name for b in all_kernel_builds()]
    picked = [i for i, name in enumerate(names) if all(part in name for part in (only or ()))]
    work = [(i, arch) for arch in archs for i in picked]
    if jobs <= 1:
        return [_job(w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_job, work, chunksize=4))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| kernel configuration | arch | warps | stages | registers | shared (B) | spills (B) "
             "| HMMA | HGMMA | LDGSTS | TMA | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | sm_{row['arch']} | {row['num_warps']} | "
                         f"{row['num_stages']} | – | – | – | – | – | – | – | does not compile |")
            continue
        lines.append(
            f"| {row['name']} | sm_{row['arch']} | {row['num_warps']} | {row['num_stages']} | "
            f"{row['registers']} | {row['shared']} | {row['stack'] + row['local']} | {row['hmma']} | "
            f"{row['hgmma']} | {row['ldgsts']} | {row['tma']} | {'; '.join(problems(row)) or '–'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile processes (default: all CPUs)")
    parser.add_argument("--json", help="also write the report rows to this JSON file")
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="compile only the builds whose name contains every TEXT (iterating)")
    args = parser.parse_args(argv)
    rows = run_checks(args.arch, args.jobs, args.only)
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [row for row in rows if problems(row)]
    if bad:
        print(f"\n{len(bad)} of {len(rows)} builds fail the checks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
