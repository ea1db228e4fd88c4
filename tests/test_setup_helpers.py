"""The build helpers in setup.py: CUDA arch choice (nvidia-smi vs the default list, the one-line
message, KAWHI_CUDA_ARCHS / KAWHI_CUDA=0 winning) and the persistent build dir (KAWHI_BUILD_DIR).

setup.py is loaded as a module with ``setuptools.setup`` replaced by a no-op, so nothing is
built and setup.py itself stays a plain script for pip."""
from __future__ import annotations

import importlib.util
import os
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_module(monkeypatch):
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    spec = importlib.util.spec_from_file_location("kawhi_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_nvidia_smi(tmp_path: Path, monkeypatch, stdout: str, exit_code: int = 0) -> Path:
    """Put an ``nvidia-smi`` that prints ``stdout`` first on PATH (and only it: no real one)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "payload.txt").write_text(stdout)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat '{bin_dir / 'payload.txt'}'\nexit {exit_code}\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    return smi


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("KAWHI_CUDA_ARCHS", "KAWHI_CUDA", "KAWHI_BUILD_DIR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-in for nvidia-smi")
def test_visible_archs_from_nvidia_smi(setup_module, tmp_path, clean_env):
    _fake_nvidia_smi(tmp_path, clean_env, "9.0\n8.6\n9.0\n\n12.0\n")
    assert setup_module._visible_gpu_archs() == ["120", "86", "90"]  # distinct, sorted as text


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-in for nvidia-smi")
@pytest.mark.parametrize("stdout,code", [("", 0), ("No devices were found\n", 6),
                                         ("[N/A]\n", 0)])
def test_no_visible_archs_when_nvidia_smi_sees_no_gpu(setup_module, tmp_path, clean_env, stdout, code):
    _fake_nvidia_smi(tmp_path, clean_env, stdout, code)
    assert setup_module._visible_gpu_archs() == []


def test_no_visible_archs_without_nvidia_smi(setup_module, tmp_path, clean_env):
    clean_env.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi anywhere
    assert setup_module._visible_gpu_archs() == []


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-in for nvidia-smi")
def test_visible_gpus_choose_the_archs_and_say_so(setup_module, tmp_path, clean_env, capsys):
    _fake_nvidia_smi(tmp_path, clean_env, "9.0\n8.0\n")
    setup_module._choose_cuda_archs()
    assert os.environ["KAWHI_CUDA_ARCHS"] == "80;90"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "visible GPU(s): sm_80, sm_90" in err[0] and "KAWHI_CUDA_ARCHS" in err[0]


def test_no_gpu_keeps_the_default_list_in_one_line(setup_module, tmp_path, clean_env, capsys):
    clean_env.setenv("PATH", str(tmp_path))
    setup_module._choose_cuda_archs()
    assert "KAWHI_CUDA_ARCHS" not in os.environ  # CMake's default list applies
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    line = err[0]
    assert line.startswith("kawhi-kernels: no GPU visible")
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90"):
        assert arch in line
    assert "KAWHI_CUDA_ARCHS=90" in line and "KAWHI_CUDA=0" in line


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-in for nvidia-smi")
@pytest.mark.parametrize("env", [{"KAWHI_CUDA_ARCHS": "86"}, {"KAWHI_CUDA_ARCHS": " 80;90a "},
                                 {"KAWHI_CUDA": "0"}])
def test_an_explicit_choice_wins_and_is_left_alone(setup_module, tmp_path, clean_env, capsys, env):
    smi = _fake_nvidia_smi(tmp_path, clean_env, "9.0\n")
    for name, value in env.items():
        clean_env.setenv(name, value)
    setup_module._choose_cuda_archs()
    assert os.environ.get("KAWHI_CUDA_ARCHS") == env.get("KAWHI_CUDA_ARCHS")  # unchanged (or unset)
    assert capsys.readouterr().err == ""
    assert smi.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-in for nvidia-smi")
def test_a_blank_kawhi_cuda_archs_counts_as_unset(setup_module, tmp_path, clean_env, capsys):
    _fake_nvidia_smi(tmp_path, clean_env, "8.9\n")
    clean_env.setenv("KAWHI_CUDA_ARCHS", "  ")
    setup_module._choose_cuda_archs()
    assert os.environ["KAWHI_CUDA_ARCHS"] == "89"
    assert "sm_89" in capsys.readouterr().err


class _Ext:
    name = "kawhi_kernels._C"


def test_persistent_build_dir_default_name(setup_module, tmp_path, clean_env):
    clean_env.setattr(setup_module, "ROOT", tmp_path)
    got = setup_module._persistent_build_dir(_Ext(), "Release")
    assert got == (tmp_path / "build" / f"cmake-{sys.implementation.cache_tag}-release").resolve()
    assert got.is_dir()
    debug = setup_module._persistent_build_dir(_Ext(), "Debug")
    assert debug.name == f"cmake-{sys.implementation.cache_tag}-debug" and debug != got


def test_kawhi_build_dir_overrides_the_default(setup_module, tmp_path, clean_env):
    clean_env.setattr(setup_module, "ROOT", tmp_path / "src")
    chosen = tmp_path / "cache" / "kawhi"
    clean_env.setenv("KAWHI_BUILD_DIR", f"  {chosen}  ")
    assert setup_module._persistent_build_dir(_Ext(), "Release") == chosen.resolve()
    assert chosen.is_dir() and not (tmp_path / "src" / "build").exists()
    clean_env.setenv("KAWHI_BUILD_DIR", "")  # blank: the default again
    assert setup_module._persistent_build_dir(_Ext(), "Release").parent == (tmp_path / "src" / "build").resolve()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can write into read-only folders")
def test_unwritable_tree_falls_back_to_setuptools_temp_dir(setup_module, tmp_path, clean_env):
    src = tmp_path / "ro"
    src.mkdir()
    src.chmod(0o555)
    try:
        clean_env.setattr(setup_module, "ROOT", src)
        assert setup_module._persistent_build_dir(_Ext(), "Release") is None
    finally:
        src.chmod(0o755)


def test_unusable_kawhi_build_dir_falls_back(setup_module, tmp_path, clean_env):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    clean_env.setenv("KAWHI_BUILD_DIR", str(blocker / "build"))  # mkdir under a file fails
    assert setup_module._persistent_build_dir(_Ext(), "Release") is None


def test_options_stamp_drops_the_cmake_cache_only_when_options_change(setup_module, tmp_path, clean_env):
    cache = tmp_path / "CMakeCache.txt"
    configure = ["-DCMAKE_BUILD_TYPE=Release", "-DKAWHI_OUTPUT_DIR=/tmp/one"]
    cache.write_text("x")
    setup_module._forget_cache_if_options_changed(tmp_path, configure)
    assert cache.exists()  # first stamp: nothing to compare against
    # A new temporary output dir (every pip install) keeps the cache...
    setup_module._forget_cache_if_options_changed(tmp_path, ["-DCMAKE_BUILD_TYPE=Release",
                                                             "-DKAWHI_OUTPUT_DIR=/tmp/two"])
    assert cache.exists()
    # ...another arch list does not.
    clean_env.setenv("KAWHI_CUDA_ARCHS", "90")
    setup_module._forget_cache_if_options_changed(tmp_path, configure)
    assert not cache.exists()
