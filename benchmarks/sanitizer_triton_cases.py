"""Small cases for every Triton kernel of kawhi_kernels, each checked against the torch reference;
meant to run under NVIDIA compute-sanitizer (memcheck, racecheck) from benchmarks/run_gpu.sh:

    compute-sanitizer --tool memcheck --error-exitcode 99 python benchmarks/sanitizer_triton_cases.py

Kernels: attention_mass (per row; segments atomic and deterministic; given lse), cosine_alignment
(mean and per head), grid_pyramid, SGUF patch descriptors. Awkward sizes on purpose: GQA 7:1,
D 80, rows that see no key, a sequence without keys, an image smaller than the Gaussian halo.
Exit status 1 on any mismatch (a clean but wrong run fails too), 2 without CUDA.
``--device cpu`` (with TRITON_INTERPRET=1, fp32 only) dry-runs the same cases without a GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kawhi_kernels import attention_mass, cosine_alignment, grid_pyramid  # noqa: E402
from kawhi_kernels.ops.patch_descriptors import patch_descriptors_on_backend  # noqa: E402


def main(argv: list[str]) -> int:
    cpu = argv[1:] == ["--device", "cpu"]
    if not cpu and not torch.cuda.is_available():
        print("sanitizer_triton_cases: needs CUDA (or --device cpu with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if cpu else "cuda")
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    g = torch.Generator().manual_seed(0)
    failures = []

    def close(name, got, want, atol=2e-5, rtol=2e-4):
        sync()
        ok = got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol)
        print(("ok " if ok else "MISMATCH ") + name, flush=True)
        if not ok:
            failures.append(name)

    cu_q = torch.tensor([0, 6, 6, 15, 19], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, 3, 8, 20, 20], dtype=torch.int32, device=dev)
    region = torch.randint(-1, 4, (20,), generator=g, dtype=torch.int32).to(dev)
    seg = torch.tensor([0, 0, 1, 1, -1, 2, 0, 0, 0, 1, 1, 1, 2, -1, 2, 3, 3, 3, 3],
                       dtype=torch.int32, device=dev)
    for dtype in (torch.float32,) if cpu else (torch.float32, torch.bfloat16):
        for hq, hk, d in ((8, 2, 64), (7, 1, 80)):
            q = torch.randn(19, hq, d, generator=g).to(dev, dtype)
            k = torch.randn(20, hk, d, generator=g).to(dev, dtype)
            tag = f"{str(dtype)[6:]} hq={hq} hk={hk} d={d}"
            tol = {} if dtype == torch.float32 else dict(atol=4e-3, rtol=3e-2)
            args = (cu_q, cu_k, region, 4)
            want = attention_mass(q.double(), k.double(), *args, backend="torch")
            close(f"attention_mass rows {tag}", attention_mass(q, k, *args, backend="triton"), want, **tol)
            want_s = attention_mass(q.double(), k.double(), *args, query_segment=seg, num_segments=5,
                                    backend="torch")
            for det in (False, True):
                got = attention_mass(q, k, *args, query_segment=seg, num_segments=5, deterministic=det,
                                     backend="triton")
                close(f"attention_mass segments det={det} {tag}", got, want_s, **tol)
            lse = torch.zeros(hq, 19, device=dev)
            want = attention_mass(q.double(), k.double(), *args, lse=lse, causal=False, backend="torch")
            got = attention_mass(q, k, *args, lse=lse, causal=False, backend="triton")
            close(f"attention_mass lse {tag}", got, want, **(tol or dict(atol=2e-5, rtol=1e-3)))
            for per_head in (False, True):
                want = cosine_alignment(q.double(), k.double(), *args, per_head=per_head, backend="torch")
                got = cosine_alignment(q, k, *args, per_head=per_head, backend="triton")
                close(f"cosine_alignment per_head={per_head} {tag}", got, want,
                      **({} if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)))
    grids = torch.tensor([[1, 5, 7], [2, 3, 4]])
    mass = torch.rand(3, 5 * 7 + 2 * 3 * 4, generator=g).to(dev)
    for got, want in zip(grid_pyramid(mass, grids, 3, backend="triton"), grid_pyramid(mass.double(), grids, 3, backend="torch")):
        close("grid_pyramid", got, want, atol=1e-5, rtol=1e-5)
    for shape, grid in (((56, 84), (2, 3)), ((3, 6), (1, 2))):
        img = torch.randint(0, 256, (2, *shape, 3), generator=g, dtype=torch.uint8).to(dev)
        want = patch_descriptors_on_backend(img, grid, sigma=1.0, dtype=torch.float32, backend="torch")
        got = patch_descriptors_on_backend(img, grid, sigma=1.0, dtype=torch.float32, backend="triton")
        scale = float(want[0].max()) + 100.0
        for name, a, b in zip(("lam_max", "lam_min", "lightness"), got, want):
            close(f"sguf {name} {shape}", a, b, atol=2e-5 * scale, rtol=1e-4)
    sync()
    print(f"{len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
