"""The one-command GPU session (benchmarks/run_gpu.sh) without a GPU: its phase plan and budget,
the skip logic, the status files, the SDPA-flash lse helper, and that the GPU-only scripts at
least compile. (The session itself is dry-run end to end by `BENCH_DEVICE=cpu bash
benchmarks/run_gpu.sh`; see benchmarks/results/.)"""
import importlib.util
import math
import py_compile
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kawhi_kernels.bench import session
from kawhi_kernels.bench.accuracy import attention_lse
from kawhi_kernels.bench.cases import ATTENTION_BACKENDS, COSINE_BACKENDS, KAWHI_VARIANTS, SGUF_BACKENDS
from kawhi_kernels.bench.flash_lse import LN2, lse_units, sdpa_flash_lse, to_natural_log
from kawhi_kernels.bench.shapes import OPS, shapes_for

ROOT = Path(__file__).resolve().parents[1]


def _load_gpu_checks():
    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "benchmarks" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_fits_one_command_with_time_to_spare():
    total_timeout, total_estimate = session.budget_seconds()
    assert total_timeout <= session.TARGET_SECONDS < session.HARD_LIMIT_SECONDS
    assert total_estimate < total_timeout
    assert all(p.estimate <= p.timeout for p in session.PHASES)
    assert [p.name for p in session.PHASES] == ["build", "correctness", "plan_gpu", "benchmark", "sanitizer"]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cuda_only_phases_are_skipped_without_cuda(device, monkeypatch):
    monkeypatch.setattr(session, "cuda_available", lambda: False)
    plan = session.phase_plan(device)
    for phase, skip in plan:
        if phase.needs_cuda:
            assert skip is not None and skip.startswith("skipped: no CUDA")
        else:
            assert skip is None
    assert {p.name for p, s in plan if s} == {"plan_gpu", "sanitizer"}


def test_nothing_is_skipped_with_cuda(monkeypatch):
    monkeypatch.setattr(session, "cuda_available", lambda: True)
    assert all(skip is None for _, skip in session.phase_plan("cuda"))
    # BENCH_DEVICE=cpu skips the CUDA phases even on a GPU machine.
    assert {p.name for p, s in session.phase_plan("cpu") if s} == {"plan_gpu", "sanitizer"}
    with pytest.raises(ValueError, match="device"):
        session.phase_plan("tpu")


def test_shell_plan_evaluates_in_bash():
    script = (f'eval "$({sys.executable} -m kawhi_kernels.bench.session plan --device cpu)"; '
              'echo "$T_build|$SKIP_build|$SKIP_sanitizer|$SWEEPS|$SWEEP_0_ARGS"')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    t_build, skip_build, skip_san, sweeps, args = out.stdout.strip().split("|", 4)
    assert int(t_build) == session.PHASES[0].timeout and skip_build == ""
    assert skip_san.startswith("skipped: no CUDA") and int(sweeps) == len(session.CPU_SWEEPS)
    assert args.startswith("--quick --shapes ")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_sweep_names_existing_shapes_and_backends(device):
    quick = device == "cpu"
    names = [s.name for op in OPS for s in shapes_for(op, quick)]
    known_backends = set(ATTENTION_BACKENDS) | set(COSINE_BACKENDS) | set(SGUF_BACKENDS) | set(KAWHI_VARIANTS)
    for label, args, share in session.sweeps_for(device):
        assert 0 < share <= 1
        pattern = args[args.index("--shapes") + 1]
        for alternative in pattern.split("|"):
            assert any(re.search(alternative, n) for n in names), (label, alternative)
        if "--backends" in args:
            wanted = args[args.index("--backends") + 1].split(",")
            assert set(wanted) <= known_backends, set(wanted) - known_backends
    assert sum(share for _, _, share in session.sweeps_for(device)) <= 1.0 + 1e-9
    if device == "cuda":   # the DESIGN §7 headline shapes are all in the GPU sweeps
        joined = "|".join(a[a.index("--shapes") + 1] for _, a, _ in session.GPU_SWEEPS)
        for shape in ("am-target-7b", "am-target-4b", "am-colsum-16kx16k", "cos-target-7b",
                      "sguf-32x32-p28", "kawhi-7b-width"):
            assert re.search(joined, shape), shape


def test_record_phase_writes_csv_and_markdown(tmp_path):
    session.record_phase(tmp_path, "build", 0, 12.3, "built")
    session.record_phase(tmp_path, "correctness", 124, 95, "cut")
    session.record_phase(tmp_path, "sanitizer", None, 0, skip="skipped: no CUDA")
    text = (tmp_path / "phases.md").read_text()
    assert "| build | ok | 0 | 12 |" in text and "timed out" in text and "skipped: no CUDA" in text
    assert session.phase_status(3) == "failed (exit 3)" and session.phase_status(137) == "timed out"
    with pytest.raises(ValueError, match="phase"):
        session.record_phase(tmp_path, "nope", 0, 0)


def test_header_labels_a_cpu_dry_run(tmp_path, monkeypatch):
    monkeypatch.setenv("KAWHI_GIT_COMMIT", "abc123")
    text = session.write_header(tmp_path, "bash benchmarks/run_gpu.sh", "cpu").read_text()
    assert "CPU DRY RUN" in text and "abc123" in text and "bash benchmarks/run_gpu.sh" in text
    assert "skipped: no CUDA" in text


def test_sdpa_flash_lse_matches_logsumexp_and_units_are_detected():
    gen = torch.Generator().manual_seed(3)
    lengths, rows, hq, hk, d = [37, 20], [11, 20], 7, 1, 24
    q_full = torch.randn(sum(lengths), hq, d, generator=gen)
    k_full = torch.randn(sum(lengths), hk, d, generator=gen)
    cu = torch.tensor([0, 37, 57], dtype=torch.int32)
    index = torch.cat([torch.arange(37 - 11, 37), torch.arange(37, 57)])
    cu_q = torch.tensor([0, 11, 31], dtype=torch.int32)
    scale = 1.0 / math.sqrt(d)
    want = attention_lse(q_full[index], k_full, cu_q, cu, True, scale)
    got = sdpa_flash_lse(q_full, k_full, cu, rows, softmax_scale=scale)
    units, err = lse_units(got, want)
    assert units == "natural" and err < 1e-4 and got.shape == (hq, 31)
    units2, err2 = lse_units(got / LN2, want)
    assert units2 == "log2" and err2 < 1e-4
    torch.testing.assert_close(to_natural_log(got / LN2, "log2"), want, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="rows_per_seq"):
        sdpa_flash_lse(q_full, k_full, cu, [38, 1], softmax_scale=scale)


def test_the_correctness_comparison_can_fail():
    checks = _load_gpu_checks()
    ref = torch.rand(5, 3, 4)
    assert checks.compare(ref + 1e-7, ref, 1e-5, 1e-4)[0]
    assert not checks.compare(ref + 1e-3, ref, 1e-5, 1e-4)[0]
    bad = ref.clone()
    bad[0, 0, 0] = float("nan")
    ok, _, _, detail = checks.compare(bad, ref, 1.0, 1.0)
    assert not ok and "non-finite" in detail
    assert not checks.compare(ref[:4], ref, 1.0, 1.0)[0]
    seg = torch.tensor([0, 0, -1, 2, 2])
    summed = checks.segment_sum(ref, seg, 3)
    torch.testing.assert_close(summed[0], ref[0] + ref[1])
    assert summed[1].abs().max() == 0


def test_gpu_only_scripts_compile():
    for path in ("benchmarks/gpu_checks.py", "benchmarks/sanitizer_triton_cases.py"):
        py_compile.compile(str(ROOT / path), doraise=True)
    for script in ("benchmarks/run_gpu.sh", "benchmarks/run_cuda_sanitizer.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / script)], timeout=30).returncode == 0


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_sweep_parses_and_selects_its_cases(device):
    from kawhi_kernels.bench.cli import build_parser, collect_cases
    from kawhi_kernels.bench.shapes import parse_ops

    labels = []
    for _, args, _ in session.sweeps_for(device):
        parsed = build_parser().parse_args(args + ["--device", "cpu", "--time-budget", "10"])
        backends = parsed.backends.split(",") if parsed.backends else None
        cases = collect_cases(parse_ops(parsed.ops), parsed.quick, parsed.shapes, backends)
        assert cases
        labels += [c.label for c in cases]
    if device == "cuda":
        for want in ("attention_mass/am-target-7b/naive", "attention_mass/am-target-7b/triton+lse",
                     "attention_mass/am-target-7b/cuda+lse", "attention_mass/am-target-7b/flash",
                     "attention_mass/am-target-7b/flex", "attention_mass/am-colsum-16kx16k/flash_colreduce",
                     "cosine_alignment/cos-target-7b/read_bound", "sguf/sguf-32x32-p28/numpy_skimage",
                     "kawhi_step/kawhi-7b-width/forward+capture"):
            assert want in labels, want
        assert labels.index("kawhi_step/kawhi-7b-width/forward") < labels.index("attention_mass/am-target-4b/naive")


def test_cuda_flash_lse_layout_is_batch_heads_rows_fp32():
    # The CUDA kernel's meta function states the layout sdpa_flash_lse relies on: [B, H, L] fp32.
    q = torch.empty(2, 28, 300, 128, device="meta", dtype=torch.bfloat16)
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.0, is_causal=True,
                                                             return_debug_mask=False, scale=0.1)
    assert tuple(out[1].shape) == (2, 28, 300) and out[1].dtype == torch.float32
