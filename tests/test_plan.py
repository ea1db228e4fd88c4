"""Plan once, run per layer: AttentionMassPlan / CosineAlignmentPlan.

* a plan reused across layers equals the functional op on every backend;
* ``run()`` on the Triton backend issues no data-dependent op (checked under a TorchDispatchMode
  that fails on ``_local_scalar_dense``, ``nonzero``, ``item``, boolean-mask indexing and
  cross-device copies), and the plan is built with one device→host transfer;
* torch.compile(fullgraph=True) of the functional ops on backend auto / torch / triton, and
  bad values under compile raise instead of reaching a kernel;
* hardening: strided int32 cu_seqlens, an underestimated lse, a non-finite lse on a row with
  keys (one defined behaviour on every backend), deterministic mode never uses float atomics,
  the windowed deterministic path with a key tile of exactly one region.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported anywhere below

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton", reason="triton is not installed")

from triton_helpers import (  # noqa: E402
    COSINE_TOL,
    DEVICE,
    MASS_TOL,
    coarse_regions,
    fresh_seed,
    patch_regions,
    random_qk,
    reference_lse,
    run_segments,
)

from kawhi_kernels import AttentionMassPlan, CosineAlignmentPlan, attention_mass, cosine_alignment  # noqa: E402
from kawhi_kernels.reference.attention_mass import attention_mass_reference  # noqa: E402

LENS_Q = [5, 0, 17, 9]
LENS_K = [9, 4, 30, 40]


def _layout(seed, hq=8, hk=2, d=32, num_regions=5, regions="coarse", dtype=torch.float32):
    q, k, cu_q, cu_k = random_qk(seed, LENS_Q, LENS_K, hq, hk, d, dtype)
    make = coarse_regions if regions == "coarse" else patch_regions
    return q, k, cu_q, cu_k, make(seed + 1, LENS_K, num_regions)


def _mass_plan(cu_q, cu_k, region, num_regions, q, k, **kwargs):
    return AttentionMassPlan(cu_q, cu_k, region, num_regions, num_heads=q.shape[1],
                             num_kv_heads=k.shape[1], head_dim=q.shape[2], dtype=q.dtype, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("regions,num_regions,segmented,deterministic", [
    ("coarse", 5, False, False), ("coarse", 5, True, True), ("patch", 90, True, False),
    ("patch", 90, False, True)])
def test_one_plan_serves_several_layers_like_the_functional_op(backend, regions, num_regions,
                                                              segmented, deterministic):
    seed = fresh_seed()
    q, k, cu_q, cu_k, region = _layout(seed, num_regions=num_regions, regions=regions)
    seg = ({"query_segment": run_segments(seed + 2, LENS_Q, 4), "num_segments": 4}
           if segmented else {})
    plan = _mass_plan(cu_q, cu_k, region, num_regions, q, k, heads=[6, 1, 3],
                      deterministic=deterministic, backend=backend, **seg)
    assert plan.backend == backend
    for layer in range(3):                                   # new q/k per layer, same layout
        ql, kl, _, _ = random_qk(seed + 10 + layer, LENS_Q, LENS_K, 8, 2, 32)
        got = plan.run(ql, kl)
        want = attention_mass(ql, kl, cu_q, cu_k, region, num_regions, heads=[6, 1, 3],
                              backend="torch", **seg)
        assert got.shape == plan.output_shape
        torch.testing.assert_close(got, want, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cosine_plan_matches_functional_op(backend):
    seed = fresh_seed()
    q, k, cu_q, cu_k, region = _layout(seed, num_regions=40, regions="patch")
    plan = CosineAlignmentPlan(cu_q, cu_k, region, 40, num_heads=8, num_kv_heads=2, head_dim=32,
                               dtype=q.dtype, heads=[7, 2], per_head=True, backend=backend)
    for layer in range(2):
        ql, kl, _, _ = random_qk(seed + 10 + layer, LENS_Q, LENS_K, 8, 2, 32)
        want = cosine_alignment(ql, kl, cu_q, cu_k, region, 40, heads=[7, 2], per_head=True,
                                backend="torch")
        torch.testing.assert_close(plan.run(ql, kl), want, **COSINE_TOL)


def test_run_checks_inputs_against_the_plan():
    q, k, cu_q, cu_k, region = _layout(0)
    plan = _mass_plan(cu_q, cu_k, region, 5, q, k, backend="torch")
    with pytest.raises(ValueError, match=r"q: expected shape \(31, 8, 32\) \(the plan's layout\)"):
        plan.run(q[:-1], k)
    with pytest.raises(ValueError, match="k: expected shape"):
        plan.run(q, k[:, :1])
    with pytest.raises(TypeError, match="q: expected dtype"):
        plan.run(q.half(), k.half())
    with pytest.raises(ValueError, match="lse: expected shape"):
        plan.run(q, k, torch.zeros(8, 3))
    with pytest.raises(ValueError, match="cu_seqlens_k: last entry must equal the number of rows"):
        _mass_plan(cu_q, cu_k, region[:-1], 5, q, k)
    with pytest.raises(ValueError, match="key_region: values must be in"):
        _mass_plan(cu_q, cu_k, region, 2, q, k)
    with pytest.raises(TypeError, match="deterministic: expected a bool"):
        _mass_plan(cu_q, cu_k, region, 5, q, k, deterministic=1)


# ---------------------------------------------------------------------------------------------
# No data-dependent ops in run()

class _FailOnDataDependentOps(TorchDispatchMode):
    """Raises on any op that needs device values on the host or has a data-dependent shape."""

    FORBIDDEN = {"aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.masked_select",
                 "aten.unique", "aten._unique2", "aten.repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.ops.append(name)
        if name in self.FORBIDDEN:
            raise AssertionError(f"run() called the data-dependent op {func}")
        if name in ("aten.index", "aten.index_put", "aten.index_put_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                raise AssertionError(f"run() used boolean-mask indexing ({func})")
        if name == "aten._to_copy" and "device" in kwargs and kwargs["device"] != args[0].device:
            raise AssertionError(f"run() copied a tensor across devices ({func})")
        if name == "aten.copy_" and args[0].device != args[1].device:
            raise AssertionError(f"run() copied a tensor across devices ({func})")
        return func(*args, **kwargs)


def test_the_dispatch_guard_catches_syncs():
    """The guard below can fail: each forbidden pattern raises."""
    x = torch.arange(6, dtype=torch.float32)
    for bad in (lambda: x.sum().item(), lambda: x.nonzero(), lambda: x[x > 2], lambda: int(x[0])):
        with pytest.raises(AssertionError, match="run\\(\\)"):
            with _FailOnDataDependentOps():
                bad()


@pytest.mark.parametrize("segmented,deterministic,num_regions,with_lse", [
    (False, False, 5, False), (True, True, 5, True), (True, False, 90, False),
    (False, True, 90, True)])
def test_triton_run_is_free_of_data_dependent_ops(segmented, deterministic, num_regions, with_lse):
    seed = fresh_seed()
    q, k, cu_q, cu_k, region = _layout(seed, num_regions=num_regions,
                                       regions="coarse" if num_regions < 64 else "patch")
    seg = ({"query_segment": run_segments(seed + 2, LENS_Q, 4), "num_segments": 4}
           if segmented else {})
    lse = reference_lse(q, k, cu_q, cu_k, True, 32 ** -0.5) if with_lse else None
    plan = _mass_plan(cu_q, cu_k, region, num_regions, q, k, deterministic=deterministic,
                      backend="triton", **seg)
    plan.run(q, k, lse)                                       # warm-up (first launch)
    with _FailOnDataDependentOps() as guard:
        got = plan.run(q, k, lse)
    assert guard.ops                                          # the mode saw the run
    want = attention_mass_reference(q, k, cu_q, cu_k, region, num_regions, lse=lse, **seg)
    torch.testing.assert_close(got, want, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")
    cosine = CosineAlignmentPlan(cu_q, cu_k, region, num_regions, num_heads=8, num_kv_heads=2,
                                 head_dim=32, dtype=q.dtype, backend="triton")
    with _FailOnDataDependentOps():
        cosine.run(q, k)


def test_plan_build_copies_the_layout_to_the_host_once(monkeypatch):
    """All host values (cumulative lengths, key-region range, segments) arrive in one copy."""
    q, k, cu_q, cu_k, region = _layout(0)
    seg = run_segments(1, LENS_Q, 4)
    calls = []
    real = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    _mass_plan(cu_q, cu_k, region, 5, q, k, query_segment=seg, num_segments=4, backend="torch")
    assert calls == [(2 * len(LENS_Q) + 2 + 2 + seg.numel(),)]


# ---------------------------------------------------------------------------------------------
# torch.compile

@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_compiled_fullgraph_matches_eager(backend):
    seed = fresh_seed()
    q, k, cu_q, cu_k, region = _layout(seed)

    def step(q, k):
        mass = attention_mass(q, k, cu_q, cu_k, region, 5, heads=[0, 5], backend=backend)
        align = cosine_alignment(q, k, cu_q, cu_k, region, 5, backend=backend)
        return mass.sum(-1), align

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(q, k), step(q, k)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **MASS_TOL)


def test_bad_values_under_compile_raise_instead_of_reaching_a_kernel():
    q, k, cu_q, cu_k, region = _layout(0)
    seg = run_segments(1, LENS_Q, 4)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(seg, region):
        return attention_mass(q, k, cu_q, cu_k, region, 5, query_segment=seg, num_segments=4,
                              backend="triton")

    def changed(x, value):
        x = x.clone()
        x[3] = value
        return x

    step(seg, region)
    with pytest.raises(ValueError, match=r"query_segment: values must be in \[0, 4\)"):
        step(changed(seg, 9), region)        # used to corrupt the heap (SIGABRT)
    with pytest.raises(ValueError, match="key_region: values must be in"):
        step(seg, changed(region, -3))
    with pytest.raises(ValueError, match="key_region: values must be in"):
        step(seg, changed(region, 5))


# ---------------------------------------------------------------------------------------------
# Hardening

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_int32_cu_seqlens(backend):
    seed = fresh_seed()
    q, k, cu_q, cu_k, region = _layout(seed)
    strided_q = torch.stack([cu_q, torch.full_like(cu_q, 99)], 1)[:, 0]
    strided_k = torch.stack([cu_k, torch.full_like(cu_k, -7)], 1)[:, 0]
    assert strided_q.stride(0) == 2 and strided_q.dtype == torch.int32
    want = attention_mass(q, k, cu_q, cu_k, region, 5, backend="torch")
    got = attention_mass(q, k, strided_q, strided_k, region, 5, backend=backend)
    torch.testing.assert_close(got, want, **MASS_TOL)
    want_c = cosine_alignment(q, k, cu_q, cu_k, region, 5, backend="torch")
    got_c = cosine_alignment(q, k, strided_q, strided_k, region, 5, backend=backend)
    torch.testing.assert_close(got_c, want_c, **COSINE_TOL)


def test_underestimated_lse_is_capped_the_same_on_every_backend():
    """exp(s − lse) ≤ 1 for a true normaliser; an lse too small by 20 (> ln 65504) gives
    probabilities capped at 1 on torch and Triton alike (Triton used to return NaN)."""
    seed = fresh_seed()
    q, k, cu_q, cu_k, region = _layout(seed)
    lse = reference_lse(q, k, cu_q, cu_k, True, 32 ** -0.5) - 20.0
    outs = [attention_mass(q, k, cu_q, cu_k, region, 5, lse=lse, backend=b)
            for b in ("torch", "triton")]
    assert all(torch.isfinite(o).all() for o in outs)
    torch.testing.assert_close(outs[1], outs[0], **MASS_TOL)
    keys_per_region = torch.bincount(region[region >= 0].long(), minlength=5).float()
    assert torch.all(outs[0] <= keys_per_region + 1e-6)        # each probability ≤ 1


def test_non_finite_lse_on_a_row_with_keys_gives_zero_on_every_backend():
    seed = fresh_seed()
    q, k, cu_q, cu_k, region = _layout(seed)
    lse = reference_lse(q, k, cu_q, cu_k, True, 32 ** -0.5)
    lse[:, 20] = float("inf")
    lse[2, 21] = float("-inf")
    for backend in ("torch", "triton"):
        got = attention_mass(q, k, cu_q, cu_k, region, 5, lse=lse, backend=backend)
        assert torch.all(got[20] == 0) and torch.all(got[21, 2] == 0), backend
        assert got[22].sum() > 0
    with pytest.raises(ValueError, match="lse: ±inf on a row that sees keys"):
        attention_mass(q, k, cu_q, cu_k, region, 5, lse=lse, check_finite=True)


def test_deterministic_launches_never_use_float_atomics():
    """Structural: the interpreter runs programs one by one, so an atomic race cannot show;
    every deterministic configuration must pick a non-atomic accumulation and output mode."""
    from kawhi_kernels.triton import attention_mass as am

    q, k, cu_q, cu_k, _ = _layout(0)
    host_q, host_k = cu_q.cpu().long(), cu_k.cpu().long()
    seg = run_segments(1, LENS_Q, 4).cpu().long()
    for num_regions in (1, 64, 65, 500):
        region = patch_regions(2, LENS_K, num_regions)
        for segmented in (False, True):
            plan = am.plan_attention_mass_triton(
                host_q, host_k, region, num_regions, dtype=torch.float16, num_heads=8,
                num_kv_heads=2, head_dim=32, query_segment_host=seg if segmented else None,
                num_segments=4 if segmented else 0, deterministic=True)
            assert plan.acc_mode != am._ACC_ATOMIC
            assert plan.out_mode != am._OUT_SEG_ATOMIC


@pytest.mark.parametrize("segmented", [False, True])
def test_windowed_deterministic_path_with_single_region_tiles(segmented):
    """Key tiles whose keys all carry the same region id (rmin == rmax): the window loop must
    run exactly once for them."""
    seed = fresh_seed()
    q, k, cu_q, cu_k = random_qk(seed, [6, 20], [40, 48], 4, 2, 32)
    region = torch.full((88,), -1, dtype=torch.int32)
    region[0:16] = 70                    # tile 0 of sequence 0: one region
    region[16:32] = torch.arange(16, 32, dtype=torch.int32) + 50
    region[40:56] = 3                    # tile 0 of sequence 1: one region
    region[56:72] = 99
    region = region.to(DEVICE)
    seg = {"query_segment": run_segments(seed, [6, 20], 3), "num_segments": 3} if segmented else {}
    want = attention_mass_reference(q, k, cu_q, cu_k, region, 100, **seg)
    from kawhi_kernels.triton.attention_mass import attention_mass_triton

    got = attention_mass_triton(q, k, cu_q, cu_k, region, 100, deterministic=True, block_n=16, **seg)
    torch.testing.assert_close(got, want, **MASS_TOL, msg=lambda m: f"seed {seed}: {m}")


def test_grid_pyramid_compiles_fullgraph_on_every_backend():
    from kawhi_kernels import grid_pyramid

    grids = [[1, 3, 5], [1, 2, 2]]          # a list: grids are layout, read while tracing
    mass = torch.rand(4, 19).to(DEVICE)
    for backend in ("auto", "torch", "triton"):
        compiled = torch.compile(lambda m, b=backend: grid_pyramid(m, grids, levels=2, backend=b),
                                 fullgraph=True, backend="aot_eager")
        for a, b in zip(compiled(mass), grid_pyramid(mass, grids, levels=2, backend="torch")):
            torch.testing.assert_close(a, b)


def test_functional_ops_refuse_truthy_non_bool_flags():
    q, k, cu_q, cu_k, region = _layout(0)
    for flag in ("deterministic", "causal", "check_finite"):
        with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
            attention_mass(q, k, cu_q, cu_k, region, 5, **{flag: 1})
    for flag in ("per_head", "check_finite"):
        with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
            cosine_alignment(q, k, cu_q, cu_k, region, 5, **{flag: "yes"})


# ---------------------------------------------------------------------------------------------
# GPU only: the sync-free claim on real hardware (skipped without CUDA; run by benchmarks/run_gpu.sh).

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("segmented,deterministic", [(False, False), (True, True), (True, False)])
def test_gpu_run_under_sync_debug_error_and_in_a_cuda_graph(segmented, deterministic):
    seed = fresh_seed()
    lens_q, lens_k = [300, 0, 517], [1024, 64, 2048]
    q, k, cu_q, cu_k = random_qk(seed, lens_q, lens_k, 28, 4, 128, torch.bfloat16)
    region = patch_regions(seed + 1, lens_k, 90)
    seg = ({"query_segment": run_segments(seed + 2, lens_q, 6), "num_segments": 6}
           if segmented else {})
    plan = AttentionMassPlan(cu_q, cu_k, region, 90, num_heads=28, num_kv_heads=4, head_dim=128,
                             dtype=torch.bfloat16, heads=[0, 1, 3, 22, 27],
                             deterministic=deterministic, backend="triton", **seg)
    cosine = CosineAlignmentPlan(cu_q, cu_k, region, 90, num_heads=28, num_kv_heads=4,
                                 head_dim=128, dtype=torch.bfloat16, backend="triton")
    eager, eager_cos = plan.run(q, k), cosine.run(q, k)          # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan.run(q, k)
        cosine.run(q, k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        plan.run(q, k)
        cosine.run(q, k)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, captured_cos = plan.run(q, k), cosine.run(q, k)
    q.copy_(q.flip(0))                                            # new values, same layout
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, plan.run(q, k), **MASS_TOL)
    torch.testing.assert_close(captured_cos, cosine.run(q, k), **COSINE_TOL)
    assert not torch.equal(captured, eager) or not torch.equal(captured_cos, eager_cos)
