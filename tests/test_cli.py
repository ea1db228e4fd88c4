"""The command line entry points parse and run."""
import pytest

from kawhi_kernels.cli import main


def test_info_lists_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "kawhi_kernels 0.1.0" in out
    for backend in ("torch", "triton", "cuda"):
        assert f"  {backend}" in out
    assert "torch   available" in out


def test_heads_help_passes_through(capsys):
    try:
        code = main(["heads", "--help"])
    except SystemExit as exit_info:  # argparse exits after printing help
        code = exit_info.code
    assert code == 0
    assert "presets" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
