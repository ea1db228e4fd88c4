"""Head-sharded reduction under a real 2-process torch.distributed group (gloo, CPU)."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kawhi_kernels.integrations.distributed import (
    allreduce_head_partial_sums,
    local_head_range,
)
from kawhi_kernels.integrations.verl import kawhi_alpha_packed

HEADS = [0, 1, 3]          # rank 0 holds heads {0, 1} (2 selected), rank 1 holds {2, 3} (1 selected)


def _inputs():
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 9, 16], dtype=torch.int32)
    q = torch.randn(16, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(16, 2, 8, generator=g, dtype=torch.float64)
    key_mask = torch.zeros(16, dtype=torch.bool)
    key_mask[[1, 2, 3, 10, 11]] = True
    query_mask = torch.zeros(16, dtype=torch.bool)
    query_mask[[6, 7, 8, 13, 14, 15]] = True
    return q, k, cu, key_mask, query_mask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        q, k, cu, key_mask, query_mask = _inputs()
        start, stop = local_head_range(q.shape[1], group)
        kv_per_rank = k.shape[1] // world
        # after the Ulysses all-to-all: all tokens, this rank's contiguous slice of heads
        alpha = kawhi_alpha_packed(q[:, start:stop].contiguous(), k[:, rank * kv_per_rank:(rank + 1) * kv_per_rank],
                                   cu, key_mask, query_mask, heads=HEADS, head_offset=start, group=group)
        # per-entry counts: rank r contributes r + 1 to every entry, values 10·(r + 1)
        mean = allreduce_head_partial_sums(torch.full((3,), 10.0 * (rank + 1)), torch.full((3,), rank + 1.0), group)
        torch.save({"alpha": alpha, "mean": mean, "range": (start, stop)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_head_sharded_alpha_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["range"] for r in results] == [(0, 2), (2, 4)]
    q, k, cu, key_mask, query_mask = _inputs()
    single = kawhi_alpha_packed(q, k, cu, key_mask, query_mask, heads=HEADS)
    for r in results:
        torch.testing.assert_close(r["alpha"].double(), single.double(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["mean"], torch.full((3,), 10.0))   # (10 + 20) / (1 + 2)
    # a mean of per-rank means would differ (2 vs 1 selected heads): the test can tell them apart
    rank_means = [kawhi_alpha_packed(q[:, s:e].contiguous(), k[:, i:i + 1], cu, key_mask, query_mask, heads=HEADS,
                                     head_offset=s, num_heads=4) for i, (s, e) in enumerate([(0, 2), (2, 4)])]
    assert not torch.allclose((rank_means[0] + rank_means[1]) / 2, single, atol=1e-4)


def test_single_process_reduction_and_argument_errors():
    mean = allreduce_head_partial_sums(torch.tensor([3.0, 0.0]), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(mean, torch.tensor([1.5, 0.0]))
    assert local_head_range(28) == (0, 28)
    with pytest.raises(ValueError, match="partial_count"):
        allreduce_head_partial_sums(torch.ones(3), torch.ones(2))
    with pytest.raises(TypeError, match="partial_count"):
        allreduce_head_partial_sums(torch.ones(3), "2")
    with pytest.raises(TypeError, match="partial_sum"):
        allreduce_head_partial_sums(torch.ones(3, dtype=torch.int64), 1)
