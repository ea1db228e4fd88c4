"""Benchmark outputs: the appended results CSV, the markdown table of one run (ratios against the
baseline measured in the same run) and PNG plots of time and peak memory against sequence length.
"""
from __future__ import annotations

import csv
import math
from collections import OrderedDict
from pathlib import Path

CSV_COLUMNS = [
    "run_id", "date", "device", "gpu", "op", "backend", "lse", "shape", "family", "batch", "seq_len",
    "rows", "image_tokens", "regions", "output", "heads", "causal", "dtype", "p50_ms", "p20_ms",
    "p80_ms", "repeats", "peak_mib", "max_rel_err", "status", "note", "torch", "triton", "cuda",
    "git_commit", "command", "scores_per_s", "roofline_frac",
]

BASELINE = {"attention_mass": "naive", "cosine_alignment": "naive", "sguf": "numpy_skimage",
            "kawhi_step": "forward", "grid_pyramid": "torch"}


# ----------------------------------------------------------------------------- CSV

def _cell(column: str, value) -> str:
    if value is None:
        return "n/a" if column == "peak_mib" else ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if column == "max_rel_err":
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def append_csv(path: Path, records: list[dict]) -> Path:
    """Append ``records`` to the CSV at ``path`` (header written when the file is new).

    Raises ValueError when an existing file has a different header (pick another --out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if header != CSV_COLUMNS:
            raise ValueError(f"out: {path} has a different header ({len(header)} columns); "
                             "write this run to another --out folder")
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(CSV_COLUMNS)
        for record in records:
            writer.writerow([_cell(c, record.get(c)) for c in CSV_COLUMNS])
    return path


def read_csv(path: Path, run_id: str | None = None) -> list[dict]:
    """Rows of a results CSV as dicts of strings (only ``run_id``'s rows when given)."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [r for r in rows if run_id is None or r["run_id"] == run_id]


# ----------------------------------------------------------------------------- markdown

def _num(value) -> float | None:
    """A measurement from a record (float) or a CSV row (str) as float, None when absent."""
    if value is None or value == "" or value == "n/a":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _label(record: dict) -> str:
    lse = record.get("lse") in (True, "True")
    return f"{record['backend']}+lse" if lse else str(record["backend"])


def _fmt_time(record: dict) -> str:
    p50, p20, p80 = (_num(record.get(k)) for k in ("p50_ms", "p20_ms", "p80_ms"))
    if p50 is None:
        return "—"
    return f"{p50:.3f} [{p20:.3f}–{p80:.3f}]"


def _ratio(numerator, denominator, suffix: str = "×") -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return "—"
    return f"{numerator / denominator:.2f}{suffix}"


def _shape_title(r: dict) -> str:
    parts = [f"B {r['batch']}" if r.get("batch") not in (None, "") else ""]
    for key, name in (("seq_len", "L"), ("rows", "rows"), ("image_tokens", "image"),
                      ("regions", "regions"), ("output", "output"), ("heads", "heads Hq/Hk/D")):
        if r.get(key) not in (None, ""):
            parts.append(f"{name} {r[key]}")
    if r.get("causal") not in (None, ""):
        parts.append("causal" if r["causal"] in (True, "True") else "non-causal")
    return ", ".join(p for p in parts if p)


def _group(records: list[dict]) -> "OrderedDict[tuple, list[dict]]":
    """Records by (op, shape): ops in order of first appearance, shapes in run order within an
    op (a prioritised sweep interleaves ops; the report does not)."""
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in records:
        groups.setdefault((r["op"], r["shape"]), []).append(r)
    op_rank: dict[str, int] = {}
    for op, _ in groups:
        op_rank.setdefault(op, len(op_rank))
    return OrderedDict(sorted(groups.items(), key=lambda item: op_rank[item[0][0]]))


def _table(op: str, rows: list[dict]) -> list[str]:
    base = next((r for r in rows if r["backend"] == BASELINE.get(op) and r.get("lse") in (False, "False")), None)
    base_t = _num(base.get("p50_ms")) if base else None
    base_m = _num(base.get("peak_mib")) if base else None
    flash = next((r for r in rows if r["backend"] == "flash"), None)
    flash_t = _num(flash.get("p50_ms")) if flash else None
    if op == "kawhi_step":
        head = ["variant", "p50 ms [p20–p80]", "overhead vs forward", "peak MiB", "max rel err", "status", "note"]
    elif op == "attention_mass":
        head = ["backend", "p50 ms [p20–p80]", "speedup vs naive", "memory ÷ naive", "time ÷ flash",
                "scores/s", "of limit", "peak MiB", "max rel err", "status", "note"]
    else:
        head = ["backend", "p50 ms [p20–p80]", f"speedup vs {BASELINE.get(op)}", "memory ÷ baseline",
                "peak MiB", "max rel err", "status", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t, m = _num(r.get("p50_ms")), _num(r.get("peak_mib"))
        err = _num(r.get("max_rel_err"))
        err_s = "—" if err is None else f"{err:.2e}"
        peak_s = "n/a" if m is None else f"{m:.1f}"
        if op == "kawhi_step":
            over = "—" if t is None or not base_t else f"{100.0 * (t / base_t - 1.0):+.1f}%"
            cells = [_label(r), _fmt_time(r), over, peak_s, err_s, r["status"], r.get("note", "")]
        else:
            mem = _ratio(m, base_m, "") if m is not None and base_m is not None else "—"
            cells = [_label(r), _fmt_time(r), _ratio(base_t, t), mem]
            if op == "attention_mass":
                cells.append(_ratio(t, flash_t, ""))
                rate, frac = _num(r.get("scores_per_s")), _num(r.get("roofline_frac"))
                cells += ["—" if rate is None else f"{rate:.3g}",
                          "—" if frac is None else f"{100 * frac:.1f}%"]
            cells += [peak_s, err_s, r["status"], r.get("note", "")]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return lines


def markdown_report(records: list[dict], meta: dict, *, warmup: int, copies: int) -> str:
    """Markdown summary of one run: a header with the environment, then one table per
    (op, shape) with ratios against the baseline of the same run (attention_mass also against the
    flash forward yardstick; kawhi_step as overhead % over the plain forward)."""
    cpu = not str(meta["device"]).startswith("cuda")
    lines = [f"# kawhi_kernels benchmark — run {meta['run_id']}", ""]
    if cpu:
        lines += ["> **CPU results.** These timings were taken on a CPU (time.perf_counter); they are "
                  "not GPU results and say nothing about GPU performance. Peak memory is not measured "
                  f"on CPU (n/a). Host at the start: {meta.get('load', 'load average unknown')}; timings "
                  "on a shared or loaded machine are noisy.", ""]
    lines += [
        f"- device: `{meta['device']}` — {meta['gpu']}",
        f"- dtype: {meta['dtype']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}",
        f"- git commit: `{meta['git_commit']}`; date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- timing: {warmup} warm-up call(s), then the timed calls (see `repeats` in the CSV), inputs "
        f"rotated over {copies} pre-generated copies; p50 [p20–p80] per call. "
        + ("CUDA events." if not cpu else "perf_counter."),
        "- speedup = baseline p50 ÷ p50; memory ÷ = peak ÷ baseline peak (extra memory incl. output); "
        "time ÷ flash = p50 ÷ flash-forward p50 (same rows and keys).",
        "- scores/s = visible softmax scores (rows × keys × heads) per second; of limit = the chip's "
        "physical bound for those scores (exp throughput or tensor-core FLOPs, from SM count and "
        "clock: kawhi_kernels.bench.roofline) ÷ p50. GPU rows only.",
        "- max rel err = max |out − ref| / max(|ref|, 1e-3·max|ref|) vs the fp64 reference of this run "
        "(attention_mass: first sequence, last 128 rows or all its segments).",
        "",
    ]
    current_op = None
    for (op, shape), rows in _group(records).items():
        if op != current_op:
            lines += [f"## {op}", ""]
            current_op = op
        lines += [f"### {shape} — {_shape_title(rows[0])}", ""] + _table(op, rows) + [""]
    counts: dict[str, int] = {}
    for r in records:
        key = r["status"].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    lines.append("Status counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots

def _series(records: list[dict], value_key: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r["op"] != "attention_mass" or r.get("family") != "seq" or r["status"] != "ok":
            continue
        x, y = _num(r.get("seq_len")), _num(r.get(value_key))
        if x is None or y is None:
            continue
        series.setdefault(_label(r), []).append((x, y))
    return {k: sorted(v) for k, v in series.items()}


def plot_vs_seq_len(records: list[dict], meta: dict, time_path: Path, memory_path: Path) -> list[Path]:
    """Up to two PNGs for the "seq" family of ``attention_mass``: p50 time and peak extra memory
    against sequence length, one line per backend. A plot without data (peak memory on CPU, or
    no successful case) is not written. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device_note = "CPU run (not GPU results)" if not str(meta["device"]).startswith("cuda") else meta["gpu"]
    written = []
    for path, key, ylabel in ((time_path, "p50_ms", "p50 time per call (ms)"),
                              (memory_path, "peak_mib", "peak extra memory (MiB)")):
        series = _series(records, key)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        for label, points in series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_xlabel("keys per sequence (seq_len)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"attention_mass, seq family — {device_note}\nrun {meta['run_id']}, {meta['dtype']}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        written.append(Path(path))
    return written


def write_outputs(records: list[dict], meta: dict, out_dir: Path, *, warmup: int, copies: int,
                  plots: bool = True, append: bool = True) -> dict:
    """Append ``records`` to ``results.csv`` (unless ``append=False``: already appended while
    running), write ``report-<run_id>.md`` and the two PNGs (``time_vs_seq-<run_id>.png``,
    ``memory_vs_seq-<run_id>.png``) into ``out_dir``.

    Returns {"csv": path, "markdown": path, "markdown_text": str, "plots": [paths],
    "plot_error": str or None}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = meta["run_id"]
    csv_path = out_dir / "results.csv"
    if append:
        append_csv(csv_path, records)
    text = markdown_report(records, meta, warmup=warmup, copies=copies)
    md_path = out_dir / f"report-{run_id}.md"
    md_path.write_text(text)
    written, error = [], None
    if plots:
        try:
            written = plot_vs_seq_len(records, meta, out_dir / f"time_vs_seq-{run_id}.png",
                                      out_dir / f"memory_vs_seq-{run_id}.png")
        except ImportError as exc:
            error = f"plots skipped: matplotlib is not importable ({exc})"
    return {"csv": csv_path, "markdown": md_path, "markdown_text": text, "plots": written,
            "plot_error": error}
