"""memory/replay.py on its own: which ops count as collectives, and a trace and replay between two real ranks."""

from __future__ import annotations

import pytest
import torch

from picotron_lightning.memory.replay import CollectiveCall, TensorSpec, is_collective, replay_remaining
from picotron_lightning.testing import run_ranks


def test_collectives_are_told_from_waits_and_wrappers() -> None:
    ops = torch.ops
    assert is_collective(ops._c10d_functional.all_reduce.default)
    assert is_collective(ops.c10d.allreduce_.default)
    assert is_collective(ops.c10d.barrier.default)
    assert not is_collective(ops._c10d_functional.wait_tensor.default)
    assert not is_collective(ops.aten.mm.default)


def test_replay_refuses_a_trace_shorter_than_what_was_issued() -> None:
    call = CollectiveCall(torch.ops._c10d_functional.all_reduce.default,
                          (TensorSpec((2,), torch.float32, torch.device("cpu")), "sum", "0"), {}, "0")
    with pytest.raises(RuntimeError, match="issued 2 collectives on group '0'.*traced step has 1"):
        replay_remaining([call], {"0": 2})


def _step(x: torch.Tensor) -> torch.Tensor:
    """Three collectives of different kinds, the shapes following the input's."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    y = funcol.all_reduce(x, "sum", dist.group.WORLD)
    out = torch.empty(2 * y.numel())
    dist.all_gather_into_tensor(out, y.contiguous())
    dist.barrier()
    return out


def _fail_after_one(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from picotron_lightning.memory.replay import issued_collectives, trace_collectives
    from picotron_lightning.testing import init_gloo

    init_gloo(rank, world)
    x = torch.full((3,), float(rank + 1))
    if rank == 0:
        return {"out": _step(x).tolist()}
    before = issued_collectives()
    import torch.distributed._functional_collectives as funcol

    funcol.all_reduce(x, "sum", dist.group.WORLD).wait()  # the first collective, then "out of memory"
    issued = {g: n - before.get(g, 0) for g, n in issued_collectives().items()}
    calls = trace_collectives(lambda: _step(x))
    after_trace = issued_collectives()
    replayed = replay_remaining(calls, {g: n for g, n in issued.items() if n})
    return {"traced": [str(c.op) for c in calls], "replayed": replayed, "trace_sent": after_trace != {
        g: before.get(g, 0) + issued.get(g, 0) for g in after_trace}}


@pytest.mark.slow
def test_a_rank_that_stopped_after_one_collective_lets_its_peer_finish() -> None:
    peer, failed = run_ranks(_fail_after_one, 2, timeout=120)
    assert failed["traced"] == ["_c10d_functional.all_reduce.default", "c10d._allgather_base_.default",
                                "c10d.barrier.default"]
    assert failed["replayed"] == 2 and not failed["trace_sent"]  # the trace itself sent nothing
    # The peer finished: the all-reduce was real (1 + 2), the gathered half from the failed rank is its zeros.
    assert peer["out"] == [3.0, 3.0, 3.0, 0.0, 0.0, 0.0]


def _loss_parallel_collectives(rank: int, world: int) -> dict:
    """Cross-entropy on vocabulary-sharded logits (torch's loss_parallel): the all-reduces run inside the DTensor
    ops, one level below the op the trace's mode sees first."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    from picotron_lightning.memory.replay import issued_collectives, issued_since, trace_collectives

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    logits = distribute_tensor(torch.randn(6, 8), mesh, [Shard(1)])
    target = torch.randint(0, 8, (6,))
    with loss_parallel():
        traced = trace_collectives(lambda: F.cross_entropy(logits, target))
        before = issued_collectives()
        F.cross_entropy(logits, target)
        issued = issued_since(before)
    return {"traced": [(str(c.op), c.group) for c in traced], "issued": issued}


def test_a_trace_records_the_collectives_a_tensor_subclass_runs_inside_an_op() -> None:
    """Measured before the recorder declined subclass ops: loss parallelism's all-reduces were not in the trace, and a
    tp=2 rank that ran out of memory before its loss left its peer in the loss's all-reduce (a collective mismatch)."""
    for run in run_ranks(_loss_parallel_collectives, 2, timeout=120):
        traced_groups = [group for _, group in run["traced"]]
        assert run["traced"] and all("all_reduce" in op for op, _ in run["traced"]), run
        assert {g: traced_groups.count(g) for g in set(traced_groups)} == run["issued"], run
