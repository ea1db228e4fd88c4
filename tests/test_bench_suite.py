"""Smoke test of the benchmark suite in CPU quick mode: one sweep into tmp_path, then the CSV
columns and statuses, the markdown report and the PNG plots are checked."""
import csv
import math

import pytest

import torch

from kawhi_kernels.bench import CSV_COLUMNS, run_bench_cli
from kawhi_kernels.bench.cases import BenchContext, Case, Prepared, Unavailable, cases_for, filter_backends
from kawhi_kernels.bench.env import run_metadata
from kawhi_kernels.bench.runner import run_cases
from kawhi_kernels.bench.report import markdown_report
from kawhi_kernels.bench.shapes import AttentionShape, filter_shapes, parse_ops, shapes_for
from kawhi_kernels.bench.timing import percentiles

STATUS_PREFIXES = ("ok", "OOM", "unavailable: ", "error: ", "skipped: ")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = run_bench_cli(["--", "--quick", "--device", "cpu", "--out", str(out), "--repeats", "1",
                          "--warmup", "0", "--copies", "1", "--no-progress", "--quiet"])
    with (out / "results.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows = reader.fieldnames, list(reader)
    return code, out, header, rows


def test_quick_sweep_writes_csv_with_all_columns(quick_run):
    code, _, header, rows = quick_run
    assert code == 0
    assert header == CSV_COLUMNS
    for column in ("op", "backend", "dtype", "p50_ms", "p20_ms", "p80_ms", "peak_mib", "max_rel_err",
                   "status", "gpu", "torch", "triton", "cuda", "git_commit", "date", "command"):
        assert column in header
    assert {r["op"] for r in rows} == {"attention_mass", "cosine_alignment", "sguf", "kawhi_step",
                                      "grid_pyramid"}
    assert len({r["run_id"] for r in rows}) == 1
    for r in rows:
        assert r["status"].startswith(STATUS_PREFIXES), r["status"]
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["gpu"].startswith("none (CPU run")
        assert r["peak_mib"] == "n/a"                      # not measured on CPU
        assert "--quick" in r["command"]


def test_quick_sweep_measures_reference_backends_on_cpu(quick_run):
    _, _, _, rows = quick_run
    by_key = {(r["op"], r["shape"], r["backend"], r["lse"]): r for r in rows}
    for backend, lse in (("naive", "False"), ("torch", "False"), ("torch", "True")):
        row = by_key[("attention_mass", "q-am-L256-r16", backend, lse)]
        assert row["status"] == "ok", row["status"]
        p20, p50, p80 = float(row["p20_ms"]), float(row["p50_ms"]), float(row["p80_ms"])
        assert 0 < p20 <= p50 <= p80
        assert float(row["max_rel_err"]) < 1e-4        # fp32 vs the fp64 reference
    # Fused backends are not timed on CPU tensors (Triton would need its interpreter, CUDA a
    # GPU): recorded as unavailable rows, not raised.
    for backend in ("triton", "cuda"):
        assert by_key[("attention_mass", "q-am-L256-r16", backend, "False")]["status"].startswith("unavailable: ")
    colreduce = by_key[("attention_mass", "q-am-colsum-256", "flash_colreduce", "False")]
    assert colreduce["status"].startswith("unavailable: ")
    assert by_key[("sguf", "q-sguf-8x8", "kawhi", "False")]["status"] == "ok"
    capture = by_key[("kawhi_step", "q-kawhi-tiny", "forward+capture", "False")]
    assert capture["status"] == "ok" and float(capture["max_rel_err"]) == 0.0   # logits unchanged


def test_quick_sweep_writes_markdown_and_plots(quick_run):
    _, out, _, rows = quick_run
    run_id = rows[0]["run_id"]
    report = (out / f"report-{run_id}.md").read_text()
    assert "CPU results" in report and "not GPU results" in report
    assert "| naive |" in report and "speedup vs naive" in report and "overhead vs forward" in report
    data = (out / f"time_vs_seq-{run_id}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not (out / f"memory_vs_seq-{run_id}.png").exists()     # no peak memory on CPU: no plot


def test_csv_is_appended_not_overwritten(tmp_path):
    args = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--ops", "sguf", "--repeats", "1",
            "--warmup", "0", "--copies", "1", "--no-progress", "--quiet", "--no-plots"]
    assert run_bench_cli(args) == 0
    assert run_bench_cli(args) == 0
    with (tmp_path / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and len({r["run_id"] for r in rows}) <= 2


def test_markdown_ratios_use_the_baseline_of_the_same_run():
    meta = dict(run_id="r", date="d", device="cuda:0", gpu="G", dtype="bfloat16", torch="t", triton="t",
                cuda="c", git_commit="g", command="cmd")
    base = dict(op="attention_mass", shape="s", batch=1, seq_len=8, rows=4, image_tokens=4, regions="16",
                output="rows", heads="4/2/8", causal=True, lse=False, max_rel_err=None, note="")
    records = [dict(base, backend="naive", p50_ms=10.0, p20_ms=9.0, p80_ms=11.0, peak_mib=100.0, status="ok"),
               dict(base, backend="triton", p50_ms=2.0, p20_ms=1.0, p80_ms=3.0, peak_mib=4.0, status="ok"),
               dict(base, backend="flash", p50_ms=4.0, p20_ms=4.0, p80_ms=4.0, peak_mib=8.0, status="ok"),
               dict(base, backend="cuda", p50_ms=None, p20_ms=None, p80_ms=None, peak_mib=None, status="OOM")]
    text = markdown_report(records, meta, warmup=1, copies=1)
    triton_line = next(line for line in text.splitlines() if line.startswith("| triton |"))
    assert "5.00×" in triton_line and "0.04" in triton_line and "0.50" in triton_line
    assert "CPU results" not in text
    assert "| OOM |" in next(line for line in text.splitlines() if line.startswith("| cuda |"))


def test_percentiles_and_filters():
    t = percentiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.p20_ms, t.p50_ms, t.p80_ms, t.repeats) == (1.8, 3.0, 4.2, 5)
    with pytest.raises(ValueError, match="times_ms"):
        percentiles([])
    assert parse_ops("sguf, kawhi_step") == ["sguf", "kawhi_step"]
    with pytest.raises(ValueError, match="ops"):
        parse_ops("attention,sguf")
    names = [s.name for s in filter_shapes(shapes_for("attention_mass", False), "colsum")]
    assert names == ["am-colsum-16kx16k", "am-colsum-512x256k"]
    shape = shapes_for("attention_mass", True)[0]
    kept = filter_backends(cases_for("attention_mass", shape), ["naive", "triton+lse"])
    assert [(c.backend, c.lse) for c in kept] == [("naive", False), ("triton", True)]
    with pytest.raises(ValueError, match="exceeds seq_len"):
        AttentionShape("bad", "x", 1, 100, 90, (4, 4), "16")


def test_full_sweep_covers_the_issue_axes():
    am = shapes_for("attention_mass", False)
    seq = sorted(s.seq_len for s in am if s.family == "seq")
    assert seq[0] == 1024 and seq[-1] == 16384
    assert {s.regions for s in am} >= {"16", "64", "patch"}
    assert {s.heads for s in am} >= {"qwen2.5-vl-7b", "qwen3-vl-4b"}
    assert min(s.rows for s in am if s.regions != "key") == 256
    assert max(s.rows for s in am if s.regions != "key") == 2048
    assert {s.image_tokens for s in am if s.regions != "key"} >= {256, 2500}
    assert any(s.segments > 0 and s.regions != "key" for s in am)
    target = next(s for s in am if s.name == "am-target-7b")
    assert (target.batch, target.seq_len, target.image_tokens, target.rows) == (8, 4096, 1024, 2048)
    assert {k.model for k in shapes_for("kawhi_step", False)} == {"tiny", "7b-width"}
    assert all(math.isqrt(s.image_tokens) ** 2 == s.image_tokens for s in shapes_for("sguf", False))


class _FakeShape:
    name, family = "fake", "fake"

    def columns(self):
        return dict(shape=self.name, batch=1, seq_len=8, rows=2, image_tokens=4, regions="16",
                    output="rows", heads="4/2/8", causal=True)


def _raise(exc):
    def build(ctx):
        raise exc
    return build


def test_runner_records_oom_unavailable_error_and_interrupt_without_crashing():
    calls = []

    def ok_build(ctx):
        return Prepared(lambda i: calls.append(i) or torch.ones(3), copies=2,
                        check=lambda out: 0.25, note="fine")

    def oom_in_timing(ctx):
        def run(i):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return Prepared(run, copies=1)

    shape = _FakeShape()
    cases = [Case("attention_mass", "naive", shape, ok_build),
             Case("attention_mass", "torch", shape, oom_in_timing),
             Case("attention_mass", "triton", shape, _raise(Unavailable("no GPU"))),
             Case("attention_mass", "cuda", shape, _raise(ValueError("bad\nshape"))),
             Case("attention_mass", "flex", shape, _raise(KeyboardInterrupt())),
             Case("attention_mass", "flash", shape, ok_build)]
    ctx = BenchContext(torch.device("cpu"), torch.float32, copies=2)
    meta = run_metadata(ctx.device, ctx.dtype, "test")
    seen = []
    records = run_cases(cases, ctx, meta, warmup=1, repeats=3, progress=False, on_record=seen.append)
    assert [r["status"] for r in records] == [
        "ok", "OOM", "unavailable: no GPU", "error: ValueError: bad shape", "skipped: interrupted",
        "skipped: interrupted"]
    assert seen == records
    assert calls == [0, 1, 0, 1, 0]          # warm-up, 3 timed calls rotating copies, memory/check call
    assert records[0]["max_rel_err"] == 0.25 and records[0]["repeats"] == 3 and records[0]["note"] == "fine"
    assert records[0]["peak_mib"] is None    # not measured on CPU
    assert "64.00 GiB" in records[1]["note"] and records[1]["p50_ms"] is None


def test_time_budget_skips_remaining_cases():
    shape = _FakeShape()
    build = lambda ctx: Prepared(lambda i: None, copies=1)  # noqa: E731
    ctx = BenchContext(torch.device("cpu"), torch.float32, copies=1)
    meta = run_metadata(ctx.device, ctx.dtype, "test")
    records = run_cases([Case("sguf", "kawhi", shape, build)] * 2, ctx, meta, warmup=0, repeats=1,
                        time_budget=-1.0, progress=False)
    assert [r["status"] for r in records] == ["skipped: time budget"] * 2
