"""FSDP2 (``data_parallel_mode="fsdp"`` or ``"hsdp"``) for the traced stages (``pipeline_split="trace"``).

FSDP2 shards each stage at setup exactly as with the structural split (``fully_shard`` on the stage's
blocks and first/last modules, the ``StageModule`` as root), so the optimizer, gradient clipping and
checkpoints hold the sharded ``DTensor`` parameters from the start and the state dict is the
structural split's. The traced graphs are built later (first step of each input shape); what makes
them run under FSDP2:

* **They are traced over FSDP2's unsharded parameters.** Before the trace every unit is gathered
  (``FSDPModule.unshard()``), so the modules hold FSDP2's unsharded ``nn.Parameter`` objects, and the
  traced stage modules reference those objects. FSDP2 keeps one unsharded parameter per sharded one
  for the life of the module (resharding frees its storage; gathering refills the same storage), so a
  graph traced once sees every later gather, also for a second input shape. FSDP2's own hooks
  (forward and state-dict hooks, which would gather, reshard or swap the parameters inside the
  export) are set aside for the duration of the trace; other hooks stay.
* **The schedule runs the ``StageModule``, the FSDP2 root, which calls the traced graph.** Before the
  graph runs, the stage's units are gathered (the graph does not call the original modules, so their
  pre-forward hooks never fire); they stay gathered for the step. Autograd accumulates the gradients
  in the unsharded parameters, and ``torch.distributed.pipelining`` finishes the step as it does for
  any FSDP2 stage: its last backward reduce-scatters them into the sharded parameters' ``.grad`` and
  reshards. Evaluation steps (no backward) reshard after the schedule.

Only public FSDP2 calls are made here (``unshard``, ``reshard``); the gradient reduction is the one
``PipelineStage`` makes for the structural split.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from torch import nn
from torch.distributed.fsdp import FSDPModule

from picotron_lightning.parallel.pipeline_parallel.sharded_recovery import fsdp_hooks_set_aside
from picotron_lightning.parallel.pipeline_parallel.split import PipelineSplitError

if TYPE_CHECKING:
    from picotron_lightning.topology import ParallelLayout

SPLIT_BACKWARD_SCHEDULES = ("zero_bubble", "zbv")
"""Schedules whose weight gradients ``PipelineStage`` computes over its module's registered parameters."""


def check_traced_sharding(layout: ParallelLayout, data_parallel_mode: str, schedule: str) -> None:
    """Refuse FSDP2 x tensor parallelism with a split-backward schedule under the traced split; no collective.

    Under FSDP2 the schedule runs the stage module (the FSDP2 root), whose registered parameters are
    FSDP2's; with tensor parallelism the traced graph computes with the twins' parameters instead, so a
    schedule that takes the weight gradients over the stage module's parameters would miss them (measured
    without this check, pp=2 x dp=2 x tp=2 ``zbv``: no gradient for the sharded linears, step 2 3.2e-04 off).
    """
    if layout.dp > 1 and layout.tp > 1 and data_parallel_mode in ("fsdp", "hsdp") \
            and schedule in SPLIT_BACKWARD_SCHEDULES:
        raise PipelineSplitError(
            f"pipeline_split='trace' with data_parallel_mode={data_parallel_mode!r} and tensor_parallel_size="
            f"{layout.tp} does not support pipeline_schedule={schedule!r} (its weight gradients are taken over the "
            "stage module's parameters, which are not the ones the traced tensor-parallel linears use). Use "
            "pipeline_schedule='1f1b', 'gpipe' or 'interleaved_1f1b', data_parallel_mode='ddp', or "
            'pipeline_split="structural".'
        )


class TracedFullyShard:
    """The FSDP2 units of this rank's traced stages: gathered for the trace and for each step, resharded after."""

    def __init__(self, units: list[nn.Module]) -> None:
        self.units = [u for u in units if isinstance(u, FSDPModule)]

    def gather(self) -> None:
        """All-gather every unit's parameters (a no-op for a unit already gathered)."""
        for unit in self.units:
            unit.unshard()

    def reshard(self) -> None:
        """Free the gathered parameters; the modules hold the sharded ones again."""
        for unit in self.units:
            unit.reshard()

    @contextmanager
    def for_trace(self) -> Iterator[None]:
        """The units gathered and FSDP2's hooks set aside: a trace inside references the unsharded parameters."""
        self.gather()
        try:
            with fsdp_hooks_set_aside(self.units):
                yield
        finally:
            self.reshard()
