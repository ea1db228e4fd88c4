"""Packaging: the pure package finds its native module in-tree or in a kawhi-kernels-cudaNN
companion, says why a candidate was not taken, and the companion metadata a build renders is
what an index accepts (no local version label) and what the extras pin."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kawhi_kernels
from kawhi_kernels import _extension
from kawhi_kernels._extension import CANDIDATES, find_native_module

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    tomllib = None
needs_tomllib = pytest.mark.skipif(tomllib is None, reason="tomllib needs Python >= 3.11")


def _fake_native(root: Path, package: str, *, cuda: str | None = "13.0", runtime_ok: bool = True,
                 broken: bool = False) -> str:
    """A Python stand-in for a native ``<package>._C`` with the API the loader queries."""
    pkg = root / package
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    if broken:
        (pkg / "_C.py").write_text("raise ImportError('libfoo.so.1: cannot open shared object')\n")
        return f"{package}._C"
    (pkg / "_C.py").write_text(textwrap.dedent(f"""
        def has_cuda():
            return {cuda is not None}
        def build_info():
            return {{"cuda": {cuda!r}, "archs": ["sm_90", "compute_90"], "compiler": "fake"}}
        def cuda_driver_version():
            return 12040
        def cuda_device_count():
            if not {runtime_ok}:
                raise RuntimeError("cudaGetDeviceCount: CUDA driver version is insufficient")
            return 1
    """))
    return f"{package}._C"


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in list(sys.modules):
        if name.startswith("kk_fake_"):
            del sys.modules[name]


def test_nothing_installed_says_not_installed_for_every_candidate(fake_root):
    cands = (("kk_fake_a._C", "dist-a", None), ("kk_fake_b._C", "dist-b", 13))
    module, chosen, tried, error = find_native_module(cands)
    assert module is None and chosen is None
    assert [c.status for c in tried] == ["not installed", "not installed"]
    assert error == "kk_fake_a._C: not installed; kk_fake_b._C: not installed"


def test_in_tree_build_wins_and_later_candidates_are_not_tried(fake_root):
    a = _fake_native(fake_root, "kk_fake_tree", runtime_ok=False)  # in-tree: taken regardless
    b = _fake_native(fake_root, "kk_fake_c13")
    module, chosen, tried, error = find_native_module(((a, "tree", None), (b, "c13", 13)))
    assert module.__name__ == a and chosen.distribution == "tree" and error is None
    assert [c.status for c in tried] == ["loaded", "not tried"]


def test_companion_whose_runtime_cannot_query_devices_yields_to_one_that_can(fake_root):
    c13 = _fake_native(fake_root, "kk_fake_c13", runtime_ok=False)
    c12 = _fake_native(fake_root, "kk_fake_c12", cuda="12.4")
    module, chosen, tried, _ = find_native_module(((c13, "c13", 13), (c12, "c12", 12)))
    assert module.__name__ == c12 and chosen.cuda_major == 12
    assert tried[0].status == "no usable CUDA runtime"
    assert "CUDA 13.0 runtime cannot query devices" in tried[0].reason
    assert "driver version 12040" in tried[0].reason


def test_without_a_usable_runtime_the_first_importable_companion_is_kept(fake_root):
    # No GPU at all (CI): the module still serves its host-side code and says why CUDA cannot run.
    c13 = _fake_native(fake_root, "kk_fake_c13", runtime_ok=False)
    c12 = _fake_native(fake_root, "kk_fake_c12", cuda="12.4", runtime_ok=False)
    module, chosen, tried, error = find_native_module(((c13, "c13", 13), (c12, "c12", 12)))
    assert module.__name__ == c13 and chosen.status == "no usable CUDA runtime" and error is None


def test_load_error_is_reported_with_its_reason(fake_root):
    bad = _fake_native(fake_root, "kk_fake_bad", broken=True)
    module, _, tried, error = find_native_module(((bad, "bad", 12),))
    assert module is None and tried[0].status == "load error"
    assert "libfoo.so.1: cannot open shared object" in tried[0].reason and "load error" in error


def test_candidates_are_the_in_tree_build_then_one_companion_per_cuda_major():
    assert CANDIDATES[0] == ("kawhi_kernels._C", "kawhi-kernels (in-tree build)", None)
    for module, dist, major in CANDIDATES[1:]:
        assert module == f"kawhi_kernels_cuda{major}._C" and dist == f"kawhi-kernels-cuda{major}"
    assert sorted(major for *_, major in CANDIDATES[1:]) == [12, 13]


def test_extension_info_names_the_distribution_it_loaded():
    info = _extension.extension_info()
    if info["available"]:
        assert (info["module"], info["distribution"], info["cuda_major"]) in {
            (m, d, c) for m, d, c in CANDIDATES}
    else:
        assert info["module"] is None and info["candidates"]


def test_info_cli_prints_the_native_build_line(capsys):
    from kawhi_kernels.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^native build  (none loaded|kawhi-kernels\S* .*: kawhi_kernels\S*\._C, )",
                     out, re.M), out


@needs_tomllib
def test_extras_pin_the_companions_to_this_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for major in (12, 13):
        assert extras[f"cuda{major}"] == [f"kawhi-kernels-cuda{major}=={kawhi_kernels.__version__}"]


@needs_tomllib
@pytest.mark.parametrize("major,minor", [(12, 4), (13, 0)])
def test_companion_templates_render_index_acceptable_metadata(major, minor):
    subst = {"@MAJOR@": str(major), "@MINOR@": str(minor), "@VERSION@": kawhi_kernels.__version__}
    text = (ROOT / "tools" / "native_dist" / "pyproject.toml.in").read_text()
    init = (ROOT / "tools" / "native_dist" / "__init__.py.in").read_text()
    for key, value in subst.items():
        text, init = text.replace(key, value), init.replace(key, value)
    assert "@" not in text and "@" not in init
    project = tomllib.loads(text)["project"]
    assert project["name"] == f"kawhi-kernels-cuda{major}"
    assert re.fullmatch(r"\d+(\.\d+)*", project["version"])  # PEP 440 public: no "+local" label
    assert project["dependencies"] == []  # static CUDA runtime, no torch link
    namespace: dict = {}
    exec(compile(init, "__init__.py", "exec"), namespace)
    assert namespace["CUDA_MAJOR"] == major and namespace["CUDA_VERSION"] == f"{major}.{minor}"


def test_pure_build_has_no_extension_modules():
    probe = ("import os, runpy, setuptools\n"
             "seen = {}\n"
             "setuptools.setup = lambda **kw: seen.update(kw)\n"
             "os.environ['KAWHI_PURE'] = '1'\n"
             "runpy.run_path('setup.py', run_name='__main__')\n"
             "print(len(seen['ext_modules']))\n"
             "os.environ['KAWHI_PURE'] = ''\n"
             "runpy.run_path('setup.py', run_name='__main__')\n"
             "print(len(seen['ext_modules']))\n")
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", "1"]


# ---------------------------------------------------------------- the wheel scripts (CI leg 6)

CI_WHEELS_COMMAND = "timeout 2400 bash tools/ci_wheels.sh --python python3 --out .ci-wheels"


def test_ci_runs_the_wheel_leg():
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    # the leg runs beside the floor leg: its status is kept, then fails CI once both have ended
    assert [c for c in commands if c.startswith(CI_WHEELS_COMMAND)] == \
        [CI_WHEELS_COMMAND + " || wheels_status=$?"]
    assert any('"$wheels_status" -ne 0' in c for c in commands)
    assert commands[-1] == "fi" and "exit 1" in commands[-2]


def test_ci_wheels_script_arguments_and_steps():
    script = ROOT / "tools" / "ci_wheels.sh"
    res = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown argument '--bogus'" in res.stderr
    text = script.read_text()
    steps = re.findall(r"^step (\w+) ", text, re.M)
    assert steps == ["pure", "cuda13", "cuda12", "check"]
    res = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "Usage: tools/ci_wheels.sh" in res.stdout
    assert all(re.search(rf"^#   {s} +tools/", res.stdout, re.M) for s in steps), res.stdout


def test_check_wheels_script_arguments():
    script = ROOT / "tools" / "check_wheels.sh"
    res = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown argument '--bogus'" in res.stderr
    res = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--deps-only" in res.stdout and ".pth" in res.stdout


def test_cuda12_toolchain_names_the_mirror_when_it_is_unreachable(tmp_path):
    # Port 9 (discard) on the loopback: refused at once, nothing is downloaded.
    env = {**os.environ, "KAWHI_DEBIAN_MIRROR": "http://127.0.0.1:9/debian"}
    res = subprocess.run(["bash", str(ROOT / "tools" / "cuda12_toolchain.sh"), "--cache",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1 and res.stdout == ""
    assert "ERROR:" in res.stderr and "http://127.0.0.1:9/debian" in res.stderr
    assert "KAWHI_DEBIAN_MIRROR" in res.stderr
    assert not (tmp_path / "cuda-12.4").exists()


def _sync(src: Path, dst: Path) -> int:
    res = subprocess.run(["bash", str(ROOT / "tools" / "sync_tree.sh"), str(src), str(dst)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return int(res.stdout)


def test_sync_tree_rewrites_only_changed_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    for name, text in {"a.cu": "a", "b.cpp": "b", "sub/c.h": "c"}.items():
        (src / name).write_text(text)
    assert _sync(src, dst) == 3
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        "a.cu", "b.cpp", "sub/c.h"]
    old = 1_000_000_000
    for p in dst.rglob("*"):
        os.utime(p, (old, old))
    assert _sync(src, dst) == 0  # nothing changed: no file is touched
    assert all(p.stat().st_mtime == old for p in dst.rglob("*") if p.is_file())

    (src / "a.cu").write_text("a2")              # changed
    (src / "sub" / "c.h").unlink()               # removed
    (src / "new_kernel.cu").write_text("n")      # added (a new csrc/*.cu)
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "x.pyc").write_text("junk")  # never mirrored
    assert _sync(src, dst) == 3
    assert (dst / "a.cu").read_text() == "a2" and (dst / "new_kernel.cu").read_text() == "n"
    assert not (dst / "sub").exists() and not (dst / "__pycache__").exists()
    assert (dst / "b.cpp").stat().st_mtime == old  # untouched: make will not recompile it
