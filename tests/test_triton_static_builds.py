"""Static GPU checks of every Triton kernel configuration, without a GPU.

``kawhi_kernels.triton.builds`` compiles each configuration the launchers can choose (their own
``kernel_builds()`` lists) for sm_80 and sm_90 and reads the cubins with Triton's cuobjdump. This
test runs it in a subprocess without ``TRITON_INTERPRET`` and requires, for every build: it
compiles; no local memory (register spills); shared memory within the arch's per-block limit;
tensor-core instructions in the kernels whose products must use them. It also checks that
every ``@triton.jit`` kernel of the package is covered and that the checker flags bad builds.
"""
import inspect
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from kawhi_kernels._compat import cuobjdump_path  # noqa: E402
from kawhi_kernels.triton import builds as B  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)


def _can_compile_for_nvidia() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(90).path
    except (ImportError, RuntimeError, AttributeError) as exc:
        return f"Triton has no NVIDIA backend here: {exc}"
    if not ptxas or not os.path.exists(ptxas):
        return "Triton's NVIDIA backend ships no ptxas"
    if cuobjdump_path() is None:
        return "Triton's NVIDIA backend ships no cuobjdump"
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    reason = _can_compile_for_nvidia()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("builds") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "kawhi_kernels.triton.builds", "--arch", *map(str, ARCHS),
           "--jobs", str(min(4, os.cpu_count() or 1)), "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if not out.exists():
        pytest.fail(f"the build check wrote no report:\n{run.stderr[-4000:]}")
    rows = json.loads(out.read_text())
    return rows, run


def test_every_configuration_compiles_without_spills_within_shared_memory_on_tensor_cores(report):
    rows, run = report
    names = {b.name for b in B.all_kernel_builds()}
    assert {(r["name"], r["arch"]) for r in rows} == {(n, a) for n in names for a in ARCHS}
    failures = [f"{r['name']} sm_{r['arch']}: {'; '.join(B.problems(r))}" for r in rows
                if B.problems(r)]
    assert not failures, "\n".join(failures)
    assert run.returncode == 0, run.stderr[-3000:]


def test_attention_mass_uses_wgmma_on_sm90_for_half_precision(report):
    rows, _ = report
    half = [r for r in rows if r["name"].startswith("attention_mass f") and r["arch"] == 90
            and " fp32 " not in r["name"]]
    assert half and all(r["hgmma"] > 0 for r in half)


def test_every_jit_kernel_of_the_package_has_builds():
    import triton

    from kawhi_kernels.triton import attention_mass, cosine_alignment, grid_pyramid, sguf_descriptors

    # JITFunction when compiled, InterpretedFunction under TRITON_INTERPRET: both KernelInterface.
    kernels = {obj for module in (attention_mass, cosine_alignment, grid_pyramid, sguf_descriptors)
               for _, obj in inspect.getmembers(module)
               if isinstance(obj, triton.runtime.jit.KernelInterface)
               and obj.fn.__module__ == module.__name__ and obj.fn.__name__.endswith("_kernel")}
    covered = {b.kernel for b in B.all_kernel_builds()}
    assert kernels and kernels <= covered, sorted(k.fn.__name__ for k in kernels - covered)


def test_launchers_choose_configurations_from_the_same_list():
    """The launch parameters the attention_mass launcher derives for a case are one of the
    checked builds (the launcher and kernel_builds share _launch_meta)."""
    import torch

    from kawhi_kernels.triton import attention_mass as am
    from kawhi_kernels.triton._utils import compiled_dot_precision

    acc, block_r = am._accumulation(3, False, 64, torch.bfloat16)
    checked = [(b.kernel, b.constexprs, b.num_warps, b.num_stages) for b in am.kernel_builds()]
    for has_lse in (False, True):
        constexprs, warps, stages = am._launch_meta(torch.bfloat16, 128, acc, max(16, block_r),
                                                    am._output_mode(True, False), 3,
                                                    has_lse=has_lse, causal=True,
                                                    dot_precision_=compiled_dot_precision())
        kernel = am._main_kernel(acc, 64, has_lse)
        assert (kernel, dict(constexprs, BLOCK_R=64), warps, stages) in checked


def test_every_tile_table_entry_is_built_and_lies_in_the_config_space():
    """Each MASS_TILE_TABLE entry has static builds (so the spill/shared/tensor-core/cp.async
    checks cover it), its values lie in TILE_SPACE, its builds use its tiles, and the table
    keys span every (dtype, head-dim class, kernel, lse, group class) the launcher can ask."""
    from kawhi_kernels.triton import attention_mass as am

    builds = am.kernel_builds()
    by_key = {}
    for b in builds:
        if b.table_key is not None:
            by_key.setdefault(b.table_key, []).append(b)
    assert set(by_key) == set(am.MASS_TILE_TABLE)
    for key, cfg in am.MASS_TILE_TABLE.items():
        for field, allowed in am.TILE_SPACE.items():
            assert getattr(cfg, field) in allowed, (key, field)
        for b in by_key[key]:
            ce = b.constexprs
            assert (b.num_warps, b.num_stages, ce["NUM_STAGES"], ce["BLOCK_N"]) == (
                cfg.num_warps, cfg.num_stages, cfg.num_stages, cfg.block_n), (key, b.name)
            assert ce["BLOCK_ROWS"] * ce["GP"] <= cfg.stacked_rows, (key, b.name)
    expected = {(t, d, kernel, lse, g)
                for t in ("fp16", "bf16") for d in am.HEAD_DIM_CLASSES
                for kernel, lse in (("one-pass", False), ("coarse", True),
                                    ("atomic", False), ("atomic", True), ("window", False),
                                    ("window", True))
                for g in am.GROUP_CLASSES}
    expected |= {("fp32", 128, *rest) for (_, d, *rest) in expected if d == 128}
    assert set(am.MASS_TILE_TABLE) == expected


def test_auto_launch_takes_its_tiles_from_the_table():
    """A plan without block_rows/block_n launches the table entry of its key (edit the table,
    the launch follows), with or without lse."""
    import torch

    from kawhi_kernels.triton import attention_mass as am

    cu = torch.tensor([0, 100], dtype=torch.int64)
    region = torch.zeros(100, dtype=torch.int32)
    for num_regions, det in ((5, False), (300, False), (300, True)):
        plan = am.plan_attention_mass_triton(cu, cu, region, num_regions, dtype=torch.float16,
                                             num_heads=28, num_kv_heads=4, head_dim=128,
                                             heads=[0, 1, 3], deterministic=det)
        for has_lse in (False, True):
            constexprs, warps, stages = plan.launches[has_lse]
            cfg = am.MASS_TILE_TABLE[am.table_key(torch.float16, 128, plan.acc_mode,
                                                  plan.block_r, has_lse, constexprs["GP"])]
            assert (warps, stages, constexprs["BLOCK_N"]) == (cfg.num_warps, cfg.num_stages,
                                                              cfg.block_n)
            assert constexprs["BLOCK_ROWS"] * constexprs["GP"] <= cfg.stacked_rows
    edited = dict(am.MASS_TILE_TABLE)
    edited[("fp16", 128, "one-pass", False, "narrow")] = am.TileConfig(64, 128, 3, 4)
    edited[("fp16", 128, "coarse", True, "narrow")] = am.TileConfig(64, 32, 2, 4)
    original = am.MASS_TILE_TABLE
    am.MASS_TILE_TABLE = edited
    try:
        plan = am.plan_attention_mass_triton(cu, cu, region, 5, dtype=torch.float16,
                                             num_heads=28, num_kv_heads=4, head_dim=128,
                                             heads=[0, 1, 3])
    finally:
        am.MASS_TILE_TABLE = original
    assert plan.launches[False][1:] == (4, 3) and plan.launches[True][1:] == (4, 2)
    assert plan.launches[False][0]["BLOCK_N"] == 128 and plan.launches[True][0]["BLOCK_N"] == 32


def test_paired_table_entries_share_their_row_blocks():
    """A plan shares its row-block table between its lse and lse-free launches (key-tile tables
    are built per BLOCK_N): the entries a plan pairs (one-pass with coarse+lse; atomic and
    window with and without lse) agree on M."""
    from kawhi_kernels.triton import attention_mass as am

    table = am.MASS_TILE_TABLE
    for (t, d, kernel, lse, g), cfg in table.items():
        if lse:
            partner = table[(t, d, "one-pass", False, g)] if kernel == "coarse" else \
                table[(t, d, kernel, False, g)]
            assert cfg.stacked_rows == partner.stacked_rows


def test_launch_passes_the_table_register_limit():
    """maxnreg of every build and every planned launch is its table entry's."""
    import torch

    from kawhi_kernels.triton import attention_mass as am

    for b in am.kernel_builds():
        if b.table_key is not None:
            assert b.maxnreg == am.MASS_TILE_TABLE[b.table_key].maxnreg, b.name
    cu = torch.tensor([0, 100], dtype=torch.int64)
    plan = am.plan_attention_mass_triton(cu, cu, torch.zeros(100, dtype=torch.int32), 5,
                                         dtype=torch.float16, num_heads=28, num_kv_heads=4,
                                         head_dim=128, heads=[0, 1, 3])
    assert plan.maxnreg == {False: am.MAX_REGISTERS, True: None}
    assert plan.tables[False].block_n == 64 and plan.tables[True].block_n == 32


def test_checker_flags_spills_shared_memory_missing_tensor_cores_and_compile_errors():
    good = {"name": "x", "arch": 90, "tensor_cores": True, "registers": 128, "stack": 0,
            "static_shared": 0, "local": 0, "hmma": 0, "hgmma": 4, "ldgsts": 0, "tma": 0,
            "local_ops": 0, "shared": 1024}
    assert B.problems(good) == []
    assert "spills" in B.problems(dict(good, stack=24, local_ops=3))[0]
    assert "shared memory" in B.problems(dict(good, shared=B.SHARED_LIMIT[90] + 1))[0]
    assert "tensor-core" in B.problems(dict(good, hgmma=0))[0]
    assert "does not compile" in B.problems({"name": "x", "arch": 80, "error": "boom"})[0]
    assert "pipelined" in B.problems(dict(good, async_copies=True))[0]
    assert B.problems(dict(good, async_copies=True, ldgsts=4)) == []


def test_attention_mass_region_loops_are_pipelined_with_and_without_lse(report):
    """The lse path's region loop (two-pass coarse kernel with lse, the KAWHI case) and the
    atomic kernel's loops load K with cp.async on sm_80 and sm_90 for fp16/bf16 (branch-free
    bodies, 2 stages), without spills."""
    rows, _ = report
    half = [r for r in rows if r["name"].startswith("attention_mass ") and " fp32 " not in r["name"]]
    piped = [r for r in half if " atomic/" in r["name"] or (" coarse/" in r["name"]
                                                           and r["name"].endswith(" lse"))]
    assert {r["arch"] for r in piped} == set(ARCHS)
    assert any(" coarse/" in r["name"] for r in piped) and any(" atomic/" in r["name"] for r in piped)
    assert all(r["async_copies"] and r["ldgsts"] + r["tma"] > 0 and not B.problems(r)
               for r in piped), [(r["name"], r["arch"]) for r in piped
                                 if r["ldgsts"] + r["tma"] == 0 or B.problems(r)]
