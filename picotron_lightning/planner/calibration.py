"""A CPU machine's measured cost of one transformer block per parallel style, and a step composed from it.

On CPU a small model's step is mostly host work the FLOP count cannot see: dispatch inside DTensor ops,
FSDP2's hooks and buffer copies, DDP's bucket hooks, collectives on processes that share cores. Instead of
pricing each of those from a per-op rate, ``block_probe.py`` runs the product's own ``parallelize`` on real
gloo ranks and times, per *style* (data-parallel size and mode, tensor-parallel size, activation
checkpointing; pp=1), the forward, the backward and the optimizer step of the model with two block counts
and two micro-batch sizes. That gives, per style, the seconds of one block and of everything outside the
blocks (embedding, head, loss), each as ``fixed + per_sample * samples``, with every collective of the style
and its checkpointing's recomputation inside.

:func:`compose_step` builds a candidate's step from those costs: the blocks the most loaded rank
holds, its microbatches (pipeline microbatches or accumulation micro-batches; FSDP2's gathers and
reductions once per step under a pipeline, per micro-batch under accumulation), recomputation under
the optimizer once per step, pipeline sends over the probed link, and the bubble, which
on a machine with more processes than cores is charged only where it exceeds the time the shared cores
need anyway (an idle stage gives its core to the busy ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from picotron_lightning.planner.search import Candidate

Style = tuple[int, int, str, str]
"""(data-parallel size, tensor-parallel size, data-parallel mode: "none", "ddp" or "fsdp", activation
checkpointing: "none", "selective" or "full") of one stage."""


def style_of(c: Candidate) -> Style | None:
    """The style a candidate's stages run in, or None where the probe has none (HSDP, expert parallelism)."""
    if c.ep > 1 or (c.dp > 1 and c.dp_mode not in ("ddp", "fsdp")):
        return None
    return (c.dp, c.tp, c.dp_mode if c.dp > 1 else "none", c.checkpointing)


@dataclass(frozen=True)
class Linear:
    """Seconds as ``fixed + per_sample * samples`` (fitted through two measured micro-batch sizes)."""

    fixed: float
    per_sample: float

    def at(self, samples: float) -> float:
        return self.fixed + self.per_sample * samples

    @staticmethod
    def through(samples: tuple[int, int], seconds: tuple[float, float]) -> Linear:
        """The line through two measurements; slope and intercept clipped at 0 (noise can tip either)."""
        (n1, n2), (t1, t2) = samples, seconds
        slope = max((t2 - t1) / (n2 - n1), 0.0)
        return Linear(max(t1 - slope * n1, 0.0), slope)


@dataclass(frozen=True)
class StyleCost:
    """One style's measured costs: a block's and the rest of the model's forward, backward and optimizer."""

    block_forward: Linear
    block_backward: Linear
    outer_forward: Linear
    outer_backward: Linear
    block_optimizer: float
    """Seconds of the optimizer step (and zero_grad) per block held."""
    outer_optimizer: float
    block_sync: float = 0.0
    """Seconds of a block's forward + backward that FSDP2 spends gathering and reducing (a pass at pp=1 minus
    a pass that keeps the block gathered and its gradients local): under a pipeline, paid once per step."""
    outer_sync: float = 0.0
    """The same for everything outside the blocks."""


@dataclass(frozen=True)
class BlockCalibration:
    """What ``block_probe.calibrate_cpu`` measured: per style, with ``processes`` processes busy at once."""

    processes: int
    seq_len: int
    styles: tuple[tuple[Style, StyleCost], ...]

    def cost(self, style: Style | None) -> StyleCost | None:
        return next((cost for s, cost in self.styles if s == style), None)


@dataclass(frozen=True)
class ComposedStep:
    """A candidate's step from measured block costs (seconds, most loaded rank)."""

    compute: float
    """Forward, backward and recomputation of every microbatch, collectives of the style included."""
    optimizer: float
    bubble: float


def compose_step(cost: StyleCost, c: Candidate, blocks: int, sharing: float) -> ComposedStep:
    """Compose one step of ``c`` from ``cost``.

    ``blocks``: blocks on the most loaded rank; ``sharing``: processes
    per core (>= 1) in the run being planned, so ``busy / sharing`` is the rank's work on a core of its own.
    Communication outside the style (pipeline sends) is the caller's.
    """
    n = c.micro_batch_size
    block = cost.block_forward.at(n) + cost.block_backward.at(n)  # recomputation is in the measured backward
    outer = cost.outer_forward.at(n) + cost.outer_backward.at(n)
    compute = c.num_microbatches * (blocks * block + outer)
    if c.pp > 1:
        # A pipeline stage gathers its FSDP2 units in the first microbatch and reduces their gradients in
        # the last; the style's passes were measured with both in every pass.
        compute -= (c.num_microbatches - 1) * (blocks * cost.block_sync + cost.outer_sync)
    optimizer = blocks * cost.block_optimizer + cost.outer_optimizer
    bubble = 0.0
    if c.pp > 1:
        busy = compute + optimizer
        alone = compute / sharing * (1 + (c.pp - 1) / (c.virtual_stages * c.num_microbatches)) + optimizer / sharing
        # With more processes than cores the busy ranks need the shared cores for `busy` anyway; the
        # schedule's idle slots only cost what the critical path exceeds that.
        bubble = max(alone - busy, 0.0)
    return ComposedStep(compute, optimizer, bubble)
