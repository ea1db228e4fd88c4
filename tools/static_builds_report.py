"""Write benchmarks/results/static_builds_triton-<version>.md from a ``kawhi_kernels.triton.builds
--json`` report: header, summary per kernel family and arch, the attention_mass variants at the
headline tile class (D = 128, GP = 8) and every build.

    python tools/static_builds_report.py builds.json --triton 3.9.0 --torch 2.13.0+cpu \
        --commit abc1234 --out benchmarks/results/static_builds_triton-3.9.0.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kawhi_kernels.triton.builds import markdown_table, problems  # noqa: E402


def _family(name: str) -> str:
    words = name.split()
    return " ".join(words[:2]) if words[0] in ("attention_mass", "cosine") else words[0]


def _span(values) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}–{hi}"


def report(rows: list[dict], triton: str, torch_version: str, commit: str) -> str:
    ok = [r for r in rows if "error" not in r]
    bad = [r for r in rows if problems(r)]
    archs = sorted({r["arch"] for r in rows})
    lines = [f"# Static GPU checks of the Triton kernels — Triton {triton}", "",
             f"Compiled on a CPU-only machine (no GPU) on {datetime.date.today()}, commit {commit}, "
             f"torch {torch_version}, Triton {triton} with its bundled ptxas/cuobjdump. Command:", "",
             "```", "python -m kawhi_kernels.triton.builds --arch 80 90 --jobs 2 --json builds.json",
             "```", "",
             f"{len(rows)} builds ({len(rows) // max(1, len(archs))} configurations × "
             f"{', '.join(f'sm_{a}' for a in archs)}); {len(bad)} fail a check (compile error, "
             "register spills, shared memory over the arch limit, missing tensor-core instructions, "
             "no cp.async/TMA load where the key loop must be pipelined).",
             "Shared memory = Triton's dynamic allocation + static; spills = cuobjdump STACK + LOCAL bytes.",
             "", "## Summary per kernel (dtype) and arch", "",
             "| kernel | arch | builds | registers (min–max) | shared B (max) | spills B (max) "
             "| HMMA (min–max) | HGMMA (min–max) | LDGSTS (min–max) | TMA (max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for r in sorted(ok, key=lambda r: (_family(r["name"]), r["arch"])):
        groups.setdefault((_family(r["name"]), r["arch"]), []).append(r)
    for (family, arch), rs in groups.items():
        lines.append(f"| {family} | sm_{arch} | {len(rs)} | {_span([r['registers'] for r in rs])} | "
                     f"{max(r['shared'] for r in rs)} | {max(r['stack'] + r['local'] for r in rs)} | "
                     f"{_span([r['hmma'] for r in rs])} | {_span([r['hgmma'] for r in rs])} | "
                     f"{_span([r['ldgsts'] for r in rs])} | {max(r['tma'] for r in rs)} |")
    lines += ["", "## attention_mass variants, D = 128, GP = 8 (the KAWHI heads' tile), rows output",
              "", "| variant | arch | registers | shared (B) | cp.async (LDGSTS) | TMA | HMMA | HGMMA |",
              "|---|---|---|---|---|---|---|---|"]
    for r in ok:
        name = r["name"]
        if name.startswith("attention_mass ") and " D=128 " in name and " GP=8 " in name and "/rows" in name:
            lines.append(f"| {name.replace('attention_mass ', '')} | sm_{r['arch']} | {r['registers']} | "
                         f"{r['shared']} | {r['ldgsts']} | {r['tma']} | {r['hmma']} | {r['hgmma']} |")
    lines += ["", "## Every build", "", markdown_table(rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json")
    parser.add_argument("--triton", required=True)
    parser.add_argument("--torch", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows = json.loads(Path(args.json).read_text())
    Path(args.out).write_text(report(rows, args.triton, args.torch, args.commit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
