import pytest
import torch
import torch.distributed as dist

from picotron_lightning.testing import init_gloo, run_ranks

# Multi-process (real gloo ranks): the slow tier.
pytestmark = pytest.mark.slow


def _allreduce(rank: int, world_size: int) -> float:
    init_gloo(rank, world_size)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fails_on_rank_one(rank: int, world_size: int) -> None:
    init_gloo(rank, world_size)
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 would wait forever without the harness


def test_real_collective():
    assert run_ranks(_allreduce, 2) == [3.0, 3.0]


def test_failing_rank_brings_run_down_fast():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_ranks(_fails_on_rank_one, 2, timeout=60)
