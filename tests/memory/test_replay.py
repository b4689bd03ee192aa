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
