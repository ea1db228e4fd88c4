"""Static checks of the built CUDA kernels' SASS (no GPU needed): the tensor-core
attention_mass kernels really use tensor cores (HMMA) for both their MMAs (scores and region
mass), ldmatrix (LDSM) and cp.async (LDGSTS) inside their K-tile loops, spill nothing to
local memory, and their registers (and, for head dims up to 128, their shared memory) allow at least two CTAs per SM on every architecture built.
The table of these facts is benchmarks/results/cuda_static_sass.md
(``python tools/cuda_sass_report.py kawhi_kernels/_C*.so --markdown``).
"""
from __future__ import annotations

import sys

import pytest

from kawhi_kernels._compat import cuobjdump_path
from kawhi_kernels._extension import load_extension
from test_build import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import check_cuda_archs  # noqa: E402
import cuda_sass_report as report  # noqa: E402

sys.path.pop(0)

EXT = load_extension()
TOOL = check_cuda_archs.find_cuobjdump() or cuobjdump_path()
pytestmark = pytest.mark.skipif(
    EXT is None or not EXT.has_cuda() or TOOL is None,
    reason="needs a CUDA build of kawhi_kernels._C and cuobjdump")


@pytest.fixture(scope="module")
def kernels():
    return report.read(EXT.__file__, TOOL)


def _archs(kernels):
    return sorted({arch for arch, _ in kernels})


def _mma(kernels, arch):
    return {report.label(name): k for (a, name), k in kernels.items()
            if a == arch and "attention_mass_mma_kernel" in name}


def test_every_built_arch_has_the_eight_tensor_core_variants(kernels):
    built = [a for a in EXT.build_info()["archs"] if a.startswith("sm_")]
    assert built and set(built) <= set(_archs(kernels))
    for arch in built:
        assert sorted(_mma(kernels, arch)) == sorted(
            f"attention_mass_mma_kernel<{t}, {d}, {mode}>" for t in ("half", "bf16")
            for d in (128, 256) for mode in ("coarse", "scatter")), arch


def test_tensor_core_kernel_uses_hmma_ldmatrix_and_cp_async_in_its_k_loop(kernels):
    for arch in _archs(kernels):
        for name, k in _mma(kernels, arch).items():
            assert k.counts["HMMA"] > 0 and k.counts["LDSM"] > 0 and k.counts["LDGSTS"] > 0, \
                (arch, name, k.counts)
            # a loop holding the prefetch (LDGSTS) and the MMAs: the K-tile loop
            assert any({"HMMA", "LDSM", "LDGSTS"} <= ops for ops in k.loops_with), (arch, name)


def test_both_mmas_are_on_tensor_cores(kernels):
    """Scores (Q K^T: D/16 x 8 HMMAs per K tile, in pass 1 and pass 2) and region mass (P hi and
    lo x one-hot: 4 k-chunks x 8 region n-tiles x 2, always fp16 inputs). In the bf16 kernels
    the two are told apart by input type, and the mass MMA must sit in the pass-2 K loop,
    next to the cp.async prefetch and the ldmatrix reads."""
    for arch in _archs(kernels):
        for name, k in _mma(kernels, arch).items():
            dim = report.mma_variant_dim(k.name)
            scores = 2 * (dim // 16) * 8
            mass = 4 * 8 * 2
            if "bf16" in name:
                assert k.counts["HMMA.BF16"] >= scores, (arch, name, k.counts)
                assert k.counts["HMMA.F16"] >= mass, (arch, name, k.counts)
                assert any({"HMMA.F16", "HMMA.BF16", "LDSM", "LDGSTS"} <= ops
                           for ops in k.loops_with), (arch, name)
            else:
                assert k.counts["HMMA.BF16"] == 0, (arch, name)
                assert k.counts["HMMA.F16"] >= scores + mass, (arch, name, k.counts)


def test_tensor_core_kernel_fits_two_ctas_per_sm(kernels):
    for arch in _archs(kernels):
        for name, k in _mma(kernels, arch).items():
            assert report.ctas_by_registers(k.registers, 128) >= 2, (arch, name, k.registers)
            dim = report.mma_variant_dim(k.name)
            smem = report.ctas_by_shared(arch, EXT.mma_layout.shared_bytes(dim), k.static_shared)
            if dim <= 128 and smem is not None:
                assert smem >= 2, (arch, name, smem)


def test_no_kernel_uses_local_memory(kernels):
    for (arch, name), k in kernels.items():
        assert k.local == 0, (arch, report.label(name), k.local)
        if "attention_mass" in name:    # (cosine's region_mean_keys_kernel has an 8-byte frame)
            assert k.stack == 0, (arch, report.label(name), k.stack)


def test_the_warp_per_row_kernel_has_no_tensor_cores(kernels):
    # The check can fail: the old kernel is the negative control of the HMMA count.
    for (arch, name), k in kernels.items():
        if "attention_mass_kernel" in name and "mma" not in name:
            assert k.counts["HMMA"] == 0, (arch, name)


def test_register_and_shared_memory_occupancy_arithmetic():
    assert report.ctas_by_registers(181, 128) == 2      # 5888 registers per warp, 4 warps
    assert report.ctas_by_registers(255, 128) == 2
    assert report.ctas_by_registers(64, 128) == 8
    assert report.ctas_by_shared("sm_86", 66048, 0) == 1
    assert report.ctas_by_shared("sm_80", 33792, 0) == 4
