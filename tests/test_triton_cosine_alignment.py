"""Triton ``cosine_alignment`` vs the torch reference (CPU interpreter without a GPU)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported anywhere below

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from triton_helpers import (
    COSINE_TOL,
    DEVICE,
    HAS_CUDA,
    coarse_regions,
    fresh_seed,
    patch_regions,
    random_qk,
)

from kawhi_kernels.ops.cosine_alignment import cosine_alignment
from kawhi_kernels.reference.cosine_alignment import cosine_alignment_reference
from kawhi_kernels.triton.cosine_alignment import cosine_alignment_triton

# An empty query sequence, a sequence without keys, long key runs over several tiles.
LENS_Q = [6, 0, 21, 4]
LENS_K = [11, 5, 70, 0]

# (hq, hk, d, dtype, R, regions, heads, per_head, block_k); rows per program min(block_k, 32)
CASES = [
    (4, 4, 64, torch.float32, 1, "coarse", None, False, 16),
    (8, 2, 80, torch.float16, 3, "coarse", [1, 6, 7], True, 64),
    (7, 1, 128, torch.float32, 5, "coarse", [0, 3], False, 32),
    (4, 1, 64, torch.float32, 100, "patch", None, True, 16),
    (8, 2, 64, torch.float16, 70, "patch", [7, 2], False, 32),
    (4, 1, 96, torch.bfloat16, 6, "coarse", None, True, 16),
    (8, 2, 64, torch.bfloat16, 70, "patch", [7, 2, 4], False, 32),
]


@pytest.mark.parametrize("hq,hk,d,dtype,num_regions,regions,heads,per_head,block_k", CASES)
def test_matches_reference(hq, hk, d, dtype, num_regions, regions, heads, per_head, block_k):
    seed = fresh_seed()
    q, k, cu_q, cu_k = random_qk(seed, LENS_Q, LENS_K, hq, hk, d, dtype)
    q[2, 0] = 0                                  # zero vectors have cosine 0
    k[1, 0] = 0
    make = coarse_regions if regions == "coarse" else patch_regions
    key_region = make(seed + 1, LENS_K, num_regions)
    heads = heads if heads is not None else list(range(hq))
    want = cosine_alignment_reference(q, k, cu_q, cu_k, key_region, num_regions, heads=heads,
                                      per_head=per_head)
    got = cosine_alignment_triton(q, k, cu_q, cu_k, key_region, num_regions, heads=heads,
                                  per_head=per_head, block_k=block_k, block_q=min(block_k, 32))
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **COSINE_TOL, msg=lambda m: f"seed {seed}: {m}")


def test_empty_regions_sequences_without_keys_and_selected_keys():
    q, k, cu_q, cu_k = random_qk(fresh_seed(), [3, 2], [4, 0], 2, 1, 64)
    key_region = torch.tensor([0, -1, 0, 2], dtype=torch.int32, device=DEVICE)
    got = cosine_alignment_triton(q, k, cu_q, cu_k, key_region, 3, heads=[0, 1], per_head=True)
    assert torch.all(got[:, :, 1] == 0)          # region 1 has no key
    assert torch.all(got[3:] == 0)               # sequence 1 has no keys
    # Region 2 holds one key: plain cosine; region 0 is the mean of two cosines.
    qn = torch.nn.functional.normalize(q[:3].float(), dim=-1)
    kn = torch.nn.functional.normalize(k[:, 0].float(), dim=-1)
    torch.testing.assert_close(got[:3, :, 2], qn @ kn[3], **COSINE_TOL)
    torch.testing.assert_close(got[:3, :, 0], (qn @ kn[0] + qn @ kn[2]) / 2, **COSINE_TOL)


def test_public_op_with_triton_backend_and_fp64_fallback():
    seed = fresh_seed()
    q, k, cu_q, cu_k = random_qk(seed, LENS_Q, LENS_K, 8, 2, 64)
    key_region = coarse_regions(seed, LENS_K, 2)
    got = cosine_alignment(q, k, cu_q, cu_k, key_region, 2, heads=[0, 5], backend="triton")
    want = cosine_alignment(q, k, cu_q, cu_k, key_region, 2, heads=[0, 5], backend="torch")
    torch.testing.assert_close(got, want, **COSINE_TOL, msg=lambda m: f"seed {seed}: {m}")
    q64, k64 = q.double(), k.double()
    got64 = cosine_alignment(q64, k64, cu_q, cu_k, key_region, 2, heads=[1], backend="triton")
    assert got64.dtype == torch.float64
    assert torch.equal(got64, cosine_alignment_reference(q64, k64, cu_q, cu_k, key_region, 2, heads=[1]))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_bf16_realistic_shapes():
    """Hq 28, Hk 4, D 128, bf16, 8 sequences of 4k keys (1k selected) and 2k rows."""
    seed = fresh_seed()
    lens_q, lens_k = [2048] * 8, [4096] * 8
    q, k, cu_q, cu_k = random_qk(seed, lens_q, lens_k, 28, 4, 128, torch.bfloat16)
    key_region = torch.full((sum(lens_k),), -1, dtype=torch.int32, device=DEVICE)
    for b in range(8):
        key_region[b * 4096 + 100:b * 4096 + 1124] = 0
    heads = [0, 1, 3, 22, 23, 24, 25, 26, 27]
    got = cosine_alignment_triton(q, k, cu_q, cu_k, key_region, 1, heads=heads)
    want = cosine_alignment_reference(q, k, cu_q, cu_k, key_region, 1, heads=heads)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")
