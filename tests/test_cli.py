"""The command line entry points parse and run."""
import pytest
import torch

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_on_a_missing_cuda_device_says_what_to_do(capsys, tmp_path):
    from kawhi_kernels.cli import main

    assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kawhi-kernels demo: --device cuda: torch sees no CUDA device here (torch "
                   f"{torch.__version__}); run with --device cpu"]
