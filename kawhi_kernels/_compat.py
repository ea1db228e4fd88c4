"""Everything that differs between the supported versions of Triton and transformers, in one place.

Supported (README "Supported stacks", pyproject.toml): torch 2.11–2.15, Triton 3.6–3.9,
transformers 5.5.3–latest (not 5.6.0). Kernels, launchers and tests ask this module instead of
testing versions themselves, so a new release means one edit here.

Triton:
    * :func:`patch_triton_interpreter` — Triton < 3.7's interpreter turns a loaded scalar into a
      Python int with ``int(array_of_shape_1)``, which NumPy ≥ 2.4 refuses ("only 0-dimensional
      arrays can be converted to Python scalars"): every ``range(0, n, BLOCK)`` with a loaded
      bound fails. Triton 3.7 squeezes first; the patch does the same on older releases.
    * :func:`interpreter_computes_bf16_dot` — the interpreter's bf16 ``tl.dot`` rounds badly
      (wrong numbers, inf, NaN) on every supported release; launchers upcast bf16 operands to
      fp32 under the interpreter (exact: every bf16 value is an fp32 value, and compiled bf16
      tensor-core products accumulate in fp32 too).
    * :func:`compile_for_target` — compiling a ``@triton.jit`` kernel for a GPU arch without a GPU
      (static resource checks), and :func:`cuobjdump_path` for reading the cubin.

transformers:
    * :func:`text_rotary_cos_sin` — the text decoder's position embeddings arrive either already
      interleaved ([B, L, D], transformers ≥ 5.11) or per M-RoPE axis ([3, B, L, D], ≤ 5.10, where
      the attention layer interleaves them with the ``mrope_section`` of the config).
    * :func:`enable_activation_checkpointing` — ``activation_checkpointing_enable`` (newer) or
      ``gradient_checkpointing_enable`` (older).
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import re

__all__ = [
    "TRITON_MIN",
    "TRANSFORMERS_MIN",
    "version_tuple",
    "package_version",
    "patch_triton_interpreter",
    "interpreter_computes_bf16_dot",
    "compile_for_target",
    "cuobjdump_path",
    "text_rotary_cos_sin",
    "enable_activation_checkpointing",
]

TRITON_MIN = (3, 6, 0)
TRANSFORMERS_MIN = (5, 5, 3)


def version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: "3.6.0+git" → (3, 6, 0)."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    if match is None:
        raise ValueError(f"version: expected a release like '3.6.0', got {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


@functools.lru_cache(maxsize=None)
def package_version(distribution: str) -> tuple[int, ...] | None:
    """Installed release of ``distribution`` (e.g. "triton"), or None when it is not installed."""
    try:
        return version_tuple(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# Triton

_INTERPRETER_PATCHED = False


def patch_triton_interpreter() -> None:
    """Make Triton < 3.7's interpreter accept loaded scalars as loop bounds under NumPy ≥ 2.4.

    Idempotent and a no-op on Triton ≥ 3.7 or when the interpreter module has another shape.
    Only the interpreter (``TRITON_INTERPRET=1``, CPU tensors) is touched; compiled kernels
    never see it.
    """
    global _INTERPRETER_PATCHED
    version = package_version("triton")
    if _INTERPRETER_PATCHED or version is None or version >= (3, 7):
        return
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    _INTERPRETER_PATCHED = True


@functools.lru_cache(maxsize=None)
def interpreter_computes_bf16_dot() -> bool:
    """Whether this Triton's interpreter multiplies bf16 tiles correctly, found by running one
    16×16 ``tl.dot`` on bf16 values and comparing it with torch (once per process; needs
    ``TRITON_INTERPRET=1``). False on 3.6 and 3.9."""
    import torch
    import triton
    import triton.language as tl

    patch_triton_interpreter()

    @triton.jit
    def _bf16_dot_probe(a_ptr, b_ptr, out_ptr):
        offs = tl.arange(0, 16)
        tile = offs[:, None] * 16 + offs[None, :]
        a = tl.load(a_ptr + tile)
        b = tl.load(b_ptr + tile)
        tl.store(out_ptr + tile, tl.dot(a, b))

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    b = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    out = torch.zeros(16, 16)
    _bf16_dot_probe[(1,)](a, b, out)
    want = a.float() @ b.float()
    return bool(torch.allclose(out, want, atol=1e-4, rtol=1e-4))


def cuobjdump_path() -> str | None:
    """The cuobjdump that Triton's NVIDIA backend bundles (None without one)."""
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def compile_for_target(kernel, signature: dict, constexprs: dict, *, arch: int,
                       num_warps: int, num_stages: int, maxnreg: int | None = None):
    """Compile ``kernel`` (a ``@triton.jit`` function) for ``sm_<arch>`` without a GPU.

    Args:
        kernel: the JIT function.
        signature: {argument name: Triton type string ("*fp16", "i32", "fp32", "constexpr")}.
        constexprs: {name: value} for the constexpr arguments.
        arch: compute capability as an int (80, 90, ...).
        num_warps, num_stages: launch options.
        maxnreg: optional register limit per thread (ptxas ``.maxnreg``), as the launch passes it.

    Returns:
        Triton's compiled kernel: ``.asm["cubin"]`` bytes, ``.metadata.shared`` bytes.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")     # Triton 3.9 warns when unset
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


# ---------------------------------------------------------------------------------------------
# transformers

def text_rotary_cos_sin(cos, sin, text_config):
    """The text decoder's (cos, sin) as [B, L, D], whatever layout this transformers passes.

    Args:
        cos, sin: [B, L, D] (already interleaved over the M-RoPE axes) or [3, B, L, D] (one slice
            per temporal/height/width axis, transformers ≤ 5.10).
        text_config: the text decoder config (its ``mrope_section`` says which channels come from
            which axis: ``rope_parameters`` or ``rope_scaling``).

    Returns:
        (cos, sin), each [B, L, D], in the input dtype.
    """
    if cos.dim() == 3:
        return cos, sin
    if cos.dim() != 4 or cos.shape[0] != 3:
        raise ValueError(f"cos: expected [B, L, D] or [3, B, L, D] position embeddings, got "
                         f"{tuple(cos.shape)}")
    section = _mrope_section(text_config)
    return _interleave_mrope(cos, section), _interleave_mrope(sin, section)


def _mrope_section(text_config) -> list[int]:
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(text_config, name, None)
        if isinstance(params, dict) and params.get("mrope_section"):
            return list(params["mrope_section"])
    raise ValueError("text_config: expected rope_parameters['mrope_section'] (or rope_scaling) "
                     "for [3, B, L, D] position embeddings")


def _interleave_mrope(x, section: list[int]):
    """Channel chunk i of the (doubled) section list comes from axis i % 3 (Qwen2-VL M-RoPE)."""
    import torch

    chunks = x.split(section * 2, dim=-1)
    return torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)


def enable_activation_checkpointing(model, *, use_reentrant: bool = False) -> None:
    """Turn on activation (gradient) checkpointing through whichever public method this
    transformers has."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
