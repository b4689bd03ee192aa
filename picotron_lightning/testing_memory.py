"""Test tooling for memory: measure a real training step's live bytes (and, later, inject OOMs).

Not part of training: the tests and ``benchmarks/memory_estimate.py`` use :class:`PeakProbe` to
measure what :func:`picotron_lightning.memory.estimate.estimate_memory` predicts, on real ranks
started by Lightning (or by ``picotron_lightning.testing.run_ranks``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from picotron_lightning.memory.tracker import LiveBytes


class PeakProbe(Callback):
    """Measure the live tensor bytes of training step ``step`` (0-based batch index) on this rank.

    Counts what exists when the step starts (parameters, buffers, gradients, optimizer state, the
    batch) and every tensor an op creates until the step ends (forward, backward, optimizer step).
    ``peak`` and ``breakdown`` hold the result afterwards.
    """

    def __init__(self, step: int = 1) -> None:
        self.step = step
        self.peak: int | None = None
        self.breakdown: dict[str, int] | None = None
        self._tracker: LiveBytes | None = None

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx != self.step:
            return
        tracker = LiveBytes()
        params = list(pl_module.parameters())
        tracker.register([*params, *pl_module.buffers(), batch])
        tracker.register(p.grad for p in params if p.grad is not None)
        tracker.register(v for opt in trainer.optimizers for state in opt.state.values() for v in state.values())
        tracker.reset_peak()
        self._tracker = tracker
        tracker.__enter__()

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx != self.step or self._tracker is None:
            return
        tracker, self._tracker = self._tracker, None
        tracker.__exit__(None, None, None)
        self.peak = tracker.peak
        self.breakdown = tracker.breakdown(pl_module, trainer.optimizers).as_dict()
