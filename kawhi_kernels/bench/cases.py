"""Benchmark cases: one builder per op / backend / baseline, each turning a shape into inputs and a
callable ``run(copy_index)`` (plus an accuracy check against the fp64 reference of the same run).

Builders raise :class:`Unavailable` (recorded as "unavailable: reason", never a crash) when a
backend cannot run here: Triton without a GPU, the CUDA extension not built, flash-colreduce not
installed, scikit-image missing, … Inputs and the fp64 reference of a shape are generated once and
shared by all cases of that shape (:class:`BenchContext`).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .._backend import available_backends
from ..ops import attention_mass as am_op
from ..ops import cosine_alignment as cos_op
from ..ops import grid_pyramid as gp_op
from ..ops._dispatch import load_implementation
from . import accuracy
from .baselines import (BaselineUnavailable, FlashForward, FlexAttentionMass, cosine_alignment_naive,
                        sguf_numpy)
from .inputs import attention_inputs, cosine_inputs, response_texts, synthetic_image
from .shapes import AttentionShape, CosineShape, GridShape, KawhiShape, SgufShape


class Unavailable(RuntimeError):
    """This case cannot run in this environment; the message is the reason."""


@dataclass
class Prepared:
    """A ready-to-time case: ``run(i)`` computes on input copy i (0 … copies−1); ``check(out)``
    returns the max relative error of the output of copy 0 (or None); ``note`` describes the
    implementation or anything a reader of the results needs."""

    run: Callable[[int], object]
    copies: int
    check: Callable[[object], float | None] | None = None
    note: str = ""


@dataclass(frozen=True)
class Case:
    """One (op, backend, lse, shape) combination and the builder that prepares it."""

    op: str
    backend: str
    shape: object
    build: Callable[["BenchContext"], Prepared]
    lse: bool = False

    @property
    def label(self) -> str:
        return f"{self.op}/{self.shape.name}/{self.backend}{'+lse' if self.lse else ''}"


class BenchContext:
    """Device, dtype, number of input copies and seed of a sweep, plus a cache of the inputs and
    references of the current shape (dropped, and device memory released, when the shape changes).
    ``allow_interpreter``: run the Triton backend on CPU tensors when TRITON_INTERPRET=1 (slow:
    correctness only); by default such cases are recorded as unavailable."""

    def __init__(self, device: torch.device, dtype: torch.dtype, copies: int, seed: int = 0,
                 allow_interpreter: bool = False):
        self.device = torch.device(device)
        self.allow_interpreter = allow_interpreter
        self.dtype = dtype
        self.copies = copies
        self.seed = seed
        self._owner = None
        self._cache: dict = {}

    def shared(self, op: str, shape, item: str, factory: Callable[[], object]):
        """The cached ``item`` of (op, shape), built by ``factory()`` on first use."""
        owner = (op, shape.name)
        if owner != self._owner:
            self.release()
            self._owner = owner
        if item not in self._cache:
            self._cache[item] = factory()
        return self._cache[item]

    def release(self) -> None:
        """Drop cached inputs/references and return freed device memory."""
        self._cache.clear()
        self._owner = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- helpers

def backend_unavailable(device: torch.device, backend: str, implementations: dict) -> str | None:
    """Why ``backend`` of an op (its ``IMPLEMENTATIONS`` table) cannot run on ``device``, or None."""
    if backend not in implementations:
        return f"no {backend!r} implementation of this op"
    reason = available_backends(device).get(backend)
    if reason is not None:
        return reason
    try:
        load_implementation(implementations[backend])
    except Exception as exc:  # module not written yet, or broken
        return f"implementation {implementations[backend]} not importable ({type(exc).__name__}: {exc})"
    return None


def _check_backend(ctx: BenchContext, backend: str, implementations: dict) -> None:
    """Raise :class:`Unavailable` when ``backend`` cannot (or should not) be benchmarked here."""
    if backend == "triton" and ctx.device.type == "cpu" and not ctx.allow_interpreter:
        raise Unavailable("Triton on CPU tensors only runs in its interpreter (correctness, not "
                          "speed); pass --triton-interpreter to time it anyway")
    reason = backend_unavailable(ctx.device, backend, implementations)
    if reason is not None:
        raise Unavailable(reason)


def _backend_note(ctx: BenchContext, backend: str) -> str:
    if backend == "triton" and ctx.device.type == "cpu":
        return "Triton CPU interpreter (TRITON_INTERPRET=1): correctness only, not a speed"
    return ""


def _require_modules(*names: str) -> None:
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise Unavailable(f"{name} is not importable ({type(exc).__name__})") from None


def _attention_data(ctx: BenchContext, shape: AttentionShape):
    return ctx.shared("attention_mass", shape, "inputs",
                      lambda: attention_inputs(shape, ctx.device, ctx.dtype, ctx.copies, ctx.seed))


def _attention_check(ctx: BenchContext, shape: AttentionShape) -> Callable[[torch.Tensor], float]:
    def check(out: torch.Tensor) -> float:
        ref, rows = ctx.shared("attention_mass", shape, "reference",
                               lambda: accuracy.attention_reference_subsample(_attention_data(ctx, shape)))
        return accuracy.max_rel_err(out[rows], ref)
    return check


# ----------------------------------------------------------------------------- attention_mass

def attention_naive_case(ctx: BenchContext, shape: AttentionShape) -> Prepared:
    """The materialising baseline ``attention_mass_naive`` (softmax(QKᵀ) per sequence in fp32)."""
    data = _attention_data(ctx, shape)

    def run(i: int):
        return am_op.attention_mass_naive(data.qs[i], data.ks[i], data.cu_seqlens_q, data.cu_seqlens_k,
                                          data.key_region, data.num_regions, **data.op_kwargs())
    return Prepared(run, data.copies, _attention_check(ctx, shape), "materialises softmax(QK^T) per sequence")


def attention_backend_case(ctx: BenchContext, shape: AttentionShape, backend: str, lse: bool) -> Prepared:
    """``attention_mass(..., backend=backend)``; with ``lse`` the normaliser is computed once
    beforehand (fp32, untimed) and passed in, so the op skips its normaliser pass."""
    _check_backend(ctx, backend, am_op.IMPLEMENTATIONS)
    data = _attention_data(ctx, shape)
    lses = None
    if lse:
        lses = ctx.shared("attention_mass", shape, "lse", lambda: [
            accuracy.attention_lse(q, k, data.cu_seqlens_q, data.cu_seqlens_k, data.causal, data.softmax_scale)
            for q, k in zip(data.qs, data.ks)])

    def run(i: int):
        return am_op.attention_mass(data.qs[i], data.ks[i], data.cu_seqlens_q, data.cu_seqlens_k,
                                    data.key_region, data.num_regions,
                                    lse=None if lses is None else lses[i], backend=backend,
                                    **data.op_kwargs())
    notes = [_backend_note(ctx, backend), "lse precomputed in fp32, untimed" if lse else ""]
    return Prepared(run, data.copies, _attention_check(ctx, shape), "; ".join(n for n in notes if n))


def attention_flex_case(ctx: BenchContext, shape: AttentionShape) -> Prepared:
    """No-new-kernel baseline: torch flex_attention with V = key→region one-hot."""
    data = _attention_data(ctx, shape)
    try:
        flex = FlexAttentionMass(data, ctx.device)
    except BaselineUnavailable as exc:
        raise Unavailable(str(exc)) from None
    note = ("torch.compile(flex_attention); block mask built once, untimed" if flex.compiled else
            "flex_attention eager (unfused, materialising: no torch.compile off CUDA); block mask untimed")
    return Prepared(flex, data.copies, _attention_check(ctx, shape), note)


def attention_flash_case(ctx: BenchContext, shape: AttentionShape) -> Prepared:
    """Speed-of-light yardstick: a FlashAttention forward over the same rows and keys (its output
    is O = PV, not the mass, so there is no accuracy check)."""
    data = _attention_data(ctx, shape)
    try:
        flash = FlashForward(data, ctx.device)
    except BaselineUnavailable as exc:
        raise Unavailable(str(exc)) from None
    return Prepared(flash, data.copies, None, flash.impl)


def attention_colreduce_case(ctx: BenchContext, shape: AttentionShape) -> Prepared:
    """flash-colreduce (PyPI ``flash-colreduce``) column sums, on its published shapes: one
    sequence, every key a region, all rows one segment. Needs CUDA and the package."""
    if ctx.device.type != "cuda":
        raise Unavailable("flash-colreduce runs on CUDA only")
    try:
        from flash_colreduce import flash_colreduce
    except Exception as exc:
        raise Unavailable(f"flash_colreduce is not importable ({type(exc).__name__})") from None
    if shape.regions != "key" or shape.segments != 1 or shape.batch != 1:
        raise Unavailable("flash-colreduce computes column sums of one sequence only")
    data = _attention_data(ctx, shape)
    hq, hk = data.qs[0].shape[1], data.ks[0].shape[1]
    # It takes [B, H, L, D] with equal head counts: K is repeated for GQA beforehand (untimed).
    keys = [k.repeat_interleave(hq // hk, dim=1).permute(1, 0, 2).unsqueeze(0) for k in data.ks]

    def run(i: int):
        q = data.qs[i].permute(1, 0, 2).unsqueeze(0)
        return flash_colreduce(q, keys[i], reduction="sum", is_causal=data.causal,
                               scale=data.softmax_scale).float()            # [1, Hq, Lk]
    return Prepared(run, data.copies, _attention_check(ctx, shape),
                    "K repeated to Hq beforehand, untimed; output in the input dtype")


# ----------------------------------------------------------------------------- cosine_alignment

def _cosine_data(ctx: BenchContext, shape: CosineShape):
    return ctx.shared("cosine_alignment", shape, "inputs",
                      lambda: cosine_inputs(shape, ctx.device, ctx.dtype, ctx.copies, ctx.seed))


def _cosine_heads(shape: CosineShape) -> list[int]:
    from ..heads.presets import vision_critical_heads

    preset = shape.head_config.preset
    return vision_critical_heads(preset) if preset else list(range(shape.head_config.hq))


def _cosine_check(ctx: BenchContext, shape: CosineShape) -> Callable[[torch.Tensor], float]:
    def check(out: torch.Tensor) -> float:
        ref = ctx.shared("cosine_alignment", shape, "reference",
                         lambda: accuracy.cosine_reference(_cosine_data(ctx, shape), _cosine_heads(shape)))
        return accuracy.max_rel_err(out, ref)
    return check


def cosine_naive_case(ctx: BenchContext, shape: CosineShape) -> Prepared:
    """The direct O(H·T·N·D) form: materialise every cosine, then average."""
    data, heads = _cosine_data(ctx, shape), _cosine_heads(shape)

    def run(i: int):
        return cosine_alignment_naive(data.qs[i], data.ks[i], data.cu_seqlens_q, data.cu_seqlens_k,
                                      data.key_region, data.num_regions, heads)
    return Prepared(run, data.copies, _cosine_check(ctx, shape), f"materialises cos [H, T, N]; heads {heads}")


def cosine_backend_case(ctx: BenchContext, shape: CosineShape, backend: str) -> Prepared:
    """``cosine_alignment(..., heads=preset, backend=backend)``."""
    _check_backend(ctx, backend, cos_op.IMPLEMENTATIONS)
    data, heads = _cosine_data(ctx, shape), _cosine_heads(shape)

    def run(i: int):
        return cos_op.cosine_alignment(data.qs[i], data.ks[i], data.cu_seqlens_q, data.cu_seqlens_k,
                                       data.key_region, data.num_regions, heads=heads, backend=backend)
    notes = [_backend_note(ctx, backend), f"heads {heads}"]
    return Prepared(run, data.copies, _cosine_check(ctx, shape), "; ".join(n for n in notes if n))


def cosine_min_bytes(data, heads: list[int]) -> int:
    """Fewest bytes any ``cosine_alignment`` must read: the selected heads of every query row,
    plus the KV heads those map to (GQA) of every selected key (key_region ≥ 0)."""
    hq, hk, d = data.qs[0].shape[1], data.ks[0].shape[1], data.qs[0].shape[2]
    element = data.qs[0].element_size()
    kv_heads = {h // (hq // hk) for h in heads}
    selected_keys = int((data.key_region >= 0).sum())
    return element * d * (data.qs[0].shape[0] * len(heads) + selected_keys * len(kv_heads))


def cosine_read_bound_case(ctx: BenchContext, shape: CosineShape) -> Prepared:
    """Bandwidth yardstick: one streaming read (a ``sum``) of :func:`cosine_min_bytes` bytes in
    the input dtype — the time a kernel that only reads its inputs once could reach here."""
    data, heads = _cosine_data(ctx, shape), _cosine_heads(shape)
    nbytes = cosine_min_bytes(data, heads)
    element = data.qs[0].element_size()
    buffers = [torch.randn(max(1, nbytes // element), device=ctx.device, dtype=torch.float32).to(ctx.dtype)
               for _ in range(data.copies)]

    def run(i: int):
        return buffers[i].sum(dtype=torch.float32)
    return Prepared(run, data.copies, None, f"reads {nbytes} bytes once (selected heads/keys); "
                    "GB/s = bytes / time")


# ----------------------------------------------------------------------------- grid_pyramid

def _grid_data(ctx: BenchContext, shape: GridShape) -> list[torch.Tensor]:
    def make():
        gen = torch.Generator().manual_seed(ctx.seed + 5)
        return [(torch.rand(shape.lead, shape.image_tokens, generator=gen) / shape.image_tokens)
                .to(ctx.device, ctx.dtype) for _ in range(ctx.copies)]
    return ctx.shared("grid_pyramid", shape, "inputs", make)


def _grid_check(ctx: BenchContext, shape: GridShape) -> Callable[[list], float]:
    def check(out: list) -> float:
        grids = [list(g) for g in shape.grids]
        ref = ctx.shared("grid_pyramid", shape, "reference", lambda: gp_op.grid_pyramid(
            _grid_data(ctx, shape)[0].double(), grids, shape.levels, backend="torch"))
        return max(accuracy.max_rel_err(a, b) for a, b in zip(out, ref))
    return check


def grid_backend_case(ctx: BenchContext, shape: GridShape, backend: str) -> Prepared:
    """``grid_pyramid(mass, grids, levels, backend=backend)`` (torch: the reference, index_add per level)."""
    _check_backend(ctx, backend, gp_op.IMPLEMENTATIONS)
    data, grids = _grid_data(ctx, shape), [list(g) for g in shape.grids]

    def run(i: int):
        return gp_op.grid_pyramid(data[i], grids, shape.levels, backend=backend)
    return Prepared(run, len(data), _grid_check(ctx, shape), _backend_note(ctx, backend))


def grid_read_bound_case(ctx: BenchContext, shape: GridShape) -> Prepared:
    """Bandwidth yardstick: read the mass once and write the finest level once (fp32), the
    least traffic of any grid_pyramid whose first level is cell size 1."""
    data = _grid_data(ctx, shape)
    outs = [torch.empty(x.shape, dtype=torch.float32, device=ctx.device) for x in data]

    def run(i: int):
        return outs[i].copy_(data[i])
    return Prepared(run, len(data), None,
                    f"reads {data[0].numel() * data[0].element_size()} bytes, writes "
                    f"{data[0].numel() * 4} (fp32 level 1); GB/s = bytes / time")


# ----------------------------------------------------------------------------- SGUF

def _sguf_images(ctx: BenchContext, shape: SgufShape):
    return ctx.shared("sguf", shape, "images",
                      lambda: [synthetic_image(shape.grid, shape.patch, ctx.seed + i) for i in range(ctx.copies)])


def _sguf_baseline(ctx: BenchContext, shape: SgufShape) -> dict:
    """The NumPy pipeline's result on copy 0 (fp64 descriptors and labels), once per shape."""
    return ctx.shared("sguf", shape, "reference", lambda: sguf_numpy(_sguf_images(ctx, shape)[0], shape.grid))


def sguf_numpy_case(ctx: BenchContext, shape: SgufShape) -> Prepared:
    """Baseline: SGUF as a NumPy / scikit-image / SciPy pipeline on the host (float64)."""
    _require_modules("skimage", "scipy")
    images = _sguf_images(ctx, shape)

    def run(i: int):
        return sguf_numpy(images[i], shape.grid, rng=np.random.default_rng(i))
    return Prepared(run, len(images), None, "rgb2lab, gaussian_filter, sobel, scipy connected_components (fp64, host)")


def sguf_kawhi_case(ctx: BenchContext, shape: SgufShape) -> Prepared:
    """``select_key_regions`` on the sweep's device (descriptors in fp32 on the device, union-find
    on the host). Checked against the NumPy pipeline's fp64 descriptors; the note says whether the
    component labels agree."""
    from ..regions.descriptors import patch_descriptors
    from ..regions.sguf import select_key_regions

    images = [torch.from_numpy(im).to(ctx.device) for im in _sguf_images(ctx, shape)]
    generator = torch.Generator().manual_seed(ctx.seed)

    def run(i: int):
        return select_key_regions(images[i], shape.grid, generator=generator)

    prepared = Prepared(run, len(images), None, "descriptors fp32 on device, union-find on host")

    def check(out) -> float | None:
        try:
            base = _sguf_baseline(ctx, shape)
        except ImportError:
            prepared.note += "; no scikit-image/scipy to check against"
            return None
        lmax, lmin, light = patch_descriptors(images[0], shape.grid)
        ours = torch.cat([lmax, lmin, light]).double().cpu()
        theirs = torch.from_numpy(np.concatenate([base["lam_max"], base["lam_min"], base["lightness"]]))
        differ = int((out.labels.cpu() != torch.from_numpy(base["labels"])).sum())
        prepared.note += ("; labels identical to the NumPy pipeline" if differ == 0 else
                          f"; labels differ from the NumPy pipeline at {differ} tokens")
        return accuracy.max_rel_err(ours, theirs)

    prepared.check = check
    return prepared


# ----------------------------------------------------------------------------- KAWHI step

def _tiny_model(shape: KawhiShape, device: torch.device, dtype: torch.dtype):
    from ..integrations import tiny_qwen2_5_vl

    if shape.model == "tiny":
        model = tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa", dtype=dtype)
    else:  # two decoder layers at Qwen2.5-VL-7B text widths
        model = tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa", dtype=dtype, text_config=dict(
            hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
            num_hidden_layers=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}))
    return model.to(device)


def _kawhi_setup(ctx: BenchContext, shape: KawhiShape) -> dict:
    from ..credit.pipeline import KAWHI
    from ..integrations import tiny_vl_inputs
    from ..integrations.tiny_models import IMAGE_TOKEN_ID

    dtype = ctx.dtype if ctx.device.type == "cuda" else torch.float32
    model = _tiny_model(shape, ctx.device, dtype)
    merge = model.config.vision_config.spatial_merge_size
    gh, gw = shape.grid
    batches = [tiny_vl_inputs(model, images_per_sample=[1] * shape.batch,
                              text_lens=[shape.question_len + shape.response_len] * shape.batch,
                              image_grid=(gh * merge, gw * merge), seed=ctx.seed + i, prefix_len=2)
               for i in range(ctx.copies)]
    length = batches[0]["input_ids"].shape[1]
    query_mask = torch.zeros(shape.batch, length, dtype=torch.bool, device=ctx.device)
    query_mask[:, length - shape.response_len:] = True
    patch = model.config.vision_config.patch_size * merge
    image = torch.from_numpy(synthetic_image(shape.grid, patch, ctx.seed)).to(ctx.device)
    texts, offsets = response_texts(shape.batch, shape.response_len, shape.paragraphs, ctx.seed)
    image_token_mask = batches[0]["input_ids"][batches[0]["attention_mask"].bool()] == IMAGE_TOKEN_ID
    heads = "qwen2.5-vl-7b" if shape.model == "7b-width" else None
    return dict(model=model, batches=batches, query_mask=query_mask, image=image, texts=texts,
                offsets=offsets, image_token_mask=image_token_mask,
                response_mask=torch.ones(shape.batch, shape.response_len, dtype=torch.bool, device=ctx.device),
                advantages=torch.linspace(-1.0, 1.0, shape.batch, device=ctx.device),
                kawhi=KAWHI(heads=heads, seed=ctx.seed))


def kawhi_step_case(ctx: BenchContext, shape: KawhiShape, variant: str) -> Prepared:
    """One KAWHI step on a random Qwen2.5-VL (no_grad forward, the policy's log-prob pass):

    * "forward": the plain forward (the baseline);
    * "forward+capture": the same forward inside ``capture_qk(model, [-1])`` (response rows);
    * "forward+capture+kawhi": plus SGUF on the prompt image, α_t, paragraph weights and the
      reweighted advantages (``KAWHI.select_regions`` / ``key_region_for_batch`` / ``reweight``).
    """
    _require_modules("transformers")
    from ..integrations import capture_qk

    setup = ctx.shared("kawhi_step", shape, "setup", lambda: _kawhi_setup(ctx, shape))
    model, batches = setup["model"], setup["batches"]
    last = model.config.text_config.num_hidden_layers - 1

    def forward(i: int):
        with torch.no_grad():
            return model(**batches[i]).logits

    def forward_capture(i: int):
        with torch.no_grad(), capture_qk(model, [-1], query_mask=setup["query_mask"]) as cap:
            logits = model(**batches[i]).logits
        return logits, cap.records[last]

    def full_step(i: int):
        logits, record = forward_capture(i)
        kawhi = setup["kawhi"]
        regions = kawhi.select_regions([setup["image"]], [shape.grid])
        image_of_key = torch.zeros_like(setup["image_token_mask"], dtype=torch.int64)
        key_region = kawhi.key_region_for_batch(setup["image_token_mask"], image_of_key, regions)
        result = kawhi.reweight(setup["advantages"], record.q, record.k, record.cu_seqlens_q,
                                record.cu_seqlens_k, key_region, setup["texts"], setup["offsets"],
                                setup["response_mask"])
        return result, record, key_region

    if variant == "forward":
        return Prepared(forward, len(batches), None, "torch.no_grad forward, sdpa attention")
    if variant == "forward+capture":
        def check(out) -> float:
            return accuracy.max_rel_err(out[0], forward(0))
        return Prepared(forward_capture, len(batches), check,
                        "max_rel_err: logits vs the plain forward (0 = bit-identical)")
    if variant == "forward+capture+kawhi":
        def check_alpha(out) -> float:
            result, record, key_region = out
            ref = cos_op.cosine_alignment(record.q.double(), record.k.double(), record.cu_seqlens_q,
                                          record.cu_seqlens_k, key_region, 1, heads=setup["kawhi"].heads,
                                          backend="torch")[:, 0]
            return accuracy.max_rel_err(result.alpha, ref)
        return Prepared(full_step, len(batches), check_alpha,
                        "SGUF + alpha + paragraph weights + advantages; max_rel_err: alpha vs fp64")
    raise ValueError(f"variant: expected forward, forward+capture or forward+capture+kawhi, got {variant!r}")


# ----------------------------------------------------------------------------- enumeration

ATTENTION_BACKENDS = ("naive", "torch", "triton", "cuda", "flex", "flash", "flash_colreduce")
COSINE_BACKENDS = ("naive", "torch", "triton", "cuda", "read_bound")
SGUF_BACKENDS = ("numpy_skimage", "kawhi")
GRID_BACKENDS = ("torch", "triton", "cuda", "read_bound")
KAWHI_VARIANTS = ("forward", "forward+capture", "forward+capture+kawhi")
BASELINES = {"attention_mass": "naive", "cosine_alignment": "naive", "sguf": "numpy_skimage",
             "kawhi_step": "forward", "grid_pyramid": "torch"}


def cases_for(op: str, shape) -> list[Case]:
    """Every case of ``op`` on ``shape``, baseline first (the lse variants of the attention
    backends follow their plain version; flash-colreduce only on column-sum shapes)."""
    cases: list[Case] = []
    if op == "attention_mass":
        cases.append(Case(op, "naive", shape, lambda ctx: attention_naive_case(ctx, shape)))
        for backend in ("torch", "triton", "cuda"):
            for lse in (False, True):
                cases.append(Case(op, backend, shape,
                                  lambda ctx, b=backend, l=lse: attention_backend_case(ctx, shape, b, l), lse))
        cases.append(Case(op, "flex", shape, lambda ctx: attention_flex_case(ctx, shape)))
        cases.append(Case(op, "flash", shape, lambda ctx: attention_flash_case(ctx, shape)))
        if shape.regions == "key":
            cases.append(Case(op, "flash_colreduce", shape, lambda ctx: attention_colreduce_case(ctx, shape)))
    elif op == "cosine_alignment":
        cases.append(Case(op, "naive", shape, lambda ctx: cosine_naive_case(ctx, shape)))
        for backend in ("torch", "triton", "cuda"):
            cases.append(Case(op, backend, shape, lambda ctx, b=backend: cosine_backend_case(ctx, shape, b)))
        cases.append(Case(op, "read_bound", shape, lambda ctx: cosine_read_bound_case(ctx, shape)))
    elif op == "sguf":
        cases.append(Case(op, "numpy_skimage", shape, lambda ctx: sguf_numpy_case(ctx, shape)))
        cases.append(Case(op, "kawhi", shape, lambda ctx: sguf_kawhi_case(ctx, shape)))
    elif op == "grid_pyramid":
        for backend in ("torch", "triton", "cuda"):
            cases.append(Case(op, backend, shape, lambda ctx, b=backend: grid_backend_case(ctx, shape, b)))
        cases.append(Case(op, "read_bound", shape, lambda ctx: grid_read_bound_case(ctx, shape)))
    elif op == "kawhi_step":
        for variant in KAWHI_VARIANTS:
            cases.append(Case(op, variant, shape, lambda ctx, v=variant: kawhi_step_case(ctx, shape, v)))
    else:
        raise ValueError(f"op: unknown op {op!r}")
    return cases


def filter_backends(cases: list[Case], backends: list[str] | None) -> list[Case]:
    """Keep cases whose backend is in ``backends`` ("torch+lse" selects only the lse variant,
    "torch" both); all when None."""
    if not backends:
        return cases
    wanted = set(backends)
    return [c for c in cases if c.backend in wanted or (c.backend + ("+lse" if c.lse else "")) in wanted]
