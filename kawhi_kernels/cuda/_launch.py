"""Launch plumbing shared by the CUDA backend wrappers: the extension for a device, dtype codes,
raw pointers, strides and the current stream, all as plain Python integers for ``_C``."""
from __future__ import annotations

from types import ModuleType

import torch

from .._extension import cuda_backend_problem, load_extension

# q/k dtypes the kernels read (fp64 inputs are handled by the torch reference instead).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def device_index(device: torch.device) -> int:
    """Index of a CUDA device (``cuda`` without an index means the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def extension_for(device: torch.device, op: str) -> ModuleType:
    """The ``_C`` module when its CUDA kernels can run on ``device``; RuntimeError saying why not."""
    if device.type != "cuda":
        raise RuntimeError(f"{op}: the CUDA backend needs CUDA tensors, got tensors on {device}")
    problem = cuda_backend_problem(device_index(device))
    if problem is not None:
        raise RuntimeError(f"{op}: the CUDA backend cannot run: {problem}")
    return load_extension()


def dtype_code(ext: ModuleType, name: str, dtype: torch.dtype) -> int:
    """The ``_C`` dtype code of a q/k dtype; TypeError naming ``name`` for anything else."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: the CUDA kernels read float32, float16 or bfloat16, got {dtype}")
    return int(ext.DTYPE_CODES[str(dtype).replace("torch.", "")])


def int32_on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Contiguous int32 copy (or ``x`` itself) on ``device``."""
    return x.to(device=device, dtype=torch.int32).contiguous()


def stream_handle(device: torch.device) -> int:
    """cudaStream_t of torch's current stream on ``device``, as an integer."""
    return int(torch.cuda.current_stream(device).cuda_stream)


def ptr(x: torch.Tensor | None) -> int:
    """Device address of a tensor's first element (0 for None)."""
    return 0 if x is None else int(x.data_ptr())


def op_field_names(ext: ModuleType, op: str) -> tuple[str, ...]:
    """Field names of ``op``'s argument struct, read from the extension (csrc/op_fields.h)."""
    return tuple(row["name"] for row in ext.op_fields(op))


def make_args(ext: ModuleType, op: str, **values):
    """``op``'s argument struct (``ext.ARG_TYPES[op]``) with the given fields set by name.

    Fields not given keep their C++ initial values (0 pointers, -1 sizes, documented defaults);
    the launcher's validation rejects the ones a launch needs. A name that is not in the
    extension's field table is a TypeError (a wrapper out of step with csrc/op_fields.h).
    """
    names = op_field_names(ext, op)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise TypeError(f"{op}: {unknown} are not fields of {op}'s argument struct "
                        f"(csrc/op_fields.h lists {list(names)})")
    args = ext.ARG_TYPES[op]()
    for name, value in values.items():
        setattr(args, name, value)
    return args
