"""The one-command GPU session (``benchmarks/run_gpu.sh``): its phases, their time budget, which of
them run on this device, and the per-phase status files written as the session goes.

    python -m kawhi_kernels.bench.session plan --device cuda      # shell assignments for run_gpu.sh
    python -m kawhi_kernels.bench.session header --out DIR --command "..."   # DIR/session.md
    python -m kawhi_kernels.bench.session record --out DIR --phase NAME --rc 0 --seconds 12 --detail "..."
    python -m kawhi_kernels.bench.session budget                  # the budget table (markdown)

Time model (H200, one command, hard limit 600 s; the budget is what each phase's ``timeout``
allows, so the sum is the worst case and must stay ≤ TARGET_SECONDS). Estimates come from the
install time on 2 cores (~30 s for one arch; 16 cores are faster), Triton compile times (~1–3 s per
specialisation) and the sizes of the headline shapes; no GPU has run this yet, so they are
estimates, not measurements.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TARGET_SECONDS = 480          # ≤ 8 min wall for the whole command
HARD_LIMIT_SECONDS = 600      # the device tool's per-command limit


@dataclass(frozen=True)
class Phase:
    """One phase: ``name`` (files are named after it), what it does, its ``timeout`` in seconds,
    the ``estimate`` of its wall time on an H200, and whether it can only run with CUDA."""

    name: str
    what: str
    timeout: int
    estimate: int
    needs_cuda: bool


# Order is the run order. The benchmark runs before the sanitizer: it is the headline, and a
# sanitizer refusal or slowdown must not eat its time.
PHASES = (
    Phase("build", "pip install -e . for sm_90 only, then `kawhi-kernels info`", 120, 70, False),
    Phase("correctness", "benchmarks/gpu_checks.py: every backend vs the fp64 torch reference at "
          "Qwen2.5-VL-7B / Qwen3-VL-4B shapes, SDPA-flash lse, determinism, empty rows", 95, 60, False),
    Phase("plan_gpu", "pytest -m gpu: plan.run under sync debug 'error' + CUDA graph replay, "
          "other GPU-only tests, Triton sanitizer cases unsanitized", 60, 40, True),
    Phase("benchmark", "kawhi_kernels.bench.cli headline sweeps (DESIGN §7)", 125, 110, False),
    Phase("sanitizer", "compute-sanitizer memcheck + racecheck on small CUDA and Triton cases "
          "(probed first: refusals are recorded)", 75, 50, True),
)

# Headline sweeps of the benchmark phase: (label, extra CLI arguments, share of the phase's time).
# Separate sweeps so one slow case cannot eat another's time: the torch.compile of FlexAttention
# (tens of seconds on its first shape) runs last; the column-sum shape has no naive baseline (it
# would materialise 32 x 16k x 16k fp32 scores, ~100 GB with temporaries) and no torch row (the
# chunked reference takes seconds per call there).
GPU_SWEEPS = (
    ("attention-7b", ["--ops", "attention_mass", "--shapes", "^am-target-7b$",
                      "--backends", "naive,torch,triton,cuda,flash"], 0.24),
    ("colreduce", ["--ops", "attention_mass", "--shapes", "^am-colsum-16kx16k$",
                   "--backends", "triton,cuda,flash,flash_colreduce"], 0.16),
    # --ops order is run order: the capture overhead first, the extra attention shapes last.
    ("targets", ["--ops", "kawhi_step,cosine_alignment,sguf,attention_mass",
                 "--shapes", "^kawhi-7b-width$|^cos-target-7b$|^sguf-32x32-p28$|^am-target-4b$"
                 "|^am-target-seg16$",
                 "--backends", "naive,torch,triton,cuda,flash,read_bound,numpy_skimage,kawhi,"
                 "forward,forward+capture,forward+capture+kawhi"], 0.32),
    ("flex", ["--ops", "attention_mass", "--shapes", "^am-target-7b$", "--backends", "naive,flex"], 0.28),
)
CPU_SWEEPS = (
    ("quick", ["--quick", "--shapes", "^q-am-L256-r16$|^q-am-colsum-256$|^q-cos-L256-r1$|^q-sguf|^q-kawhi"], 1.0),
)


def cuda_available() -> bool:
    try:
        import torch
    except Exception:
        return False
    return bool(torch.cuda.is_available())


def phase_plan(device: str) -> list[tuple[Phase, str | None]]:
    """(phase, skip reason or None) for every phase on ``device`` ("cuda" or "cpu"). A CUDA
    device that torch cannot see skips the CUDA-only phases too."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    has_cuda = device == "cuda" and cuda_available()
    plan = []
    for phase in PHASES:
        skip = None
        if phase.needs_cuda and not has_cuda:
            skip = "skipped: no CUDA" + (" (BENCH_DEVICE=cpu)" if device == "cpu" else " (torch sees no GPU)")
        plan.append((phase, skip))
    return plan


def budget_seconds() -> tuple[int, int]:
    """(sum of timeouts, sum of estimates) over all phases."""
    return sum(p.timeout for p in PHASES), sum(p.estimate for p in PHASES)


def sweeps_for(device: str) -> tuple:
    return GPU_SWEEPS if device == "cuda" else CPU_SWEEPS


def shell_plan(device: str) -> str:
    """Shell assignments ``T_<phase>=<timeout>`` and ``SKIP_<phase>=<reason or empty>``, plus the
    sweeps as ``SWEEP_<i>_LABEL``, ``SWEEP_<i>_ARGS`` (shell-quoted) and ``SWEEP_<i>_SHARE``."""
    lines = []
    for phase, skip in phase_plan(device):
        lines.append(f"T_{phase.name}={phase.timeout}")
        lines.append(f"SKIP_{phase.name}={shlex.quote(skip or '')}")
    sweeps = sweeps_for(device)
    lines.append(f"SWEEPS={len(sweeps)}")
    for i, (label, args, share) in enumerate(sweeps):
        lines.append(f"SWEEP_{i}_LABEL={shlex.quote(label)}")
        lines.append(f"SWEEP_{i}_ARGS={shlex.quote(shlex.join(args))}")
        lines.append(f"SWEEP_{i}_SHARE={share}")
    return "\n".join(lines)


def budget_markdown() -> str:
    total_t, total_e = budget_seconds()
    lines = ["| phase | what | timeout s | estimate s (H200) | needs CUDA |", "|---|---|---|---|---|"]
    for p in PHASES:
        lines.append(f"| {p.name} | {p.what} | {p.timeout} | {p.estimate} | {'yes' if p.needs_cuda else 'no'} |")
    lines.append(f"| **total** | | **{total_t}** (target ≤ {TARGET_SECONDS}) | **{total_e}** | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- metadata

def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"not available ({type(exc).__name__})"
    text = (out.stdout or out.stderr).strip()
    return text if out.returncode == 0 and text else f"not available (exit {out.returncode})"


def session_metadata(command: str) -> dict:
    """GPU name, driver, versions (python, torch, CUDA, triton, transformers, nvcc), date,
    commit and the exact command of the session."""
    from .env import git_commit

    meta = {"date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "commit": git_commit(), "command": command, "python": platform.python_version(),
            "host": platform.node()}
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["torch_cuda"] = torch.version.cuda or "none (CPU build)"
        meta["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    except Exception as exc:
        meta["torch"] = f"not importable ({type(exc).__name__})"
    for name in ("triton", "transformers", "flash_colreduce"):
        try:
            module = __import__(name)
            meta[name] = getattr(module, "__version__", "?")
        except Exception as exc:
            meta[name] = f"not importable ({type(exc).__name__})"
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    meta["nvidia_smi"] = smi
    meta["driver"] = smi.split(",")[1].strip() if smi.count(",") >= 2 else smi
    meta["nvcc"] = _run(["nvcc", "--version"]).splitlines()[-1]
    return meta


def write_header(out: Path, command: str, device: str) -> Path:
    """``out/session.md`` (and ``session.json``): metadata, the phase plan and the budget."""
    out.mkdir(parents=True, exist_ok=True)
    meta = session_metadata(command)
    meta["bench_device"] = device
    (out / "session.json").write_text(json.dumps(meta, indent=1) + "\n")
    label = "GPU session" if device == "cuda" else "CPU DRY RUN (BENCH_DEVICE=cpu): no GPU numbers"
    lines = [f"# kawhi_kernels {label}", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += ["", "## Phase plan", ""]
    for phase, skip in phase_plan(device):
        lines.append(f"- {phase.name} (timeout {phase.timeout} s): {skip or 'runs'}")
    lines += ["", "## Budget", "", budget_markdown(), ""]
    path = out / "session.md"
    path.write_text("\n".join(lines) + "\n")
    return path


PHASE_COLUMNS = ("phase", "status", "rc", "seconds", "timeout", "detail")


def phase_status(rc: int | None, skip: str | None = None) -> str:
    """"ok", "failed (exit N)", "timed out", or the skip reason."""
    if skip:
        return skip
    if rc is None:
        return "not run"
    if rc in (124, 137):
        return "timed out"
    return "ok" if rc == 0 else f"failed (exit {rc})"


def record_phase(out: Path, phase: str, rc: int | None, seconds: float, detail: str = "",
                 skip: str | None = None, timeout: int | None = None) -> Path:
    """Append one phase's outcome to ``out/phases.csv`` and rewrite ``out/phases.md``
    (``timeout``: the one it ran under, default the phase's own)."""
    known = {p.name: p for p in PHASES}
    if phase not in known:
        raise ValueError(f"phase: expected one of {sorted(known)}, got {phase!r}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "phases.csv"
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=PHASE_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(dict(phase=phase, status=phase_status(rc, skip), rc="" if rc is None else rc,
                             seconds=f"{seconds:.0f}", timeout=timeout or known[phase].timeout,
                             detail=" ".join(detail.split())))
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    lines = ["| " + " | ".join(PHASE_COLUMNS) + " |", "|" + "---|" * len(PHASE_COLUMNS)]
    lines += ["| " + " | ".join(r[c].replace("|", "/") for c in PHASE_COLUMNS) + " |" for r in rows]
    (out / "phases.md").write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kawhi_kernels.bench.session", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--device", default="cuda")
    h = sub.add_parser("header")
    h.add_argument("--out", required=True)
    h.add_argument("--command", required=True)
    h.add_argument("--device", default="cuda")
    r = sub.add_parser("record")
    r.add_argument("--out", required=True)
    r.add_argument("--phase", required=True)
    r.add_argument("--rc", type=int, default=None)
    r.add_argument("--seconds", type=float, default=0.0)
    r.add_argument("--detail", default="")
    r.add_argument("--skip", default="")
    r.add_argument("--timeout", type=int, default=None)
    sub.add_parser("budget")
    args = parser.parse_args(argv)
    if args.cmd == "plan":
        print(shell_plan(args.device))
    elif args.cmd == "header":
        print(write_header(Path(args.out), args.command, args.device))
    elif args.cmd == "record":
        record_phase(Path(args.out), args.phase, args.rc, args.seconds, args.detail, args.skip or None,
                     args.timeout)
    else:
        print(budget_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
