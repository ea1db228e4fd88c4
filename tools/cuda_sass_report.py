#!/usr/bin/env python3
"""Static SASS facts of the CUDA kernels in a built kawhi_kernels._C (no GPU needed).

Reads ``cuobjdump -sass`` and ``cuobjdump --dump-resource-usage`` of the shared object and, per
architecture and kernel, reports registers, local memory, the CTAs per SM the register file and
the shared memory allow, and counts of the instructions that show the tensor-core design:
HMMA (mma.sync; split into fp16 and bf16 inputs), LDSM (ldmatrix), LDGSTS (cp.async). ``--markdown`` prints the table recorded
in benchmarks/results/cuda_static_sass.md; tests/test_cuda_static_sass.py asserts on the same
facts.

Usage:
    python tools/cuda_sass_report.py path/to/_C.so [--cuobjdump PATH] [--markdown]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_cuda_archs import find_cuobjdump  # noqa: E402

# Per-SM limits (CUDA C Programming Guide, compute capability tables).
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256        # registers per warp are allocated in units of 256
SHARED_PER_SM = {"sm_80": 167936, "sm_86": 102400, "sm_89": 102400, "sm_90": 233472}
SHARED_RESERVED_PER_CTA = 1024
MAX_CTAS_PER_SM = {"sm_80": 32, "sm_86": 16, "sm_89": 24, "sm_90": 32}
COUNTED = ("HMMA", "HMMA.F16", "HMMA.BF16", "LDSM", "LDGSTS", "LDGDEPBAR", "DEPBAR")
# How each counted name is matched in a SASS line: HMMA.F16 / HMMA.BF16 split the m16n8k16
# HMMAs by input type (the attention_mass region-mass MMA is always fp16; the score MMA of the
# bf16 kernels is bf16).
_OPCODE = {op: rf"\b{re.escape(op)}\b" for op in COUNTED}
_OPCODE["HMMA.F16"] = r"\bHMMA\.16816\.F32(?![.\w])"
_OPCODE["HMMA.BF16"] = r"\bHMMA\.16816\.F32\.BF16\b"

_ARCH = re.compile(r"^arch = (sm_\d+[a-z]?)\s*$", re.M)
_FUNC_SASS = re.compile(r"^\s*Function : (\S+)\s*$", re.M)
_FUNC_RES = re.compile(r"^\s*Function (\S+):\s*\n\s*(REG:.*)$", re.M)


@dataclass
class Kernel:
    arch: str
    name: str
    registers: int = 0
    stack: int = 0
    local: int = 0
    static_shared: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    loops_with: list[set[str]] = field(default_factory=list)


def _sections(text: str) -> list[tuple[str, str]]:
    """(arch, text) per ELF image of a cuobjdump listing."""
    marks = list(_ARCH.finditer(text))
    return [(m.group(1), text[m.end():marks[i + 1].start() if i + 1 < len(marks) else len(text)])
            for i, m in enumerate(marks)]


def parse(sass: str, resources: str) -> dict[tuple[str, str], Kernel]:
    """{(arch, mangled name): Kernel} from the two cuobjdump listings."""
    kernels: dict[tuple[str, str], Kernel] = {}
    for arch, body in _sections(resources):
        for m in _FUNC_RES.finditer(body):
            fields = dict(item.split(":", 1) for item in m.group(2).split())
            kernels[(arch, m.group(1))] = Kernel(
                arch, m.group(1), registers=int(fields["REG"]), stack=int(fields["STACK"]),
                local=int(fields["LOCAL"]), static_shared=int(fields["SHARED"]))
    for arch, body in _sections(sass):
        funcs = list(_FUNC_SASS.finditer(body))
        for i, m in enumerate(funcs):
            code = body[m.end():funcs[i + 1].start() if i + 1 < len(funcs) else len(body)]
            kernel = kernels.setdefault((arch, m.group(1)), Kernel(arch, m.group(1)))
            for op in COUNTED:
                kernel.counts[op] = len(re.findall(_OPCODE[op], code))
            kernel.loops_with = loops_containing(code)
    return kernels


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def loops_containing(code: str) -> list[set[str]]:
    """For every backward branch of a kernel's SASS (a loop), the set of counted opcodes
    between its target and the branch."""
    import bisect

    instrs = [(int(a, 16), text) for a, text in _INSTR.findall(code)]
    where = {op: [a for a, t in instrs if re.search(_OPCODE[op], t)] for op in COUNTED}
    loops = []
    for addr, text in instrs:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            loops.append({op for op, addrs in where.items()
                          if bisect.bisect_right(addrs, addr) > bisect.bisect_left(addrs, start)})
    return loops


_BRANCH = re.compile(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)")


def read(so: str, cuobjdump: str) -> dict[tuple[str, str], Kernel]:
    """Run cuobjdump on ``so`` and parse both listings."""
    def dump(flag: str) -> str:
        res = subprocess.run([cuobjdump, flag, so], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cuobjdump} {flag} {so} failed:\n{res.stdout}{res.stderr}")
        return res.stdout
    return parse(dump("-sass"), dump("--dump-resource-usage"))


def ctas_by_registers(registers: int, threads: int) -> int:
    """CTAs per SM the register file allows for ``threads`` threads of ``registers`` each."""
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    warps = -(-threads // 32)
    return REGISTERS_PER_SM // (per_warp * warps) if per_warp else 10**9


def ctas_by_shared(arch: str, dynamic: int, static: int) -> int | None:
    """CTAs per SM shared memory allows (None for an arch without a table entry)."""
    limit = SHARED_PER_SM.get(arch.rstrip("af"))
    if limit is None:
        return None
    per_cta = dynamic + static + SHARED_RESERVED_PER_CTA
    return limit // per_cta


_LABEL = re.compile(r"\d+([a-z][a-z_]*_kernel)")


def label(mangled: str) -> str:
    """A readable kernel label: the kernel name plus its template arguments."""
    m = _LABEL.search(mangled)
    name = m.group(1) if m else mangled[:60]
    args = []
    if "I6__half" in mangled:
        args.append("half")
    elif "I13__nv_bfloat16" in mangled:
        args.append("bf16")
    elif "IfE" in mangled or "IfLi" in mangled:
        args.append("float")
    d = re.search(r"Li(\d+)E", mangled)
    if d:
        args.append(d.group(1))
    mode = re.search(r"Li\d+ELb([01])E", mangled)   # attention_mass_mma_kernel<T, D, kCoarse>
    if mode:
        args.append("coarse" if mode.group(1) == "1" else "scatter")
    return f"{name}<{', '.join(args)}>" if args else name


def mma_variant_dim(mangled: str) -> int | None:
    """The padded head dim (template argument) of an attention_mass_mma_kernel, else None."""
    if "attention_mass_mma_kernel" not in mangled:
        return None
    return int(re.search(r"Li(\d+)E", mangled).group(1))


def markdown(kernels: dict[tuple[str, str], Kernel], shared_bytes) -> str:
    """The table of every kernel per arch; ``shared_bytes(max_d)`` gives the dynamic shared
    memory of an attention_mass_mma_kernel variant."""
    rows = ["| arch | kernel | REG | local | stack | CTAs/SM by regs | CTAs/SM by smem | "
            "HMMA (f16 / bf16) | LDSM | LDGSTS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (arch, name), k in sorted(kernels.items(), key=lambda kv: (kv[0][0], label(kv[0][1]))):
        dim = mma_variant_dim(name)
        smem = ctas_by_shared(arch, shared_bytes(dim), k.static_shared) if dim else None
        rows.append(f"| {arch} | {label(name)} | {k.registers} | {k.local} | {k.stack} | "
                    f"{ctas_by_registers(k.registers, 128) if dim else ''} | "
                    f"{'' if smem is None else smem} | "
                    f"{k.counts.get('HMMA', 0)} ({k.counts.get('HMMA.F16', 0)} / "
                    f"{k.counts.get('HMMA.BF16', 0)}) | {k.counts.get('LDSM', 0)} | "
                    f"{k.counts.get('LDGSTS', 0)} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- bandwidth-bound kernels
# cosine_alignment and grid_pyramid stream q / k / mass: their facts are 16-byte global loads
# (LDG.E.128, LDG.E.128.CONSTANT, ...) inside their loops, registers, and CTAs per SM.
WIDE_LOAD = re.compile(r"\bLDG(?:\.[A-Z0-9_]+)*\.128\b")
BANDWIDTH_THREADS = {"cosine_rows_kernel": 128, "region_mean_keys_kernel": 256,
                     "grid_pyramid_kernel": 256}
# Dynamic shared memory of a grid_pyramid block at the wrapper's preferred strip size
# (kawhi_kernels/cuda/grid_pyramid.py PREFERRED_SHARED_FLOATS fp32 slots).
GRID_PYRAMID_SHARED_BYTES = 12 * 1024 * 4
MAX_WARPS_PER_SM = {"sm_80": 64, "sm_86": 48, "sm_89": 48, "sm_90": 64}


def ctas_per_sm(arch: str, registers: int, threads: int, dynamic: int, static: int) -> int:
    """Resident CTAs per SM: the least of the register, shared-memory, warp and CTA limits."""
    arch = arch.rstrip("af")
    limits = [ctas_by_registers(registers, threads), MAX_CTAS_PER_SM.get(arch, 16),
              MAX_WARPS_PER_SM.get(arch, 48) // -(-threads // 32)]
    smem = ctas_by_shared(arch, dynamic, static)
    return min(limits + ([] if smem is None else [smem]))


def bandwidth_kernel(mangled: str) -> str | None:
    """The base name of a bandwidth-bound kernel (one of BANDWIDTH_THREADS), else None."""
    return next((k for k in BANDWIDTH_THREADS if k in mangled), None)


def bandwidth_label(mangled: str) -> str:
    """label() plus the load variant of the cosine kernels (template flag: vector / scalar)."""
    base = label(mangled)
    if "IfLb" in mangled and "<" not in base:
        base += "<float>"
    if "Lb1E" in mangled:
        return base[:-1] + ", vector>" if base.endswith(">") else base + "<vector>"
    if "Lb0E" in mangled:
        return base[:-1] + ", scalar>" if base.endswith(">") else base + "<scalar>"
    return base


def wide_loads(code: str) -> tuple[int, int]:
    """(16-byte global loads in a kernel's SASS, those inside a loop: between a backward branch's
    target and the branch)."""
    instrs = [(int(a, 16), text) for a, text in _INSTR.findall(code)]
    loads = [a for a, t in instrs if WIDE_LOAD.search(t)]
    loops = [(int(m.group(1), 16), a) for a, t in instrs
             for m in [_BRANCH.search(t)] if m and int(m.group(1), 16) < a]
    in_loop = sum(any(lo <= a <= hi for lo, hi in loops) for a in loads)
    return len(loads), in_loop


def read_wide_loads(so: str, cuobjdump: str) -> dict[tuple[str, str], tuple[int, int]]:
    """{(arch, mangled name): wide_loads(...)} of the bandwidth-bound kernels of ``so``."""
    res = subprocess.run([cuobjdump, "-sass", so], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{cuobjdump} -sass {so} failed:\n{res.stdout}{res.stderr}")
    out = {}
    for arch, body in _sections(res.stdout):
        funcs = list(_FUNC_SASS.finditer(body))
        for i, m in enumerate(funcs):
            if bandwidth_kernel(m.group(1)):
                code = body[m.end():funcs[i + 1].start() if i + 1 < len(funcs) else len(body)]
                out[(arch, m.group(1))] = wide_loads(code)
    return out


def bandwidth_markdown(kernels: dict[tuple[str, str], Kernel],
                       wide: dict[tuple[str, str], tuple[int, int]]) -> str:
    """Table of the bandwidth-bound kernels per arch: registers, local memory, LDG.128 (all /
    in loops), CTAs per SM by registers and resident CTAs per SM (registers, shared memory at
    grid_pyramid's preferred strip, warps and CTAs per SM)."""
    rows = ["| arch | kernel | REG | local | LDG.128 | LDG.128 in loops | threads | "
            "CTAs/SM by regs | CTAs/SM |", "|---|---|---|---|---|---|---|---|---|"]
    for (arch, name), (total, in_loop) in sorted(wide.items(),
                                                 key=lambda kv: (kv[0][0], bandwidth_label(kv[0][1]))):
        k = kernels.get((arch, name), Kernel(arch, name))
        base = bandwidth_kernel(name)
        threads = BANDWIDTH_THREADS[base]
        dynamic = GRID_PYRAMID_SHARED_BYTES if base == "grid_pyramid_kernel" else 0
        ctas = ctas_per_sm(arch, k.registers, threads, dynamic, k.static_shared)
        rows.append(f"| {arch} | {bandwidth_label(name)} | {k.registers} | {k.local} | {total} | "
                    f"{in_loop} | {threads} | {ctas_by_registers(k.registers, threads)} | {ctas} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared_object")
    parser.add_argument("--cuobjdump")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--bandwidth", action="store_true",
                        help="print the table of the bandwidth-bound kernels (16-byte loads)")
    args = parser.parse_args(argv)
    tool = find_cuobjdump(args.cuobjdump)
    if tool is None:
        try:
            from kawhi_kernels._compat import cuobjdump_path
            tool = cuobjdump_path()
        except ImportError:
            tool = None
    if tool is None:
        print("error: cuobjdump not found", file=sys.stderr)
        return 2
    kernels = read(args.shared_object, tool)
    if args.bandwidth:
        print(bandwidth_markdown(kernels, read_wide_loads(args.shared_object, tool)))
        return 0
    sys.path.insert(0, str(Path(args.shared_object).resolve().parent))
    import importlib.util
    spec = importlib.util.spec_from_file_location("_C", args.shared_object)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    print(markdown(kernels, ext.mma_layout.shared_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
