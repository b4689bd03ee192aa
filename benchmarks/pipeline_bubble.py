"""Measured pipeline bubble of the 1F1B and interleaved 1F1B schedules against theory.

Each configuration runs P real gloo ranks through ``torch.distributed.pipelining`` with the
package's :class:`~picotron_lightning.parallel.pipeline_parallel.schedule.BubbleMeter` (the same meter behind
``strategy.pipeline_bubble``). A stage's compute is a fixed sleep (forward ``t``, backward ``2t``,
split evenly over the virtual stages of a rank), so the measurement shows the schedule's idle
time, not CPU contention between the ranks of a small machine. Prints one row per (schedule, P, M)
with the measured idle fraction (mean over ranks, first step excluded) and (P-1)/(v*M+P-1).

    python benchmarks/pipeline_bubble.py [--t-ms 20] [--steps 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


class _Sleep(torch.autograd.Function):
    """Identity whose forward takes ``t`` seconds and backward ``2t`` (a stage's fixed cost)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, t: float) -> torch.Tensor:  # noqa: ANN001
        ctx.t = t
        time.sleep(t)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        time.sleep(2 * ctx.t)
        return grad, None


class SleepStage(nn.Module):
    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x * self.w, self.t)


def _measure(rank: int, world: int, schedule: str, microbatches: int, virtual: int, t: float, steps: int) -> float:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    from picotron_lightning.parallel.pipeline_parallel import BubbleMeter, PipelineOptions, schedule_class, stage_ids
    from picotron_lightning.testing import init_gloo

    init_gloo(rank, world)
    options = PipelineOptions(schedule=schedule, num_microbatches=microbatches, virtual_stages=virtual)
    ids = stage_ids(rank, world, options)
    num_stages = world * options.stages_per_rank
    meter = BubbleMeter()
    stages = [PipelineStage(SleepStage(t / virtual), s, num_stages, torch.device("cpu")) for s in ids]
    for stage in stages:
        meter.instrument(stage)
    cls = schedule_class(schedule, training=True)
    loss_fn = meter.timed(lambda out, target: out.sum())
    sched = cls(stages if options.is_multi else stages[0], microbatches, loss_fn=loss_fn)
    x = torch.ones(microbatches, 8)
    bubbles = []
    for step in range(steps + 1):
        dist.barrier()
        meter.run(lambda: sched.step(x, target=x), record=step > 0)
        if step > 0:
            bubbles.append(meter.last)
    return sum(bubbles) / len(bubbles)


def main() -> None:
    from picotron_lightning.parallel.pipeline_parallel import theoretical_bubble
    from picotron_lightning.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t-ms", type=float, default=20.0, help="forward time of one stage per microbatch")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    t = args.t_ms / 1000
    print(f"{'schedule':<18}{'P':>3}{'M':>4}{'v':>3}{'measured':>10}{'theory':>9}")
    for schedule, virtual in (("1f1b", 1), ("interleaved_1f1b", 2)):
        for pp in (2, 4):
            for m in (4, 8, 16):
                per_rank = run_ranks(_measure, pp, schedule, m, virtual, t, args.steps, timeout=600)
                measured = sum(per_rank) / len(per_rank)
                theory = theoretical_bubble(pp, m, virtual)
                print(f"{schedule:<18}{pp:>3}{m:>4}{virtual:>3}{measured:>10.3f}{theory:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
