"""The hand-written CUDA backend (kawhi_kernels._C kernels + kawhi_kernels.cuda wrappers).

Host-side (no GPU needed): argument validation of the raw ``_C`` entry points, the error a
launch raises where no driver is present, the backend's availability reasons, the host-built
work tables, and the fp64 fallback. GPU tests (marked ``gpu``, skipped without a usable CUDA
device) compare every kernel with the torch reference.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

from kawhi_kernels._extension import arch_covers, cuda_backend_problem, load_extension
from kawhi_kernels.cuda import attention_mass_cuda, cosine_alignment_cuda
from kawhi_kernels.cuda._launch import make_args, op_field_names
from kawhi_kernels._backend import FUSED_MAX_HEAD_DIM as MAX_HEAD_DIM
from kawhi_kernels._fused_host import row_blocks, segment_block_lists
from kawhi_kernels.reference.attention_mass import attention_mass_reference
from kawhi_kernels.reference.cosine_alignment import cosine_alignment_reference
from test_build import ROOT, _cmake, _configure, _nvcc

EXT = load_extension()
HAS_CUDA_BUILD = EXT is not None and EXT.has_cuda()
needs_cuda_build = pytest.mark.skipif(not HAS_CUDA_BUILD,
                                      reason="kawhi_kernels._C was built without CUDA")


def _usable_device_problem() -> str | None:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return cuda_backend_problem(torch.cuda.current_device())


GPU_PROBLEM = _usable_device_problem()


def gpu_test(fn):
    """Mark a test ``gpu`` and skip it unless the CUDA kernels can run on the current device."""
    fn = pytest.mark.skipif(GPU_PROBLEM is not None, reason=f"no usable CUDA device: {GPU_PROBLEM}")(fn)
    return pytest.mark.gpu(fn)


def _device_count_or_none():
    try:
        return EXT.cuda_device_count()
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------- raw arguments

FAKE = 1 << 20  # a non-null "device pointer"; host tests never launch with it on a real GPU


def _mass_args(**overrides):
    fields = dict(q=FAKE, k=FAKE, dtype=0, total_q=10, total_k=12, hq=8, hk=2, head_dim=64,
                  q_stride_t=8 * 64, q_stride_h=64, k_stride_t=2 * 64, k_stride_h=64,
                  cu_seqlens_q=FAKE, cu_seqlens_k=FAKE, num_seqs=2, key_region=FAKE,
                  num_regions=3, heads=FAKE, num_heads=8, row_blocks=FAKE, num_row_blocks=4,
                  causal=True, softmax_scale=0.125, out=FAKE, device=0)
    fields.update(overrides)
    return make_args(EXT, "attention_mass", **fields)


def _cosine_args(**overrides):
    fields = dict(q=FAKE, k=FAKE, dtype=1, total_q=10, total_k=12, hq=7, hk=1, head_dim=80,
                  q_stride_t=7 * 80, q_stride_h=80, k_stride_t=80, k_stride_h=80,
                  cu_seqlens_q=FAKE, cu_seqlens_k=FAKE, num_seqs=2, key_region=FAKE,
                  num_regions=1, heads=FAKE, num_heads=3, per_head=False, kbar=FAKE, out=FAKE,
                  device=0)
    fields.update(overrides)
    return make_args(EXT, "cosine_alignment", **fields)


def _sguf_args(**overrides):
    fields = dict(image=FAKE, num_images=2, height=56, width=84, stride_b=56 * 84 * 3,
                  stride_y=84 * 3, stride_x=3, stride_c=1, grid_h=2, grid_w=3, patch=28,
                  lut=FAKE, weights=FAKE, radius=4, lam_max=FAKE, lam_min=FAKE,
                  lightness=FAKE, device=0)
    fields.update(overrides)
    return make_args(EXT, "sguf_descriptors", **fields)


def _pyramid_args(**overrides):
    fields = dict(mass=FAKE, dtype=2, num_lead=6, num_tokens=35, mass_stride=40, strips=FAKE,
                  num_strips=3, cell_sizes=FAKE, num_levels=3, cell_base=FAKE, outs=FAKE,
                  out_cells=FAKE, shared_floats=60, device=0)
    fields.update(overrides)
    return make_args(EXT, "grid_pyramid", **fields)


@needs_cuda_build
def test_constants_match_the_python_side():
    assert EXT.DTYPE_CODES == {"float32": 0, "float16": 1, "bfloat16": 2}
    assert EXT.MAX_HEAD_DIM == MAX_HEAD_DIM == 256
    for name in ("attention_mass", "cosine_alignment", "sguf_descriptors", "grid_pyramid",
                 "cuda_device_count", "cuda_device_capability", "validate"):
        assert callable(getattr(EXT, name)), name


@needs_cuda_build
def test_valid_arguments_pass_validation():
    EXT.validate(_mass_args())
    EXT.validate(_mass_args(segmented=True, num_segments=3, deterministic=True, partial=FAKE,
                            segment_block_start=FAKE, segment_blocks=FAKE, lse=FAKE,
                            lse_stride_h=10, lse_stride_t=1))
    EXT.validate(_mass_args(total_q=0, q=0, out=0, num_row_blocks=0, row_blocks=0))
    EXT.validate(_cosine_args())
    EXT.validate(_cosine_args(per_head=True, total_k=0, k=0, key_region=0))
    EXT.validate(_sguf_args())
    EXT.validate(_sguf_args(num_images=0, image=0, lam_max=0, lam_min=0, lightness=0))
    EXT.validate(_pyramid_args())
    EXT.validate(_pyramid_args(num_lead=0, mass=0))
    EXT.validate(_pyramid_args(mass_stride=0))   # an expanded (read-only) mass: rows may coincide


MASS_ERRORS = [
    (dict(dtype=3), r"attention_mass: dtype: expected a dtype code 0 \(float32\), 1 \(float16\) or 2"),
    (dict(dtype=-1), r"dtype: expected a dtype code"),
    (dict(hk=3), r"hk: number of KV heads \(3\) must divide the number of query heads \(8\)"),
    (dict(head_dim=257), r"head_dim: expected at most 256"),
    (dict(head_dim=0), r"head_dim: expected an integer >= 1, got 0"),
    (dict(total_q=-1), r"total_q: expected an integer >= 0, got -1"),
    (dict(total_k=-5), r"total_k: expected an integer >= 0"),
    (dict(total_q=2**31), r"total_q: expected at most 2147483647"),
    (dict(hq=0), r"hq: expected an integer >= 1"),
    (dict(num_seqs=0), r"num_seqs: expected an integer >= 1"),
    (dict(num_regions=-1), r"num_regions: expected an integer >= 0"),
    (dict(num_heads=0), r"num_heads: expected an integer >= 1"),
    (dict(num_heads=70000), r"num_heads: expected at most 65535"),
    (dict(num_row_blocks=-1), r"num_row_blocks: expected an integer >= 0"),
    (dict(q_stride_t=-64), r"q_stride_t: expected an integer >= 0"),
    (dict(k_stride_h=-1), r"k_stride_h: expected an integer >= 0"),
    (dict(softmax_scale=0.0), r"softmax_scale: expected a positive finite number"),
    (dict(softmax_scale=math.nan), r"softmax_scale: expected a positive finite number"),
    (dict(softmax_scale=math.inf), r"softmax_scale"),
    (dict(device=-1), r"device: expected a CUDA device index >= 0"),
    (dict(q=0), r"q: null device pointer for an array of 5120 elements"),
    (dict(k=0), r"k: null device pointer"),
    (dict(cu_seqlens_q=0), r"cu_seqlens_q: null device pointer for an array of 3 elements"),
    (dict(key_region=0), r"key_region: null device pointer"),
    (dict(heads=0), r"heads: null device pointer"),
    (dict(row_blocks=0), r"row_blocks: null device pointer for an array of 16 elements"),
    (dict(out=0), r"out: null device pointer for an array of 240 elements"),
    (dict(segmented=True, num_segments=2, out=0), r"out: null device pointer for an array of 48"),
    (dict(segmented=True, num_segments=2, deterministic=True),
     r"partial: null device pointer for an array of 96 elements"),
    (dict(segmented=True, num_segments=2, deterministic=True, partial=FAKE),
     r"segment_block_start: null device pointer"),
    (dict(segmented=True, num_segments=-1), r"num_segments: expected an integer >= 0"),
    (dict(lse=FAKE, lse_stride_h=-1), r"lse_stride_h: expected an integer >= 0"),
    (dict(total_q=2**30, hq=2**30, num_heads=1), r"array sizes overflow int64"),
]


@needs_cuda_build
@pytest.mark.parametrize("overrides,message", MASS_ERRORS)
def test_attention_mass_argument_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        EXT.validate(_mass_args(**overrides))
    # The launcher validates before touching the device: the same ValueError without a GPU.
    with pytest.raises(ValueError, match=message):
        EXT.attention_mass(_mass_args(**overrides))


COSINE_ERRORS = [
    (dict(dtype=7), r"cosine_alignment: dtype: expected a dtype code"),
    (dict(hk=2), r"hk: number of KV heads \(2\) must divide the number of query heads \(7\)"),
    (dict(head_dim=300), r"head_dim: expected at most 256"),
    (dict(total_q=-3), r"total_q: expected an integer >= 0"),
    (dict(kbar=0), r"kbar: null device pointer for an array of 160 elements"),
    (dict(out=0), r"out: null device pointer for an array of 10 elements"),
    (dict(out=0, per_head=True), r"out: null device pointer for an array of 30 elements"),
    (dict(q=0), r"q: null device pointer"),
    (dict(cu_seqlens_k=0), r"cu_seqlens_k: null device pointer"),
    (dict(num_regions=2**20, num_seqs=2**12), r"num_seqs \* num_regions \* hk: expected at most"),
]


@needs_cuda_build
@pytest.mark.parametrize("overrides,message", COSINE_ERRORS)
def test_cosine_alignment_argument_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        EXT.validate(_cosine_args(**overrides))
    with pytest.raises(ValueError, match=message):
        EXT.cosine_alignment(_cosine_args(**overrides))


SGUF_ERRORS = [
    (dict(height=57), r"sguf_descriptors: height/width: expected \(grid_h \* patch\) x \(grid_w \* patch\) = 56 x 84, got 57 x 84"),
    (dict(patch=0), r"patch: expected an integer >= 1"),
    (dict(grid_w=0), r"grid_w: expected an integer >= 1"),
    (dict(radius=-1), r"radius: expected an integer >= 0"),
    (dict(num_images=-1), r"num_images: expected an integer >= 0"),
    (dict(num_images=70000), r"num_images: expected at most 65535"),
    (dict(stride_y=-1), r"stride_y: expected an integer >= 0"),
    (dict(image=0), r"image: null device pointer for an array of 28224 elements"),
    (dict(lut=0), r"lut: null device pointer for an array of 768 elements"),
    (dict(weights=0), r"weights: null device pointer for an array of 9 elements"),
    (dict(lam_min=0), r"lam_min: null device pointer for an array of 12 elements"),
    (dict(device=-2), r"device: expected a CUDA device index >= 0"),
]


@needs_cuda_build
@pytest.mark.parametrize("overrides,message", SGUF_ERRORS)
def test_sguf_argument_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        EXT.validate(_sguf_args(**overrides))
    with pytest.raises(ValueError, match=message):
        EXT.sguf_descriptors(_sguf_args(**overrides))


PYRAMID_ERRORS = [
    (dict(dtype=5), r"grid_pyramid: dtype: expected a dtype code"),
    (dict(num_levels=0), r"grid_pyramid: num_levels: expected an integer >= 1, got 0"),
    (dict(num_levels=18), r"num_levels: expected at most 17 \(cell sizes 1, 2, ..., 2\^16\)"),
    (dict(num_lead=-1), r"num_lead: expected an integer >= 0"),
    (dict(num_strips=-2), r"num_strips: expected an integer >= 0"),
    (dict(num_lead=2**20, num_strips=2**12),
     r"num_lead \* num_strips: expected at most 2147483647 \(one thread block per"),
    (dict(shared_floats=0), r"shared_floats: expected an integer >= 1"),
    (dict(shared_floats=2**24 + 1), r"shared_floats: expected at most 16777216"),
    (dict(mass_stride=-1), r"mass_stride: expected an integer >= 0"),
    (dict(mass=0), r"mass: null device pointer for an array of 210 elements"),
    (dict(strips=0), r"strips: null device pointer for an array of 9 elements"),
    (dict(cell_sizes=0), r"cell_sizes: null device pointer for an array of 3 elements"),
    (dict(cell_base=0), r"cell_base: null device pointer for an array of 9 elements"),
    (dict(outs=0), r"outs: null device pointer for an array of 3 elements"),
    (dict(out_cells=0), r"out_cells: null device pointer"),
    (dict(device=-1), r"grid_pyramid: device: expected a CUDA device index >= 0"),
]


@needs_cuda_build
@pytest.mark.parametrize("overrides,message", PYRAMID_ERRORS)
def test_grid_pyramid_argument_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        EXT.validate(_pyramid_args(**overrides))
    with pytest.raises(ValueError, match=message):
        EXT.grid_pyramid(_pyramid_args(**overrides))


# ----------------------------------------------------------------------------- the field table

OPS = {"attention_mass": _mass_args, "cosine_alignment": _cosine_args,
       "sguf_descriptors": _sguf_args, "grid_pyramid": _pyramid_args}
CUDA_WRAPPERS = ROOT / "kawhi_kernels" / "cuda"


def _bound_fields(cls) -> list[str]:
    return [name for name, value in vars(cls).items() if isinstance(value, property)]


@needs_cuda_build
@pytest.mark.parametrize("op", sorted(OPS))
def test_bound_struct_is_the_field_table(op):
    rows = EXT.op_fields(op)
    names = [row["name"] for row in rows]
    assert len(names) == len(set(names)) and names
    cls = EXT.ARG_TYPES[op]
    assert _bound_fields(cls) == names           # same fields, same order as op_fields.h
    fresh = cls()
    for row in rows:
        assert row["kind"] in {"pointer", "count", "stride", "flag", "real", "dtype", "stream",
                               "device"}, row
        value = getattr(fresh, row["name"])
        expected_type = {"uintptr_t": int, "int64_t": int, "int": int, "bool": bool,
                         "double": float}[row["c_type"]]
        assert type(value) is expected_type, row
        if row["kind"] == "pointer":
            assert value == 0, row
        assert getattr(cls, row["name"]).__doc__ and row["doc"], row


def _wrapper_field_names() -> dict[str, set[str]]:
    """Keyword names the CUDA wrappers pass as struct fields: make_args(ext, "op", ...) calls,
    and the dict(...) / fields.update(...) calls of the mapping they unpack into it."""
    import ast

    found: dict[str, set[str]] = {}
    for path in sorted(CUDA_WRAPPERS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)]
            op = None
            extra: set[str] = set()
            for call in calls:
                if isinstance(call.func, ast.Name) and call.func.id == "make_args":
                    op = call.args[1].value
                    extra |= {kw.arg for kw in call.keywords if kw.arg}
                    unpacked = [kw.value.id for kw in call.keywords
                                if kw.arg is None and isinstance(kw.value, ast.Name)]
                    for assign in [n for n in ast.walk(fn) if isinstance(n, ast.Assign)]:
                        if (isinstance(assign.value, ast.Call) and isinstance(assign.value.func, ast.Name)
                                and assign.value.func.id == "dict"
                                and any(isinstance(t, ast.Name) and t.id in unpacked
                                        for t in assign.targets)):
                            extra |= {kw.arg for kw in assign.value.keywords}
                    for other in calls:
                        if (isinstance(other.func, ast.Attribute) and other.func.attr == "update"
                                and isinstance(other.func.value, ast.Name)
                                and other.func.value.id in unpacked):
                            extra |= {kw.arg for kw in other.keywords}
            if op is not None:
                found.setdefault(op, set()).update(extra)
    return found


@needs_cuda_build
def test_python_wrappers_and_the_cpp_field_table_agree():
    passed = _wrapper_field_names()
    assert set(passed) == set(OPS)               # every op is launched through make_args
    for op, names in passed.items():
        table = EXT.op_fields(op)
        unknown = names - set(op_field_names(EXT, op))
        assert not unknown, f"{op}: wrapper passes fields missing from csrc/op_fields.h: {unknown}"
        # every field a launch needs (no usable initial value) is passed by the wrapper
        required = {row["name"] for row in table
                    if row["kind"] in ("pointer", "count", "stride", "dtype", "device", "stream")
                    and getattr(EXT.ARG_TYPES[op](), row["name"]) in (-1,)}
        assert required <= names, f"{op}: wrapper never sets {required - names}"


@needs_cuda_build
def test_make_args_rejects_a_field_outside_the_table():
    with pytest.raises(TypeError, match=r"attention_mass: \['q_strides'\] are not fields"):
        make_args(EXT, "attention_mass", q_strides=3)
    with pytest.raises(ValueError, match="op: expected 'attention_mass'"):
        EXT.op_fields("attention")


@needs_cuda_build
@pytest.mark.parametrize("op", sorted(OPS))
def test_per_field_checks_follow_the_table(op):
    """Every count/stride/dtype/device row of the table is checked by validate(), with the
    minimum the table states: the checks are generated from the same list."""
    checked = 0
    for row in EXT.op_fields(op):
        name, kind = row["name"], row["kind"]
        if kind in ("count", "stride"):
            bad, message = row["minimum"] - 1, rf"{op}: {name}: expected an integer >= {row['minimum']}"
        elif kind == "dtype":
            bad, message = 9, rf"{op}: {name}: expected a dtype code"
        elif kind == "device":
            bad, message = -1, rf"{op}: {name}: expected a CUDA device index >= 0"
        else:
            continue
        with pytest.raises(ValueError, match=message):
            EXT.validate(OPS[op](**{name: bad}))
        checked += 1
    assert checked >= 8


@needs_cuda_build
def test_argument_fields_are_type_checked():
    a = EXT.AttentionMassArgs()
    with pytest.raises(TypeError):
        a.q = -4096          # a pointer is an unsigned integer
    with pytest.raises(TypeError):
        a.total_q = 1.5
    with pytest.raises(TypeError):
        a.dtype = "float16"
    with pytest.raises(TypeError):
        EXT.validate(object())


def test_shared_memory_estimate_grows_with_patch_and_radius():
    ext = load_extension()
    if ext is None:
        pytest.skip("kawhi_kernels._C is not importable")
    base = ext.sguf_shared_bytes(28, 4)
    # (38² + 30·38 + 9 + 128) fp32 values: L tile, y-smoothed tile, taps, reduction scratch.
    assert base == 4 * (38 * 38 + 30 * 38 + 9 + 128)
    assert ext.sguf_shared_bytes(32, 4) > base and ext.sguf_shared_bytes(28, 8) > base


@needs_cuda_build
@pytest.mark.skipif(HAS_CUDA_BUILD and (_device_count_or_none() or 0) > 0,
                    reason="checks the no-driver error path; this machine has a CUDA device")
@pytest.mark.parametrize("op,make", [("attention_mass", _mass_args),
                                     ("cosine_alignment", _cosine_args),
                                     ("sguf_descriptors", _sguf_args),
                                     ("grid_pyramid", _pyramid_args)])
def test_launch_without_a_device_raises_runtime_error_naming_op_and_cuda_error(op, make):
    with pytest.raises(RuntimeError, match=rf"kawhi_kernels CUDA error in {op} .*: cuda\w+ \(.+\)"):
        getattr(EXT, op)(make())


@needs_cuda_build
def test_device_queries_report_failure_clearly():
    count = _device_count_or_none()
    problem = cuda_backend_problem(0)
    if count is None:
        with pytest.raises(RuntimeError, match=r"cudaGetDeviceCount: cuda\w+ \("):
            EXT.cuda_device_count()
        if EXT.cuda_driver_version() == 0:            # a CPU machine: no driver at all
            assert problem == "no NVIDIA GPU driver on this machine (the CUDA kernels need a GPU)"
        else:
            assert problem is not None and "cannot query devices" in problem
    elif count == 0:
        assert "sees 0 CUDA device(s)" in problem
    assert cuda_backend_problem(10_000) is not None


# ----------------------------------------------------------------------------- the build

@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_cuda_build_for_one_arch_compiles_imports_and_holds_its_sass(tmp_path):
    """The CUDA build for one arch, as CI can afford it (2 cores). Configure and build the CUDA module for sm_90 only (about 50 s on 2 cores), import it
    without a GPU, and check its targets and dependencies."""
    out = tmp_path / "out"
    res = _configure(tmp_path, {"KAWHI_CUDA": "1", "KAWHI_CUDA_ARCHS": "90"},
                     f"-DKAWHI_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
                     f"-DCMAKE_CUDA_COMPILER={_nvcc()}")
    assert res.returncode == 0, res.stdout + res.stderr
    build = subprocess.run([_cmake(), "--build", str(tmp_path), "-j", str(os.cpu_count() or 1)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    (so,) = out.glob("_C*")
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import _C\n"
             "assert _C.has_cuda() and _C.build_info()['archs'] == ['sm_90', 'compute_90']\n"
             "a = _C.AttentionMassArgs()\n"
             "try:\n    _C.attention_mass(a)\nexcept ValueError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("attention_mass: dtype: expected a dtype code")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_cuda_archs
    finally:
        sys.path.pop(0)
    needed = check_cuda_archs.needed_libraries(str(so))
    assert not [lib for lib in needed if lib.startswith(("libtorch", "libc10", "libcudart.so"))]
    if check_cuda_archs.find_cuobjdump() is not None:
        assert check_cuda_archs.main([str(so), "--archs", "90", "--check-deps"]) == 0
        assert check_cuda_archs.main([str(so), "--archs", "80;90"]) == 1



# ----------------------------------------------------------------------------- availability

@pytest.mark.parametrize("capability,archs,covered", [
    (90, ["sm_80", "sm_86", "sm_89", "sm_90", "compute_90"], True),
    (86, ["sm_80", "compute_80"], True),        # same major, higher minor: SASS runs
    (89, ["sm_90", "compute_90"], False),       # older than every target
    (75, ["sm_80", "sm_86", "sm_89", "sm_90", "compute_90"], False),
    (100, ["sm_80", "sm_90", "compute_90"], True),   # PTX JIT for a newer GPU
    (100, ["sm_80", "sm_90"], False),
    (120, ["sm_90a", "compute_90a"], False),    # arch-specific targets run on 9.0 only
    (90, ["sm_90a"], True),
    (103, ["sm_100f"], True),                   # family target: same major, >= minor
    (110, ["sm_100f"], False),
    (90, [], False),
])
def test_arch_covers(capability, archs, covered):
    assert arch_covers(capability, archs) is covered


def test_wrappers_refuse_cpu_tensors_with_a_clear_error():
    q = torch.randn(4, 2, 8)
    k = torch.randn(5, 1, 8)
    cu_q = torch.tensor([0, 4], dtype=torch.int32)
    cu_k = torch.tensor([0, 5], dtype=torch.int32)
    region = torch.zeros(5, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"attention_mass: the CUDA backend needs CUDA tensors"):
        attention_mass_cuda(q, k, cu_q, cu_k, region, 1)
    with pytest.raises(RuntimeError, match=r"cosine_alignment: the CUDA backend needs CUDA tensors"):
        cosine_alignment_cuda(q, k, cu_q, cu_k, region, 1)


def test_public_op_reports_why_cuda_backend_cannot_run_on_cpu():
    from kawhi_kernels import attention_mass

    q, k = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run attention_mass"):
        attention_mass(q, k, cu, cu, torch.zeros(3, dtype=torch.int32), 1, backend="cuda")


def test_fp64_inputs_fall_back_to_the_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(11, 2, 16, generator=g, dtype=torch.float64)
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 11], dtype=torch.int32)
    region = torch.tensor([-1, 0, 1, 1, 0, -1, 2, 2, -1, 0, 1], dtype=torch.int32)
    seg = torch.tensor([0, 0, 1, -1, 1, 2, 2, 2, 0], dtype=torch.int32)
    # The custom op is the one routing point (the public op would refuse CPU tensors for "cuda").
    got = torch.ops.kawhi.attention_mass(q, k, cu_q, cu_k, region, 3, seg, 3, [3, 0], None, True,
                                         0.25, False, False, "cuda")
    want = attention_mass_reference(q, k, cu_q, cu_k, region, 3, query_segment=seg,
                                    num_segments=3, heads=[3, 0])
    assert got.dtype == torch.float64 and torch.equal(got, want)
    got = torch.ops.kawhi.cosine_alignment(q, k, cu_q, cu_k, region, 3, [1, 2], True, False, "cuda")
    want = cosine_alignment_reference(q, k, cu_q, cu_k, region, 3, heads=[1, 2], per_head=True)
    assert got.dtype == torch.float64 and torch.equal(got, want)


# ----------------------------------------------------------------------------- work tables

def _row_blocks_naive(lens_q, lens_k, block_rows, seg):
    blocks, row = [], 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        r = row
        while r < row + lq:
            s = seg[r] if seg is not None else 0
            end = r
            while end < row + lq and (seg is None or seg[end] == s):
                end += 1
            if s >= 0 and lk > 0:
                for start in range(r, end, block_rows):
                    blocks.append([b, start, min(block_rows, end - start), s])
            r = end
        row += lq
    return blocks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_rows", [1, 3, 8])
@pytest.mark.parametrize("segmented", [False, True])
def test_row_blocks_match_a_plain_loop(seed, block_rows, segmented):
    g = torch.Generator().manual_seed(seed)
    nseq = int(torch.randint(1, 6, (), generator=g))
    lens_q = torch.randint(0, 20, (nseq,), generator=g).tolist()
    lens_k = torch.randint(0, 4, (nseq,), generator=g).tolist()   # some sequences without keys
    cu_q = torch.tensor(np.cumsum([0] + lens_q), dtype=torch.int32)
    cu_k = torch.tensor(np.cumsum([0] + lens_k), dtype=torch.int32)
    seg = None
    if segmented:
        # runs of three rows per segment value (-1 runs included), runs crossing sequence
        # boundaries, segment ids reused across sequences
        total = sum(lens_q)
        seg = torch.randint(-1, 4, (total // 3 + 1,), generator=g).repeat_interleave(3)[:total]
    table = row_blocks(cu_q, cu_k, block_rows, seg)
    want = _row_blocks_naive(lens_q, lens_k, block_rows, None if seg is None else seg.tolist())
    assert table.dtype == torch.int32 and table.shape == (len(want), 4)
    assert table.tolist() == want


def test_segment_block_lists_are_in_block_order():
    blocks = torch.tensor([[0, 0, 4, 2], [0, 4, 4, 0], [1, 8, 2, 2], [1, 10, 3, 0], [1, 13, 1, 2]],
                          dtype=torch.int32)
    start, order = segment_block_lists(blocks, 4)
    assert start.tolist() == [0, 2, 2, 5, 5]       # segment 1 and 3 have no block
    assert order.tolist() == [1, 3, 0, 2, 4]
    assert start.dtype == order.dtype == torch.int32


def test_row_blocks_rejects_bad_block_rows():
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_rows: expected a positive int"):
        row_blocks(cu, cu, 0)


# ----------------------------------------------------------------------------- tensor-core layout
# The index math of csrc/mma_layout.h (used by csrc/attention_mass_mma.cu), checked on the host.

def _layout():
    ext = load_extension()
    if ext is None:
        pytest.skip("kawhi_kernels._C is not importable")
    return ext.mma_layout


def test_mma_accumulator_fragment_covers_the_c_tile_once():
    L = _layout()
    cells = [L.c_coord(lane, i) for lane in range(32) for i in range(4)]
    assert sorted(cells) == [(r, c) for r in range(16) for c in range(8)]
    # The online softmax reduces a row over the 4 lanes of a quad: a row's 8 values live in
    # lanes 4g..4g+3 only, and element pairs (0, 1) / (2, 3) are adjacent columns.
    for lane in range(32):
        rows = {L.c_coord(lane, i)[0] for i in range(4)}
        assert rows == {lane // 4, lane // 4 + 8}
        assert L.c_coord(lane, 1)[1] == L.c_coord(lane, 0)[1] + 1
        assert L.c_coord(lane, 3) == (L.c_coord(lane, 1)[0] + 8, L.c_coord(lane, 1)[1])


def test_mma_operand_fragments_cover_their_tiles_once():
    L = _layout()
    a = [L.a_coord(lane, r, h) for lane in range(32) for r in range(4) for h in range(2)]
    assert sorted(a) == [(r, c) for r in range(16) for c in range(16)]
    b = [L.b_coord(lane, r, h) for lane in range(32) for r in range(2) for h in range(2)]
    assert sorted(b) == [(k, n) for k in range(16) for n in range(8)]
    # A register halves are consecutive columns: the kernel loads each register as one 32-bit word
    for lane in range(32):
        for r in range(4):
            row, col = L.a_coord(lane, r, 0)
            assert L.a_coord(lane, r, 1) == (row, col + 1) and col % 2 == 0


def test_ldmatrix_on_k_rows_delivers_the_mma_b_fragments():
    """ldmatrix.x4 on the [key][d] K tile: the element a lane receives in reg j, half h is the
    one mma.sync expects there (regs 0, 1: b0, b1 of keys 0..7; regs 2, 3: of keys 8..15)."""
    L = _layout()
    # row addresses: matrix j row i is supplied by lane 8j + i
    source = {lane: L.ldmatrix_k_source(lane) for lane in range(32)}
    assert sorted(source.values()) == [(key, c) for key in range(16) for c in range(2)]
    for lane in range(32):
        for j in range(4):
            for h in range(2):
                row, col = L.ldmatrix_fragment(lane, h)       # inside matrix j
                key, chunk = source[8 * j + row]
                d = chunk * 8 + col
                ntile, breg = j // 2, j % 2
                k_index, n_index = L.b_coord(lane, breg, h)
                assert (key, d) == (ntile * 8 + n_index, k_index), (lane, j, h)


@pytest.mark.parametrize("row_chunks", [16, 32])
def test_swizzle_is_a_bijection_and_spreads_ldmatrix_rows_over_banks(row_chunks):
    L = _layout()
    for row in range(64):
        phys = [L.swizzle_chunk(row, c) for c in range(row_chunks)]
        assert sorted(phys) == list(range(row_chunks))
    # 8 consecutive rows reading the same logical chunk hit 8 different 16-byte bank groups
    # (a row is a multiple of 128 bytes, so the bank group is the chunk index mod 8).
    for first in range(0, 64, 8):
        for c in range(row_chunks):
            assert len({L.swizzle_chunk(r, c) % 8 for r in range(first, first + 8)}) == 8


def test_visible_keys_and_tile_skipping_match_the_reference_mask():
    L = _layout()
    for lq, lk in [(5, 9), (10, 4), (37, 30), (1, 1), (70, 150), (3, 0), (200, 200)]:
        for causal in (True, False):
            vis = torch.ones(lq, lk, dtype=torch.bool)
            if causal:
                vis = vis.tril(lk - lq)           # the reference's bottom-right mask
            limits = [L.visible_keys(i, lq, lk, causal) for i in range(lq)]
            for i in range(lq):
                want = int(vis[i].sum())
                assert max(limits[i], 0) == want
                if want:
                    assert bool(vis[i, :want].all())
            for first in range(lq):
                for rows in (1, 16, 64):
                    rows = min(rows, lq - first)
                    need = int(vis[first:first + rows].any(0).nonzero().max()) + 1 if \
                        vis[first:first + rows].any() else 0
                    tiles = L.key_tiles_needed(first, rows, lq, lk, causal)
                    assert tiles == -(-need // L.TILE_KEYS)


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_warp_assignment_tiles_the_cta(slots):
    L = _layout()
    rows = L.block_rows_for(slots)
    assert rows * slots == L.WARPS * L.WARP_ROWS          # M = 64 in every mode
    cover = sorted(L.warp_assignment(w, slots) for w in range(L.WARPS))
    assert cover == [(s, b) for s in range(slots) for b in range(rows // L.WARP_ROWS)]


def test_tensor_core_dispatch_rule():
    from kawhi_kernels.cuda.attention_mass import slot_groups, tensor_core_slots

    q = torch.zeros(10, 28, 128, dtype=torch.bfloat16)
    k = torch.zeros(12, 4, 128, dtype=torch.bfloat16)
    heads = [0, 1, 3, 22, 23, 24, 25, 26, 27]
    assert tensor_core_slots(q, k, heads, 28, 4, None) == 4
    assert tensor_core_slots(q, k, heads, 28, 4, 8) == 0                 # explicit block_rows
    assert tensor_core_slots(q.float(), k.float(), heads, 28, 4, None) == 0
    assert tensor_core_slots(q[..., :40], k[..., :40], heads, 28, 4, None) == 0
    assert tensor_core_slots(q[..., :80], k[..., :80], [0, 7], 28, 4, None) == 1
    mha_q, mha_k = torch.zeros(3, 4, 64, dtype=torch.float16), torch.zeros(3, 4, 64, dtype=torch.float16)
    assert tensor_core_slots(mha_q, mha_k, [0, 1, 2, 3], 4, 4, None) == 1
    assert tensor_core_slots(mha_q, mha_k, [0, 1, 2, 3], 4, 2, None) == 2
    groups = slot_groups(heads, 28, 4, 4)
    assert groups.tolist() == [[0, 1, 2, -1], [3, 4, 5, 6], [7, 8, -1, -1]]
    # every slot appears once, and a group's slots share one KV head
    flat = [s for s in groups.flatten().tolist() if s >= 0]
    assert sorted(flat) == list(range(len(heads)))
    for row in groups.tolist():
        assert len({heads[s] // 7 for s in row if s >= 0}) == 1


@needs_cuda_build
def test_tensor_core_path_argument_errors():
    ok = dict(dtype=1, slots_per_cta=4, slot_groups=FAKE, num_slot_groups=2)
    EXT.validate(_mass_args(**ok))
    # deterministic segment sums are served too (per-block partial rows, no atomics)
    EXT.validate(_mass_args(**ok, segmented=True, num_segments=3, deterministic=True,
                            partial=FAKE, segment_block_start=FAKE, segment_blocks=FAKE))
    for overrides, message in [
        (dict(slots_per_cta=3), r"slots_per_cta: expected 0, 1, 2 or 4, got 3"),
        (dict(dtype=0), r"dtype: the tensor-core kernel .* float16 or bfloat16"),
        (dict(head_dim=72, q_stride_t=8 * 72, q_stride_h=72, k_stride_t=2 * 72, k_stride_h=72),
         r"head_dim: the tensor-core kernel needs a multiple of 16, got 72"),
        (dict(q=FAKE + 2), r"q/k: the tensor-core kernel needs 16-byte aligned"),
        (dict(k_stride_t=2 * 64 + 4), r"strides that are multiples of 8"),
        (dict(num_slot_groups=0), r"num_slot_groups: expected an integer >= 1"),
        (dict(slot_groups=0), r"slot_groups: null device pointer for an array of 8 elements"),
    ]:
        with pytest.raises(ValueError, match=message):
            EXT.validate(_mass_args(**{**ok, **overrides}))


# ============================================================================== GPU tests

def _cu(lengths, device):
    return torch.tensor(np.cumsum([0] + list(lengths)), dtype=torch.int32, device=device)


def _qk(seed, lens_q, lens_k, hq, hk, d, dtype, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g)
    k = torch.randn(sum(lens_k), hk, d, generator=g) * 1.5
    return (q.to(device, dtype), k.to(device, dtype), _cu(lens_q, device), _cu(lens_k, device))


def _regions(seed, lens_k, num_regions, kind, device="cuda"):
    """coarse: random ids (about a quarter -1, the first two keys of each sequence -1, region
    R-1 unused); patch: a run of consecutive ids per sequence after 3 text keys."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lens_k)
    if kind == "coarse":
        region = torch.randint(0, max(1, num_regions - 1), (total,), generator=g, dtype=torch.int32)
        region[torch.rand(total, generator=g) < 0.25] = -1
        start = 0
        for n in lens_k:
            region[start:start + min(2, n)] = -1
            start += n
    else:
        region = torch.full((total,), -1, dtype=torch.int32)
        start, nxt = 0, 0
        for n in lens_k:
            count = max(0, min(n - 3, num_regions - nxt, 40))
            region[start + 3:start + 3 + count] = torch.arange(nxt, nxt + count, dtype=torch.int32)
            nxt = (nxt + count) % num_regions
            start += n
    return region.to(device)


# Ragged batch: an empty query sequence, a sequence without keys, Lq > Lk (early causal rows see
# no key), Lq < Lk, and a long one.
LENS_Q = [5, 0, 37, 12, 9, 70]
LENS_K = [9, 4, 30, 0, 40, 150]
TOL = dict(atol=2e-5, rtol=2e-4)

# (hq, hk, d, dtype, regions, R, segments, heads, causal, with_lse, deterministic)
MASS_CASES = [
    (4, 4, 64, torch.float32, "coarse", 5, None, None, True, False, False),
    (8, 2, 80, torch.float16, "coarse", 3, "runs", [1, 6, 7], True, False, False),
    (7, 1, 128, torch.bfloat16, "coarse", 7, "runs", [0, 2, 5], True, True, True),
    (8, 2, 64, torch.float32, "coarse", 64, None, [7, 0, 3], False, False, True),
    (4, 1, 80, torch.float32, "patch", 100, None, None, True, False, False),
    (7, 1, 64, torch.float16, "patch", 90, "runs", [6, 1], True, True, False),
    (8, 2, 128, torch.bfloat16, "patch", 70, "random", None, True, False, True),
    (4, 4, 256, torch.float32, "patch", 100, None, [3, 1], False, True, True),
    (8, 2, 40, torch.float32, "patch", 80, "random", None, True, False, False),
    (7, 7, 80, torch.bfloat16, "coarse", 4, "random", [4, 0], False, False, True),
    (28, 4, 128, torch.bfloat16, "coarse", 2, "runs", [0, 1, 3, 22, 23, 24, 25, 26, 27], True,
     False, False),
]


def _segments(kind, seed, total_q, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    if kind == "runs":      # paragraph-like runs, some rows ignored
        seg = (torch.arange(total_q) // 7) % 6
        seg[torch.rand(total_q, generator=g) < 0.1] = -1
        return seg.to(torch.int32).to(device), 6
    seg = torch.randint(-1, 4, (total_q,), generator=g, dtype=torch.int32)  # segment 4 empty
    return seg.to(device), 5


def _reference_lse(q, k, cu_q, cu_k, scale, causal):
    """fp32 [Hq, total_q] natural-log normalisers (−inf for rows without a visible key)."""
    hq, hk = q.shape[1], k.shape[1]
    out = torch.full((hq, q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        kr = k[k0:k1].float().repeat_interleave(hq // hk, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), kr) * scale
        if causal:
            vis = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device).tril(
                (k1 - k0) - (q1 - q0))
            s = s.masked_fill(~vis, -math.inf)
        out[:, q0:q1] = torch.logsumexp(s, dim=-1)
    return out


@gpu_test
@pytest.mark.parametrize(
    "hq,hk,d,dtype,regions,num_regions,segments,heads,causal,with_lse,deterministic", MASS_CASES)
def test_gpu_attention_mass_matches_reference(hq, hk, d, dtype, regions, num_regions, segments,
                                              heads, causal, with_lse, deterministic):
    seed = 1234 + hq * 31 + d
    q, k, cu_q, cu_k = _qk(seed, LENS_Q, LENS_K, hq, hk, d, dtype)
    region = _regions(seed + 1, LENS_K, num_regions, regions)
    kwargs = dict(heads=heads, causal=causal)
    if segments is not None:
        seg, nseg = _segments(segments, seed + 2, q.shape[0])
        kwargs.update(query_segment=seg, num_segments=nseg)
    scale = 1.0 / math.sqrt(d)
    if with_lse:
        kwargs["lse"] = _reference_lse(q, k, cu_q, cu_k, scale, causal)
    want = attention_mass_reference(q, k, cu_q, cu_k, region, num_regions, **kwargs)
    got = attention_mass_cuda(q, k, cu_q, cu_k, region, num_regions, deterministic=deterministic,
                              **kwargs)
    torch.cuda.synchronize()
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)
    if deterministic:
        again = attention_mass_cuda(q, k, cu_q, cu_k, region, num_regions, deterministic=True,
                                    **kwargs)
        assert torch.equal(got, again), "deterministic=True must give identical bits"


# Tensor-core kernel (fp16/bf16, head dim % 16 == 0, not deterministic):
# (hq, hk, d, dtype, regions, R, segments, heads, causal, with_lse)
MMA_CASES = [
    (4, 4, 64, torch.float16, "coarse", 5, None, None, True, False),       # MHA: 1 slot per CTA
    (8, 2, 80, torch.bfloat16, "patch", 100, None, None, True, False),    # 4 slots, d = 80
    (7, 1, 96, torch.bfloat16, "coarse", 7, "runs", None, True, True),     # GQA 7: 4 + 3 slots
    (8, 4, 128, torch.float16, "patch", 90, "random", [5, 4], False, False),  # 2 slots
    (4, 1, 256, torch.bfloat16, "coarse", 64, None, [3, 1], True, True),
    (8, 2, 256, torch.float16, "patch", 70, "runs", None, False, False),
    (28, 4, 128, torch.bfloat16, "patch", 120, None, [0, 1, 3, 22, 23, 24, 25, 26, 27], True,
     False),
    (2, 2, 16, torch.float16, "coarse", 3, None, None, True, False),        # smallest head dim
]


@gpu_test
@pytest.mark.parametrize("hq,hk,d,dtype,regions,num_regions,segments,heads,causal,with_lse",
                         MMA_CASES)
def test_gpu_tensor_core_attention_mass_matches_reference(hq, hk, d, dtype, regions, num_regions,
                                                          segments, heads, causal, with_lse):
    from kawhi_kernels.cuda.attention_mass import tensor_core_slots

    seed = 4321 + hq * 17 + d
    q, k, cu_q, cu_k = _qk(seed, LENS_Q, LENS_K, hq, hk, d, dtype)
    head_list = list(range(hq)) if heads is None else heads
    assert tensor_core_slots(q, k, head_list, hq, hk, None) > 0
    region = _regions(seed + 1, LENS_K, num_regions, regions)
    kwargs = dict(heads=heads, causal=causal)
    if segments is not None:
        seg, nseg = _segments(segments, seed + 2, q.shape[0])
        kwargs.update(query_segment=seg, num_segments=nseg)
    if with_lse:
        lse = _reference_lse(q, k, cu_q, cu_k, 1.0 / math.sqrt(d), causal)
        lse[:, 3] = math.nan                      # a non-finite normaliser: the row gives 0
        kwargs["lse"] = lse
    want = attention_mass_reference(q, k, cu_q, cu_k, region, num_regions, **kwargs)
    got = attention_mass_cuda(q, k, cu_q, cu_k, region, num_regions, **kwargs)
    warp_kernel = attention_mass_cuda(q, k, cu_q, cu_k, region, num_regions, block_rows=8,
                                      **kwargs)
    torch.cuda.synchronize()
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got, warp_kernel, **TOL)


# Every region path of the tensor-core kernel: coarse (R <= 64, one-hot MMA accumulated over
# the pass) and scatter (R > 64, per-tile columns), per-row and segment outputs, atomics and
# deterministic partials, GQA group sizes 1 / 4 / 7, head dims 64 / 128 / 256, fp16 and bf16.
# (dtype, group, hk, d, R, region kind, segments, deterministic)
REGION_PATH_CASES = [
    (torch.float16, 1, 4, 64, 5, "coarse", None, False),
    (torch.bfloat16, 4, 2, 128, 64, "coarse", None, True),
    (torch.bfloat16, 7, 1, 256, 33, "coarse", "runs", False),
    (torch.float16, 4, 2, 64, 17, "coarse", "random", True),
    (torch.bfloat16, 1, 3, 128, 2, "coarse", "runs", True),
    (torch.float16, 7, 1, 128, 65, "patch", None, False),
    (torch.bfloat16, 4, 2, 256, 300, "patch", None, True),
    (torch.float16, 1, 4, 256, 90, "patch", "runs", False),
    (torch.bfloat16, 7, 1, 64, 120, "patch", "random", True),
    (torch.float16, 4, 1, 128, 200, "coarse_many", "runs", True),   # R > 64, repeated ids
    (torch.bfloat16, 4, 1, 64, 500, "coarse_many", "random", False),
]


@gpu_test
@pytest.mark.parametrize("dtype,group,hk,d,num_regions,kind,segments,deterministic",
                         REGION_PATH_CASES)
def test_gpu_tensor_core_region_paths_match_reference(dtype, group, hk, d, num_regions, kind,
                                                      segments, deterministic):
    from kawhi_kernels.cuda.attention_mass import tensor_core_slots

    hq = group * hk
    seed = 999 + group * 13 + d + num_regions
    lens_q, lens_k = [5, 70, 0, 130, 9], [9, 150, 4, 260, 3]
    q, k, cu_q, cu_k = _qk(seed, lens_q, lens_k, hq, hk, d, dtype)
    assert tensor_core_slots(q, k, list(range(hq)), hq, hk, None) > 0
    if kind == "coarse_many":    # many keys per region, ids spread over all R (scatter path)
        g = torch.Generator().manual_seed(seed)
        region = torch.randint(-1, num_regions, (sum(lens_k),), generator=g, dtype=torch.int32)
        region = region.cuda()
    else:
        region = _regions(seed + 1, lens_k, num_regions, "coarse" if kind == "coarse" else "patch")
    kwargs = dict(causal=True)
    if segments is not None:
        seg, nseg = _segments(segments, seed + 2, q.shape[0])
        kwargs.update(query_segment=seg, num_segments=nseg)
    want = attention_mass_reference(q, k, cu_q, cu_k, region, num_regions, **kwargs)
    got = attention_mass_cuda(q, k, cu_q, cu_k, region, num_regions,
                              deterministic=deterministic, **kwargs)
    torch.cuda.synchronize()
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL)
    # per-row outputs (one writer per element) and deterministic segment sums repeat bitwise
    if deterministic or segments is None:
        again = attention_mass_cuda(q, k, cu_q, cu_k, region, num_regions,
                                    deterministic=deterministic, **kwargs)
        assert torch.equal(got, again)
    lse = _reference_lse(q, k, cu_q, cu_k, 1.0 / math.sqrt(d), True)
    with_lse = attention_mass_cuda(q, k, cu_q, cu_k, region, num_regions, lse=lse,
                                   deterministic=deterministic, **kwargs)
    torch.testing.assert_close(with_lse, want, **TOL)


@gpu_test
def test_gpu_tensor_core_kernel_long_sequences_and_skipped_tiles():
    # Several K tiles per row block, regions only in the middle tiles (the rest are skipped),
    # Lq > Lk rows without keys, and a sequence whose keys are all text (no region at all).
    lens_q, lens_k = [300, 90, 40], [700, 64, 20]
    q, k, cu_q, cu_k = _qk(77, lens_q, lens_k, 8, 2, 128, torch.bfloat16)
    region = torch.full((sum(lens_k),), -1, dtype=torch.int32)
    region[200:456] = torch.arange(256, dtype=torch.int32) // 2
    region = region.cuda()
    for causal in (True, False):
        want = attention_mass_reference(q, k, cu_q, cu_k, region, 128, causal=causal)
        got = attention_mass_cuda(q, k, cu_q, cu_k, region, 128, causal=causal)
        torch.testing.assert_close(got, want, **TOL)
        assert torch.count_nonzero(got[300:]) == 0


@gpu_test
def test_gpu_deterministic_segment_sums_are_bit_identical_and_match_atomics():
    q, k, cu_q, cu_k = _qk(7, [300, 200], [500, 400], 8, 2, 128, torch.bfloat16)
    region = _regions(8, [500, 400], 300, "patch")
    seg, nseg = _segments("random", 9, q.shape[0])
    kwargs = dict(query_segment=seg, num_segments=nseg)
    first = attention_mass_cuda(q, k, cu_q, cu_k, region, 300, deterministic=True, **kwargs)
    for block_rows in (None, 1, 5):
        again = attention_mass_cuda(q, k, cu_q, cu_k, region, 300, deterministic=True,
                                    block_rows=block_rows, **kwargs)
        if block_rows is None:
            assert torch.equal(first, again)
        torch.testing.assert_close(again, first, **TOL)
    atomic = attention_mass_cuda(q, k, cu_q, cu_k, region, 300, deterministic=False, **kwargs)
    torch.testing.assert_close(atomic, first, **TOL)
    # per-row output has one writer per element: identical bits without the flag too
    rows_a = attention_mass_cuda(q, k, cu_q, cu_k, region, 300)
    rows_b = attention_mass_cuda(q, k, cu_q, cu_k, region, 300)
    assert torch.equal(rows_a, rows_b)


@gpu_test
def test_gpu_rows_without_visible_keys_and_empty_inputs_give_zeros():
    # Lq > Lk under causal masking: the first Lq - Lk rows see no key.
    q, k, cu_q, cu_k = _qk(3, [10], [4], 4, 2, 64, torch.float32)
    region = torch.zeros(4, dtype=torch.int32, device="cuda")
    got = attention_mass_cuda(q, k, cu_q, cu_k, region, 1)
    assert torch.count_nonzero(got[:6]) == 0
    torch.testing.assert_close(got[6:], torch.ones_like(got[6:]), **TOL)   # all keys in region 0
    assert not torch.isnan(got).any()
    # no keys at all, no regions
    q0, k0, cu_q0, cu_k0 = _qk(4, [3], [0], 2, 1, 16, torch.float16)
    empty = attention_mass_cuda(q0, k0, cu_q0, cu_k0, torch.zeros(0, dtype=torch.int32,
                                                                    device="cuda"), 2)
    assert empty.shape == (3, 2, 2) and torch.count_nonzero(empty) == 0
    none = attention_mass_cuda(q, k, cu_q, cu_k, region, 0)
    assert none.shape == (10, 4, 0)


@gpu_test
def test_gpu_public_op_dispatches_to_cuda_on_a_side_stream():
    from kawhi_kernels import attention_mass, cosine_alignment

    q, k, cu_q, cu_k = _qk(11, LENS_Q, LENS_K, 8, 2, 64, torch.float16)
    region = _regions(12, LENS_K, 6, "coarse")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = attention_mass(q, k, cu_q, cu_k, region, 6, backend="cuda")
        cos = cosine_alignment(q, k, cu_q, cu_k, region, 6, backend="cuda")
    stream.synchronize()
    torch.testing.assert_close(got, attention_mass(q, k, cu_q, cu_k, region, 6, backend="torch"),
                               **TOL)
    torch.testing.assert_close(cos, cosine_alignment(q, k, cu_q, cu_k, region, 6,
                                                     backend="torch"), **TOL)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hk,d,num_regions,heads,per_head", [
    (4, 4, 64, 1, None, False),
    (8, 2, 80, 3, [7, 1, 4], True),
    (7, 1, 128, 5, [0, 6], False),
    (28, 4, 128, 1, [0, 1, 3, 22, 23, 24, 25, 26, 27], False),
    (4, 1, 256, 40, None, True),
])
def test_gpu_cosine_alignment_matches_reference(dtype, hq, hk, d, num_regions, heads, per_head):
    q, k, cu_q, cu_k = _qk(21 + d, LENS_Q, LENS_K, hq, hk, d, dtype)
    q[3] = 0          # zero query vectors: cosine 0
    k[5] = 0          # a zero key counts with unit vector 0
    region = _regions(22, LENS_K, num_regions, "coarse" if num_regions < 10 else "patch")
    want = cosine_alignment_reference(q, k, cu_q, cu_k, region, num_regions, heads=heads,
                                      per_head=per_head)
    got = cosine_alignment_cuda(q, k, cu_q, cu_k, region, num_regions, heads=heads,
                                per_head=per_head)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    assert torch.equal(got, cosine_alignment_cuda(q, k, cu_q, cu_k, region, num_regions,
                                                  heads=heads, per_head=per_head))


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 80, 100, 96, 256])
@pytest.mark.parametrize("heads,per_head", [([0, 3, 5, 1, 2, 7, 6, 4, 0], False),   # 9 slots, a repeat
                                            ([7, 2, 2, 5, 1], True)])
def test_gpu_cosine_alignment_vector_and_scalar_layouts(dtype, d, heads, per_head):
    """Aligned rows take 16-byte loads (lane groups of one head, several heads per warp), rows
    at an odd element offset or with an odd head dim the scalar fallback: both match the
    reference and each other, and repeat bit for bit."""
    q, k, cu_q, cu_k = _qk(31 + d, LENS_Q, LENS_K, 8, 2, d + 8, dtype)   # strides d + 8
    q[2] = 0
    region = _regions(32, LENS_K, 3, "coarse")
    results = []
    for offset in (0, 1):           # 1: row starts at an odd element (not 16-byte aligned)
        qq, kk = q[..., offset:offset + d], k[..., offset:offset + d]
        want = cosine_alignment_reference(qq, kk, cu_q, cu_k, region, 3, heads=heads,
                                          per_head=per_head)
        got = cosine_alignment_cuda(qq, kk, cu_q, cu_k, region, 3, heads=heads, per_head=per_head)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
        assert torch.equal(got, cosine_alignment_cuda(qq, kk, cu_q, cu_k, region, 3, heads=heads,
                                                      per_head=per_head))
        results.append(got)
    torch.testing.assert_close(results[0], results[1], atol=2e-6, rtol=2e-5)


@gpu_test
@pytest.mark.parametrize("shape,grid,sigma", [
    ((56, 84), (2, 3), 1.0),       # Qwen2.5-VL patches (28 px)
    ((64, 32), (2, 1), 1.0),       # Qwen3-VL patches (32 px)
    ((3, 6), (1, 2), 1.0),         # image smaller than the Gaussian halo: periodic reflection
    ((40, 40), (5, 5), 2.5),
])
def test_gpu_sguf_descriptors_match_reference(shape, grid, sigma):
    from kawhi_kernels.cuda import patch_descriptors_cuda
    from kawhi_kernels.regions import patch_descriptors

    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    images = torch.randint(0, 256, (3, *shape, 3), generator=g, dtype=torch.uint8)
    images[0, : shape[0] // 2] = 200          # flat area: eigenvalues near 0
    want = patch_descriptors(images.cuda(), grid, sigma=sigma)
    got = patch_descriptors_cuda(images.cuda(), grid, sigma=sigma)
    # Absolute tolerance relative to each output's scale (λmin = half-trace − radius cancels,
    # so its error scales with λmax).
    scales = {"lam_max": float(want[0].max()), "lam_min": float(want[0].max()),
              "lightness": 100.0}
    for name, a, b in zip(("lam_max", "lam_min", "lightness"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=2e-5 * (scales[name] + 1.0), rtol=1e-4, msg=name)
    single = patch_descriptors_cuda(images[1].cuda(), grid, sigma=sigma)
    for a, b in zip(single, got):
        assert torch.equal(a, b[1])


@gpu_test
def test_gpu_sguf_descriptors_refuse_an_oversized_tile():
    from kawhi_kernels.cuda import patch_descriptors_cuda

    image = torch.zeros(512, 512, 3, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="bytes of shared memory per block"):
        patch_descriptors_cuda(image, (1, 1), sigma=1.0)


@gpu_test
def test_gpu_qwen2_5_vl_7b_shapes():
    """Qwen2.5-VL-7B: Hq 28, Hk 4, D 128, bf16; 2 sequences of 2k keys (1k image tokens after
    64 text tokens, one region per image token) and 512 response rows each, the paper's
    vision-critical heads, paragraph segments."""
    lens_q, lens_k = [512, 512], [2048, 2048]
    q, k, cu_q, cu_k = _qk(99, lens_q, lens_k, 28, 4, 128, torch.bfloat16)
    region = torch.full((sum(lens_k),), -1, dtype=torch.int32)
    for b in range(2):
        region[b * 2048 + 64:b * 2048 + 64 + 1024] = torch.arange(1024, dtype=torch.int32)
    region = region.cuda()
    heads = [0, 1, 3, 22, 23, 24, 25, 26, 27]
    seg = (torch.arange(1024) // 100).to(torch.int32).cuda()        # 11 paragraph segments
    for kwargs in (dict(), dict(query_segment=seg, num_segments=11)):
        want = attention_mass_reference(q, k, cu_q, cu_k, region, 1024, heads=heads, **kwargs)
        for det in (False, True):
            got = attention_mass_cuda(q, k, cu_q, cu_k, region, 1024, heads=heads,
                                      deterministic=det, **kwargs)
            torch.testing.assert_close(got, want, **TOL)
    selected = (region >= 0).to(torch.int32) - 1                     # KAWHI: one region
    want = cosine_alignment_reference(q, k, cu_q, cu_k, selected, 1, heads=heads)
    got = cosine_alignment_cuda(q, k, cu_q, cu_k, selected, 1, heads=heads)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_gpu_backend_is_usable_where_torch_sees_a_gpu():
    # Not skipped when the backend is unusable: on a GPU machine that is a failure.
    assert cuda_backend_problem(torch.cuda.current_device()) is None
    assert EXT.cuda_device_count() == torch.cuda.device_count()
    major, minor = torch.cuda.get_device_capability()
    assert EXT.cuda_device_capability(torch.cuda.current_device()) == major * 10 + minor


@pytest.mark.parametrize("implemented", [("torch", "cuda"), ("torch", "triton", "cuda")])
def test_auto_never_picks_cuda_without_gpu_timing_data(monkeypatch, implemented):
    # Even where the CUDA backend could run, `auto` stays off it (rule next to resolve_backend).
    from kawhi_kernels import _backend

    monkeypatch.setattr(_backend, "cuda_unavailable_reason", lambda device: None)
    monkeypatch.setattr(_backend, "triton_unavailable_reason", lambda device: None)
    got = _backend.resolve_backend("auto", torch.device("cuda", 0), "attention_mass", implemented,
                                   head_dim=128)
    assert got == ("triton" if "triton" in implemented else "torch")
    assert _backend.resolve_backend("cuda", torch.device("cuda", 0), "attention_mass",
                                    implemented) == "cuda"
