"""Python garbage collection under control: off during training, one collection every n steps.

An automatic collection starts whenever allocations pass a threshold, at a different moment on each
rank; the rank that collects arrives late at the next collective and every other rank waits for it.
Turning automatic collection off and collecting at the same step on every rank (the step counter is
the same everywhere) keeps that pause out of the collectives. ``gc.freeze()`` after setup moves the
model, optimizer and everything else alive then into a generation collections never scan again.
"""

from __future__ import annotations

import gc
import time


def is_collection_step(step: int, every_n_steps: int | None) -> bool:
    """Whether the step that just finished (``step`` >= 1 counts finished optimizer steps) collects."""
    return every_n_steps is not None and step > 0 and step % every_n_steps == 0


class GarbageCollection:
    """Owns ``gc``'s state for a run: :meth:`start` after setup, :meth:`step` after each step, :meth:`stop`."""

    def __init__(self, every_n_steps: int | None, freeze: bool = True, generation: int = 1) -> None:
        self.every_n_steps = every_n_steps
        self.freeze = freeze
        self.generation = generation
        self.collections = 0
        self.pause_s = 0.0  # time spent in scheduled collections
        self._was_enabled: bool | None = None

    @property
    def active(self) -> bool:
        return self._was_enabled is not None

    def start(self) -> None:
        """Collect once, freeze what is alive (the model and optimizer), turn automatic collection off."""
        if self.every_n_steps is None or self.active:
            return
        self._was_enabled = gc.isenabled()
        gc.collect()
        if self.freeze:
            gc.freeze()
        gc.disable()

    def step(self, step: int) -> bool:
        """Collect if ``step`` is a collection step; returns whether it collected."""
        if not self.active or not is_collection_step(step, self.every_n_steps):
            return False
        begin = time.perf_counter()
        gc.collect(self.generation)
        self.pause_s += time.perf_counter() - begin
        self.collections += 1
        return True

    def stop(self) -> None:
        """Give ``gc`` back as it was (unfrozen, automatic collection as before)."""
        if not self.active:
            return
        if self.freeze:
            gc.unfreeze()
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None
