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


# ----------------------------------------------------------------- bandwidth-bound kernels
# cosine_alignment and grid_pyramid: 16-byte loads (LDG.E.128) inside their loops in the vector
# variants, none in the scalar fallbacks (the negative control), and registers that leave room
# for at least four CTAs per SM.

@pytest.fixture(scope="module")
def wide():
    return report.read_wide_loads(EXT.__file__, TOOL)


def _bandwidth(wide, arch, base):
    return {report.bandwidth_label(name): loads for (a, name), loads in wide.items()
            if a == arch and report.bandwidth_kernel(name) == base}


def test_bandwidth_kernels_exist_for_every_dtype_and_variant(wide):
    for arch in [a for a in EXT.build_info()["archs"] if a.startswith("sm_")]:
        for base in ("cosine_rows_kernel", "region_mean_keys_kernel"):
            assert sorted(_bandwidth(wide, arch, base)) == sorted(
                f"{base}<{t}, {v}>" for t in ("half", "bf16", "float")
                for v in ("vector", "scalar")), (arch, base)
        assert sorted(_bandwidth(wide, arch, "grid_pyramid_kernel")) == sorted(
            f"grid_pyramid_kernel<{t}>" for t in ("half", "bf16", "float")), arch


def test_vector_variants_load_16_bytes_in_their_loops_and_scalar_ones_do_not(wide):
    for (arch, name), (total, in_loop) in wide.items():
        tag = (arch, report.bandwidth_label(name), total, in_loop)
        if "Lb0E" in name:
            assert total == 0, tag
        else:   # the vector cosine variants and grid_pyramid (its strip loads)
            assert in_loop >= 1, tag


def test_bandwidth_kernels_fit_four_ctas_per_sm(kernels, wide):
    for (arch, name) in wide:
        k = kernels[(arch, name)]
        threads = report.BANDWIDTH_THREADS[report.bandwidth_kernel(name)]
        assert k.local == 0 and k.stack == 0, (arch, report.bandwidth_label(name))
        assert report.ctas_by_registers(k.registers, threads) >= 4, (arch, name, k.registers)
        if "grid_pyramid" in name:
            assert report.ctas_by_shared(arch, report.GRID_PYRAMID_SHARED_BYTES,
                                         k.static_shared) >= 2, arch


def test_wide_load_count_reads_loops():
    code = ("        /*0000*/                   MOV R1, c[0x0][0x28] ;\n"
            "        /*0010*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;\n"
            "        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;\n"
            "        /*0030*/                   LDG.E.U16 R9, desc[UR4][R2.64] ;\n"
            "        /*0040*/               @P0 BRA 0x20 ;\n"
            "        /*0050*/                   EXIT ;\n")
    assert report.wide_loads(code) == (2, 1)
