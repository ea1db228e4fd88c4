"""Write benchmarks/results/static_builds_triton-<version>.md from a ``kawhi_kernels.triton.builds
--json`` report: header, summary per kernel family and arch, the attention_mass variants at the
headline tile class (D = 128, GP = 3: the KAWHI heads' packing), the planner's QKᵀ tile counts
at the DESIGN §7 headline shape, and every build.

    python tools/static_builds_report.py builds.json --triton 3.9.0 --torch 2.13.0+cpu \
        --commit abc1234 --out benchmarks/results/static_builds_triton-3.9.0.md \
        [--command "python -m kawhi_kernels.triton.builds ..."] [--note "..."]
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


HEADLINE_HEADS = [0, 1, 3, 22, 23, 24, 25, 26, 27]


def headline_tile_counts() -> list[str]:
    """Markdown rows of the planner's QKᵀ tile counts at the DESIGN §7 headline shape
    (Qwen2.5-VL-7B: Hq 28, Hk 4, D 128, fp16/bf16 tiles; 8 sequences of 4096 keys, an image
    of 1024 keys after 16 text keys, the last 2048 tokens as rows; the KAWHI heads), from the
    same plan tables the kernels loop over (pure host, nothing launched)."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from kawhi_kernels.triton import attention_mass as am

    batch, keys, rows, prefix, image = 8, 4096, 2048, 16, 1024
    cu_k = torch.arange(batch + 1, dtype=torch.int64) * keys
    cu_q = torch.arange(batch + 1, dtype=torch.int64) * rows
    out = ["| variant | kernel | M (rows × GP) | BLOCK_N | programs | QKᵀ tiles | tiles / program "
           "| score columns (tiles × BLOCK_N) | unmasked interior tiles |",
           "|---|---|---|---|---|---|---|---|---|"]
    for num_regions, label in ((16, "coarse R=16"), (1024, "per-patch R=1024")):
        region = torch.full((batch * keys,), -1, dtype=torch.int32)
        for b in range(batch):
            region[b * keys + prefix:b * keys + prefix + image] = (
                torch.arange(image, dtype=torch.int32) * num_regions // image)
        plan = am.plan_attention_mass_triton(cu_q, cu_k, region, num_regions, dtype=torch.float16,
                                             num_heads=28, num_kv_heads=4, head_dim=128,
                                             heads=HEADLINE_HEADS)
        groups = plan.kv_tab.numel()
        programs = plan.num_blocks * groups
        for has_lse in (False, True):
            ce = plan.launches[has_lse][0]
            t = plan.tables[has_lse]
            kernel = am._kernel_name(plan.acc_mode, plan.block_r, has_lse)
            tiles = plan.key_tile_visits(has_lse)
            # Interior tiles actually visited: of the full pass (ti of each block) and of the
            # region range's unmasked part [t0, tm).
            loops = t.loop_tiles.to("cpu", torch.int64)
            single = kernel == "one-pass"
            interior = 0 if has_lse else int(loops[:, 0].sum())
            if not single:
                interior += int((loops[:, 2] - loops[:, 1]).sum())
            interior *= groups
            out.append(f"| {label}, {'lse' if has_lse else 'no lse'} | {kernel} | "
                       f"{ce['BLOCK_ROWS']} × {ce['GP']} in {ce['BLOCK_M']} | {ce['BLOCK_N']} | "
                       f"{programs} | {tiles} | {tiles / programs:.1f} | "
                       f"{plan.score_columns(has_lse)} | {interior} ({interior / tiles:.1%}) |")
    return out


def report(rows: list[dict], triton: str, torch_version: str, commit: str,
           command: str | None = None, note: str | None = None) -> str:
    ok = [r for r in rows if "error" not in r]
    bad = [r for r in rows if problems(r)]
    archs = sorted({r["arch"] for r in rows})
    lines = [f"# Static GPU checks of the Triton kernels — Triton {triton}", "",
             f"Compiled on a CPU-only machine (no GPU) on {datetime.date.today()}, commit {commit}, "
             f"torch {torch_version}, Triton {triton} with its bundled ptxas/cuobjdump. Command:", "",
             "```", command or "python -m kawhi_kernels.triton.builds --arch 80 90 --jobs 2 --json builds.json",
             "```", "", *([note, ""] if note else []),
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
    lines += ["", "## attention_mass variants, D = 128, GP = 3 (the KAWHI heads' packing), rows output",
              "", "| variant | arch | registers | shared (B) | cp.async (LDGSTS) | TMA | HMMA | HGMMA |",
              "|---|---|---|---|---|---|---|---|"]
    for r in ok:
        name = r["name"]
        if name.startswith("attention_mass ") and " D=128 " in name and " GP=3 " in name and "/rows" in name:
            lines.append(f"| {name.replace('attention_mass ', '')} | sm_{r['arch']} | {r['registers']} | "
                         f"{r['shared']} | {r['ldgsts']} | {r['tma']} | {r['hmma']} | {r['hgmma']} |")
    lines += ["", "## QKᵀ tiles at the headline shape (planner tables, DESIGN §7)", "",
              "Qwen2.5-VL-7B (Hq 28, Hk 4, D 128, bf16 tiles), 8 sequences × 4096 keys, an image of "
              "1024 keys after 16 text keys, the last 2048 tokens as query rows, the KAWHI heads "
              "{0, 1, 3, 22–27}. One score tile = [M, BLOCK_N]; score columns make launches of "
              "different BLOCK_N comparable.", "", *headline_tile_counts()]
    lines += ["", "## Every build", "", markdown_table(rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json")
    parser.add_argument("--triton", required=True)
    parser.add_argument("--torch", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--command", help="the builds command that made the JSON (default: all)")
    parser.add_argument("--note", help="a paragraph under the command (e.g. what was left out)")
    args = parser.parse_args(argv)
    rows = json.loads(Path(args.json).read_text())
    Path(args.out).write_text(report(rows, args.triton, args.torch, args.commit, args.command,
                                     args.note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
