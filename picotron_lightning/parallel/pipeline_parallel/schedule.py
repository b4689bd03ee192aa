"""Pipeline schedules: which ``torch.distributed.pipelining`` schedule, how many microbatches, the bubble.

Schedules (``pipeline_schedule=``):

* ``"gpipe"``: all forwards, then all backwards. Simple; holds every microbatch's activations.
* ``"1f1b"`` (default): one forward, one backward in steady state. Same bubble as GPipe,
  ``(P-1)/(M+P-1)``, with activations of at most ``P`` microbatches alive.
* ``"interleaved_1f1b"``: ``virtual_stages`` (default 2) model chunks per rank, so a rank is idle
  for a chunk's time instead of a stage's: bubble ``(P-1)/(v*M+P-1)``.
* ``"zero_bubble"``: interleaved schedule that splits backward into input- and weight-gradient
  parts and fills the bubble with weight-gradient work (ZB1P).
* ``"zbv"``: the zero-bubble V schedule, exactly two chunks per rank placed in a V
  (rank ``r`` holds stages ``r`` and ``2P-1-r``).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from picotron_lightning.parallel.pipeline_parallel.options import PipelineOptions
from picotron_lightning.topology import LayoutError

# A bubble above this share of the step gets a warning when the microbatch count was chosen for the user.
LARGE_BUBBLE = 0.25
# Microbatches per stage the default aims for: (P-1)/(4P+P-1) is about 20%.
TARGET_MICROBATCHES_PER_STAGE = 4


def stage_ids(pp_rank: int, pp: int, options: PipelineOptions) -> list[int]:
    """Global stage indices this pipeline rank holds (loop placement; V placement for ``zbv``)."""
    if options.schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(options.stages_per_rank)]


def theoretical_bubble(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle share of a step for (interleaved) 1F1B with equal forward/backward costs per stage."""
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


def valid_microbatches(schedule: str, m: int, pp: int) -> bool:
    """Whether ``schedule`` can run ``m`` microbatches over ``pp`` ranks."""
    if schedule == "1f1b":
        return m >= pp
    if schedule in ("interleaved_1f1b", "zero_bubble"):
        rounds = max(1, m // pp)
        return m % rounds == 0
    if schedule == "zbv":
        return m >= pp
    return True


def choose_microbatches(local_batch: int, pp: int, options: PipelineOptions, warn: bool = True) -> int:
    """Microbatches for a local batch: the explicit count, or the smallest divisor reaching the target.

    The default aims at ``4 x pp`` microbatches (bubble about 20% for 1F1B); a batch too small for
    that gets as many as it has samples, with a warning when the bubble stays large.
    """
    schedule = options.schedule
    explicit = options.num_microbatches
    if explicit is not None:
        if local_batch % explicit:
            raise LayoutError(
                f"num_microbatches={explicit} does not divide the local batch of {local_batch} samples; "
                f"use one of {[d for d in range(1, local_batch + 1) if local_batch % d == 0]}."
            )
        if not valid_microbatches(schedule, explicit, pp):
            raise LayoutError(_invalid_message(schedule, explicit, pp))
        return explicit
    divisors = [d for d in range(1, local_batch + 1) if local_batch % d == 0 and valid_microbatches(schedule, d, pp)]
    if not divisors:
        raise LayoutError(
            f"A local batch of {local_batch} samples cannot feed pipeline_schedule={schedule!r} over {pp} stages "
            f"(it needs at least {pp} microbatches of one sample or more). Use a batch size >= {pp} per "
            "data-parallel rank, or pipeline_schedule='gpipe'."
        )
    target = TARGET_MICROBATCHES_PER_STAGE * pp
    m = next((d for d in divisors if d >= target), divisors[-1])
    bubble = theoretical_bubble(pp, m, options.stages_per_rank)
    if warn and bubble > LARGE_BUBBLE:
        warnings.warn(
            f"Pipeline: {m} microbatches over {pp} stages leave ranks idle about {bubble:.0%} of each step "
            f"(theory (P-1)/(v*M+P-1)). A larger batch per data-parallel rank (>= {target}) or an explicit "
            "`num_microbatches` shrinks the bubble.",
            stacklevel=2,
        )
    return m


def _invalid_message(schedule: str, m: int, pp: int) -> str:
    if schedule in ("1f1b", "zbv"):
        return f"pipeline_schedule={schedule!r} needs num_microbatches >= pipeline_parallel_size={pp}, got {m}."
    rounds = max(1, m // pp)
    return (f"pipeline_schedule={schedule!r} needs num_microbatches to be a multiple of "
            f"max(1, num_microbatches // pipeline_parallel_size) = {rounds}; got {m}. Multiples of {pp} work.")


def schedule_class(name: str, training: bool) -> type:
    """The ``torch.distributed.pipelining`` class for a schedule name (forward-only runs use GPipe order)."""
    from torch.distributed.pipelining import (
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
        ScheduleZBVZeroBubble,
    )

    if not training and name in ("gpipe", "1f1b"):
        return ScheduleGPipe  # forward only: fill-and-drain is all there is
    return {
        "gpipe": ScheduleGPipe,
        "1f1b": Schedule1F1B,
        "interleaved_1f1b": ScheduleInterleaved1F1B,
        "zero_bubble": ScheduleInterleavedZeroBubble,
        "zbv": ScheduleZBVZeroBubble,
    }[name]


class BubbleMeter:
    """Idle share of one rank during a schedule step: 1 - (time in stage compute) / (step wall time).

    Compute is the time inside the stages' forward, backward and weight-gradient calls and the
    loss; everything else in the step (waiting on receives, posting sends) is the bubble.
    """

    _TIMED = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")

    def __init__(self) -> None:
        self.compute = 0.0
        self.last: float | None = None

    def instrument(self, stage: Any) -> None:
        """Wrap ``stage``'s compute methods (on the instance) so their time is counted."""
        for name in self._TIMED:
            original = getattr(stage, name)
            setattr(stage, name, self.timed(original))

    def timed(self, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.compute += time.perf_counter() - start

        return wrapper

    def run(self, fn: Any, record: bool = True) -> Any:
        """Run a whole schedule step and, if ``record``, keep its bubble fraction in :attr:`last`."""
        self.compute = 0.0
        start = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - start
        if record and wall > 0:
            self.last = max(0.0, 1.0 - self.compute / wall)
        return out
