"""Host-side cost of the Triton attention_mass / cosine_alignment launch path, per call, on CPU.

The kernels are replaced by no-op launchers, so what is timed is exactly the host work around
them: building the plan (validation, the one device→host transfer, tables) and running it
(input checks, output allocation, launch arguments). It compares

* ``plan + run`` every call — what the functional ops do (one layer per call), and
* ``run`` only — one plan per batch, reused by every layer (capture, head profile).

Layout (DESIGN §7 headline): 8 sequences × (4096 keys, 2048 response rows, 1024 image tokens),
16k rows, 32k keys, Hq 28 / Hk 4, D 128, bf16; per-patch regions (R = 1024) with one segment per
response, and one region (KAWHI's selected keys) for cosine_alignment.

    python benchmarks/host_overhead.py [--repeat 50]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _kernels_stubbed():
    from kawhi_kernels.triton import attention_mass as am
    from kawhi_kernels.triton import cosine_alignment as ca

    stubs = [(am, name) for name in am.LAUNCHED_KERNELS]
    stubs += [(ca, "_region_mean_keys_kernel"), (ca, "_alignment_kernel")]
    saved = [getattr(module, name) for module, name in stubs]
    for module, name in stubs:
        setattr(module, name, _NoLaunch())
    try:
        yield
    finally:
        for (module, name), kernel in zip(stubs, saved):
            setattr(module, name, kernel)


def _layout(num_seqs=8, keys=4096, rows=2048, image=1024, hq=28, hk=4, d=128):
    cu_k = torch.arange(num_seqs + 1, dtype=torch.int32) * keys
    cu_q = torch.arange(num_seqs + 1, dtype=torch.int32) * rows
    region = torch.full((num_seqs * keys,), -1, dtype=torch.int32)
    for s in range(num_seqs):
        region[s * keys + 16:s * keys + 16 + image] = torch.arange(image, dtype=torch.int32)
    segment = torch.repeat_interleave(torch.arange(num_seqs, dtype=torch.int32), rows)
    q = torch.empty(num_seqs * rows, hq, d, dtype=torch.bfloat16)
    k = torch.empty(num_seqs * keys, hk, d, dtype=torch.bfloat16)
    return q, k, cu_q, cu_k, region, segment


class _HostWork(TorchDispatchMode):
    """Counts, for one call, what would cost on a GPU: host syncs (a value read on the host —
    item/int/bool, nonzero, boolean-mask indexing, a copy to the host) and device launches
    (every aten op that is not a view, metadata or allocation; plus the Triton launches,
    counted by the stub)."""

    NOT_LAUNCHES = {"aten.empty", "aten.empty_strided", "aten.view", "aten._unsafe_view",
                    "aten.reshape", "aten.as_strided", "aten.detach", "aten.t", "aten.transpose",
                    "aten.unsqueeze", "aten.squeeze", "aten.expand", "aten.slice", "aten.select",
                    "aten.alias", "aten.lift_fresh", "aten.permute", "aten.split",
                    "aten.unbind", "aten.sym_size", "aten.sym_stride", "aten.sym_numel",
                    "aten.new_empty", "aten.empty_like", "aten.set_", "aten.is_nonzero"}
    SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero"}

    def __init__(self):
        super().__init__()
        self.syncs = 0
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        host_copy = name == "aten._to_copy" and str(kwargs.get("device", "")) == "cpu"
        bool_index = name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
        if name in self.SYNCS or host_copy or bool_index:
            self.syncs += 1
        if name not in self.NOT_LAUNCHES and not host_copy:
            self.launches += 1
        return func(*args, **kwargs)


def _count(fn) -> tuple[int, int]:
    """(host syncs, device launches) of one call of ``fn``; tensors are CPU tensors that stand
    for device tensors, so every ``.cpu()``/``.tolist()`` is counted as a sync too."""
    counted = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist", "item", "__int__", "__bool__")}

    def counting(name):
        def call(self, *args, **kwargs):
            counted["n"] += 1
            return originals[name](self, *args, **kwargs)
        return call

    launches = {"n": 0}

    class CountingLaunch:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches["n"] += 1
            return launch

    from kawhi_kernels.triton import attention_mass as am
    from kawhi_kernels.triton import cosine_alignment as ca
    stubs = [(am, name) for name in am.LAUNCHED_KERNELS]
    stubs += [(ca, "_region_mean_keys_kernel"), (ca, "_alignment_kernel")]
    saved = [getattr(module, name) for module, name in stubs]
    for module, name in stubs:
        setattr(module, name, CountingLaunch())
    for name in originals:
        setattr(torch.Tensor, name, counting(name))
    try:
        with _HostWork() as mode:
            fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for (module, name), kernel in zip(stubs, saved):
            setattr(module, name, kernel)
    return mode.syncs + counted["n"], mode.launches + launches["n"]


def _time(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args(argv)
    q, k, cu_q, cu_k, region, segment = _layout()
    num_segments = cu_q.numel() - 1
    kawhi_region = torch.where(region >= 0, torch.zeros_like(region), region)
    heads = [0, 1, 3, 22, 23, 24, 25, 26, 27]
    # Syncs and launches of run() only: its tensors are all "device" tensors, so the counts are
    # exact. Plan building works on host copies by design, which a CPU stand-in cannot tell
    # from device tensors, so it is not counted here (tests/test_plan.py checks its single
    # device→host transfer).
    print("| call | host syncs | device launches |")
    print("|---|---|---|")
    try:
        from kawhi_kernels.triton.attention_mass import plan_attention_mass_triton, run_attention_mass_triton
        from kawhi_kernels.triton.cosine_alignment import (
            plan_cosine_alignment_triton,
            run_cosine_alignment_triton,
        )
    except ImportError:                       # a tree from before the plan/run split
        return

    def mass_plan():
        # What AttentionMassPlan does after its one batched host copy (cu_seqlens, segments).
        return plan_attention_mass_triton(
            cu_q.long(), cu_k.long(), region, 1024, dtype=q.dtype, num_heads=28, num_kv_heads=4,
            head_dim=128, query_segment_host=segment.long(), num_segments=num_segments,
            heads=[0, 1, 3, 22, 23, 24, 25, 26, 27])

    def cosine_plan():
        return plan_cosine_alignment_triton(cu_q.long(), cu_k.long(), kawhi_region, 1,
                                            num_heads=28, num_kv_heads=4, head_dim=128,
                                            heads=[0, 1, 3, 22, 23, 24, 25, 26, 27])

    with _kernels_stubbed():
        planned_mass, planned_cosine = mass_plan(), cosine_plan()
    det_plan = plan_attention_mass_triton(
        cu_q.long(), cu_k.long(), region, 1024, dtype=q.dtype, num_heads=28, num_kv_heads=4,
        head_dim=128, query_segment_host=segment.long(), num_segments=num_segments, heads=heads,
        deterministic=True)
    for name, plan, run in (("attention_mass", planned_mass, run_attention_mass_triton),
                            ("attention_mass deterministic", det_plan, run_attention_mass_triton),
                            ("cosine_alignment", planned_cosine, run_cosine_alignment_triton)):
        print("| %s, run() of a plan | %d | %d |" % (name, *_count(lambda: run(plan, q, k))))
    print()
    with _kernels_stubbed():
        rows = [
            ("attention_mass", "plan + run per call", _time(lambda: run_attention_mass_triton(mass_plan(), q, k), args.repeat)),
            ("attention_mass", "run (plan reused)", _time(lambda: run_attention_mass_triton(planned_mass, q, k), args.repeat)),
            ("cosine_alignment", "plan + run per call", _time(lambda: run_cosine_alignment_triton(cosine_plan(), q, k), args.repeat)),
            ("cosine_alignment", "run (plan reused)", _time(lambda: run_cosine_alignment_triton(planned_cosine, q, k), args.repeat)),
        ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, kernels stubbed out")
    print("| op | path | host µs per call |")
    print("|---|---|---|")
    for op, path, us in rows:
        print(f"| {op} | {path} | {us:.0f} |")


if __name__ == "__main__":
    main()
