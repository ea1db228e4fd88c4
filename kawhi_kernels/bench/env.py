"""Run metadata written next to every result: device, versions, git commit, date, command."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit(root: Path = REPO_ROOT) -> str:
    """The checked-out commit: ``$KAWHI_GIT_COMMIT`` if set, else read from ``root/.git`` (HEAD,
    loose ref or packed-refs; no git process is started), else "unknown"."""
    env = os.environ.get("KAWHI_GIT_COMMIT", "").strip()
    if env:
        return env
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        loose = git / ref
        if loose.is_file():
            return loose.read_text().strip()
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except OSError:
        pass
    return "unknown"


def cpu_name() -> str:
    """CPU model name (Linux /proc/cpuinfo), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_label(device: torch.device) -> str:
    """GPU name for CUDA devices; "none (CPU run: <cpu model>, <n> threads)" otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"none (CPU run: {cpu_name()}, {torch.get_num_threads()} threads)"


def load_summary() -> str:
    """"1-min load average 4.50 on 2 CPUs" (CPU timings are only as quiet as the machine)."""
    try:
        one, _, _ = os.getloadavg()
    except (AttributeError, OSError):
        return "load average unknown"
    return f"1-min load average {one:.2f} on {os.cpu_count()} CPUs"


def versions() -> dict:
    """torch, triton and CUDA (torch's build) versions as strings."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not available ({type(exc).__name__})"
    return {"torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "none (CPU build)"}


def run_metadata(device: torch.device, dtype: torch.dtype, command: str) -> dict:
    """Metadata of one sweep: run_id ("<UTC timestamp>-<device type>"), date (ISO 8601 UTC),
    device, gpu, dtype, versions, git_commit, command, load (host load average at the start)."""
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    return {
        "run_id": f"{now.strftime('%Y%m%dT%H%M%SZ')}-{device.type}",
        "date": now.isoformat(),
        "device": str(device),
        "gpu": device_label(device),
        "dtype": str(dtype).replace("torch.", ""),
        **versions(),
        "git_commit": git_commit(),
        "command": command,
        "load": load_summary(),
    }
