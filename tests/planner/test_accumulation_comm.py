"""Gradient accumulation without pp: predicted data-parallel bytes equal the counted ones on real gloo ranks.

The step is what the strategy runs under ``Trainer(accumulate_grad_batches=M)``: M forward-backward passes
with gradient sync off (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)``) until the last,
then one optimizer step. The third such step is counted with :class:`CommCounter`.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from picotron_lightning.models import CausalLMModule
from picotron_lightning.options import Picotron3DOptions
from picotron_lightning.parallel.data import DataParallelOptions
from picotron_lightning.planner import build_on_meta, describe_model
from picotron_lightning.planner.comm_model import bytes_per_dim, collectives
from picotron_lightning.planner.search import Candidate
from picotron_lightning.testing import run_ranks
from picotron_lightning.topology import ParallelLayout

pytestmark = pytest.mark.slow

SEQ, BATCH, MICRO = 16, 4, 2


def count_accumulated_step(rank: int, world: int, build: Any, layout: Any, options: Any, batch: torch.Tensor,
                           micro_batches: int) -> dict[str, Any]:
    """Parallelize, run two accumulated steps, count the third one's collectives per mesh dimension."""
    import warnings
    from contextlib import contextmanager, nullcontext

    import torch.distributed as dist
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.nn.parallel import DistributedDataParallel

    from picotron_lightning.parallel.data import set_gradient_sync
    from picotron_lightning.parallel.parallelize import parallelize
    from picotron_lightning.planner.comm_count import CommCounter, mesh_groups

    warnings.simplefilter("ignore")
    mesh = layout.build_device_mesh("cpu")
    module = build()
    parallel = parallelize(module, mesh, layout, options, torch.device("cpu"), world)
    optimizer = torch.optim.AdamW(module.parameters())
    redirect = _ForwardRedirection()

    @contextmanager
    def no_sync():  # noqa: ANN202 - as the strategy's block_backward_sync
        if isinstance(parallel.module, DistributedDataParallel):
            with parallel.module.no_sync():
                yield
            return
        set_gradient_sync(parallel.module, False)
        try:
            yield
        finally:
            set_gradient_sync(parallel.module, True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for i, piece in enumerate(batch.chunk(micro_batches)):
            with no_sync() if i < micro_batches - 1 else nullcontext():
                out = redirect(parallel.module, module, "training_step", piece, 0)  # type: ignore[arg-type]
                loss = out["loss"] if isinstance(out, dict) else out
                (loss / micro_batches).backward()
        optimizer.step()

    step()
    step()
    counter = CommCounter(mesh_groups(mesh, layout))
    with counter:
        step()
    dist.barrier()
    return {"bytes": counter.bytes, "calls": counter.calls, "unknown": counter.unknown}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_accumulated_step_bytes_equal_prediction(mode: str) -> None:
    layout = ParallelLayout(2, 1, 1, 1).resolve(2)
    options = Picotron3DOptions(layout=layout, data_parallel=DataParallelOptions(mode=mode))
    build = functools.partial(CausalLMModule, "tiny", {"num_layers": 2})
    spec = describe_model(build_on_meta(build), SEQ)
    counted = run_ranks(count_accumulated_step, 2, build, layout, options, torch.randint(0, 256, (BATCH, SEQ + 1)),
                        MICRO, timeout=600)
    c = Candidate(2, 1, 1, 1, mode, "none", "1f1b", 1, MICRO, BATCH // MICRO, 2 if mode == "fsdp" else 1)
    predicted = bytes_per_dim(collectives(spec, c))
    single = bytes_per_dim(collectives(spec, Candidate(2, 1, 1, 1, mode, "none", "1f1b", 1, 1, BATCH,
                                                       2 if mode == "fsdp" else 1)))
    for result in counted:
        assert not result["unknown"], result["unknown"]
        assert result["bytes"] == predicted, (result["bytes"], result["calls"], predicted)
    if mode == "fsdp":  # the gathers really repeat per micro-batch; the reduce-scatter does not
        assert predicted["dp"]["all_gather"] == MICRO * single["dp"]["all_gather"]
        assert predicted["dp"]["reduce_scatter"] == single["dp"]["reduce_scatter"]
