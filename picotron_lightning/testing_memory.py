"""Test tooling for memory: measure a real training step's live bytes, and inject out-of-memory errors.

Not part of training. The tests and ``benchmarks/memory_estimate.py`` use :class:`PeakProbe` to
measure what :func:`picotron_lightning.memory.estimate.estimate_memory` predicts, on real ranks
started by Lightning (or by ``picotron_lightning.testing.run_ranks``). :class:`InjectOOM` makes a
real run raise ``torch.OutOfMemoryError`` deterministically, on CPU, to test OOM recovery
(``memory.oom_recovery``): at scripted places (:class:`OOMAt`: rank, step, forward or backward,
k-th op) and/or past a budget of live bytes created in the step (:class:`BudgetOOM`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from typing_extensions import override

from picotron_lightning.memory.oom import inside_attempt
from picotron_lightning.memory.replay import tracing_collectives
from picotron_lightning.memory.tracker import LiveBytes
from picotron_lightning.parallel.pipeline_parallel.recovery import outside_stage_compute


class PeakProbe(Callback):
    """Measure the live tensor bytes of training steps ``steps`` (0-based batch indices) on this rank.

    Counts what exists when a step starts (parameters, buffers, gradients, optimizer state, the
    batch) and every tensor an op creates until the step ends (forward, backward, optimizer step).
    ``peaks`` holds each measured step's peak afterwards; ``peak`` the smallest of them and
    ``breakdown`` that step's split by kind.

    Why the smallest: a storage counts until its last reference goes, and gloo's worker thread drops
    its reference to a finished collective's buffers a moment after the step's thread waited for it.
    On a busy machine that moment can come after the step's next peak and add the buffer to it
    (measured on 2 FSDP2 ranks: flat 131328- and 197120-byte buffers that FSDP2 splits for its
    collectives released on gloo's threads, and one CI run's rank 0 peak 0.188 MiB over the estimate its
    rank 1 matched: 197120 bytes, to the printed rounding). The delay only ever adds bytes,
    and steady-state steps of the same shapes have the same peak, so several steps' minimum is the
    step's peak unless every one of them was delayed.
    """

    def __init__(self, steps: int | Sequence[int] = 1) -> None:
        self.steps = (steps,) if isinstance(steps, int) else tuple(steps)
        if not self.steps:
            raise ValueError("PeakProbe(steps=...) needs at least one batch index to measure")
        self.peaks: dict[int, int] = {}
        self._breakdowns: dict[int, dict[str, int]] = {}
        self._tracker: LiveBytes | None = None

    @property
    def peak(self) -> int | None:
        """The smallest measured step's peak (None until a measured step ended)."""
        return min(self.peaks.values()) if self.peaks else None

    @property
    def breakdown(self) -> dict[str, int] | None:
        """The split by kind of the step whose peak is :attr:`peak`."""
        if not self.peaks:
            return None
        return self._breakdowns[min(self.peaks, key=lambda batch_idx: self.peaks[batch_idx])]

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx not in self.steps:
            return
        tracker = LiveBytes()
        tracker.start_step(pl_module, trainer.optimizers, batch)
        self._tracker = tracker
        tracker.__enter__()

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx not in self.steps or self._tracker is None:
            return
        tracker, self._tracker = self._tracker, None
        tracker.__exit__(None, None, None)
        self.peaks[batch_idx] = tracker.peak
        self._breakdowns[batch_idx] = tracker.breakdown(pl_module, trainer.optimizers).as_dict()


# ---------------------------------------------------------------------------- OOM injection (test tooling)
Phase = Literal["forward", "backward"]


def current_phase() -> Phase:
    """``"backward"`` while autograd's engine runs a backward pass on this thread, else ``"forward"``."""
    return "backward" if torch._C._current_graph_task_id() >= 0 else "forward"


@dataclass(frozen=True)
class OOMAt:
    """Raise ``torch.OutOfMemoryError`` on ``rank`` in optimizer step ``step`` (``trainer.global_step`` when the
    batch starts), at the ``op``-th dispatched op (0-based) of ``phase``, in each of the step's first ``attempts``
    attempts (an OOM-recovered step is attempted again; ``attempts`` > 1 makes the retries fail too)."""

    rank: int
    step: int
    phase: Phase = "forward"
    op: int = 0
    attempts: int = 1


def allocates_nothing(func: Any, args: tuple, kwargs: dict | None) -> bool:
    """Whether the injectors leave ``func`` alone: ops on fake or meta tensors (a step traced for OOM recovery, a
    pipeline stage's shape inference) and profiler ops (the optimizer's ``record_function``) allocate nothing; under
    pipeline parallelism only a stage's compute is covered by recovery, not the schedule's few-byte handshakes."""
    from torch._subclasses.fake_tensor import FakeTensor

    if tracing_collectives() or str(func).startswith("profiler.") or outside_stage_compute():
        return True
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return True
    tensors = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
    return any(isinstance(t, FakeTensor) or t.is_meta for t in tensors)


class ScriptedOOM(TorchDispatchMode):
    """Counts ops by phase within one attempt and raises at the scripted ones; ``fired`` lists what it raised."""

    def __init__(self, plan: list[OOMAt], attempt_of: Any = lambda: 0) -> None:
        super().__init__()
        self.plan = plan
        self.attempt_of = attempt_of  # () -> the current attempt's number within the step
        self.armed = True
        self.covered: Any = lambda: True  # () -> whether ops now may fail (InjectOOM: inside a recovered attempt)
        self.fired: list[tuple[int, str, int, int]] = []  # (step, phase, op, attempt)
        self._attempt = -1
        self._counts = {"forward": 0, "backward": 0}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.armed and self.covered() and not allocates_nothing(func, args, kwargs):
            attempt = self.attempt_of()
            if attempt != self._attempt:  # a new attempt counts its ops from 0
                self._attempt, self._counts = attempt, {"forward": 0, "backward": 0}
            phase = current_phase()
            index = self._counts[phase]
            self._counts[phase] += 1
            for entry in self.plan:
                if entry.phase == phase and entry.op == index and attempt < entry.attempts:
                    self.fired.append((entry.step, phase, index, attempt))
                    raise torch.OutOfMemoryError(
                        f"injected OOM: rank {entry.rank} step {entry.step} {phase} op {index} attempt {attempt} "
                        f"({func})")
        return func(*args, **(kwargs or {}))


class BudgetOOM(LiveBytes):
    """:class:`LiveBytes` that raises ``torch.OutOfMemoryError`` when the bytes created in the step pass ``budget``."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget
        self.armed = True
        self.covered: Any = lambda: True  # as ScriptedOOM.covered
        self.fired = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if allocates_nothing(func, args, kwargs):
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _on_allocate(self, nbytes: int) -> None:
        if self.armed and self.covered() and self.current + nbytes > self.budget:
            self.fired += 1
            raise torch.OutOfMemoryError(
                f"injected OOM: {self.current + nbytes} live bytes would pass the budget of {self.budget}")


class InjectOOM(Callback):
    """Make a real ``Trainer.fit`` run out of memory where a test says, on CPU (test tooling).

    Entered from ``on_train_batch_start`` to ``on_train_batch_end``; it raises only until
    ``on_before_optimizer_step`` (forward and backward, not the optimizer update); with
    ``memory.oom_recovery`` on, only inside an attempt of the step (what recovery covers, not its
    agreement point: :func:`picotron_lightning.memory.oom.covered_attempt`). Each rank keeps
    the entries of ``plan`` for its own rank. After ``fit``: ``fired`` (scripted OOMs raised on this
    rank, ``(step, phase, op, attempt)``) and ``budget_fired``.

    Args:
        plan: scripted OOMs (:class:`OOMAt`); entries for other ranks are ignored.
        budget: bytes created within a step (activations, temporaries, gradients) past which any op raises.
    """

    def __init__(self, plan: list[OOMAt] | tuple[OOMAt, ...] = (), budget: int | None = None) -> None:
        self.plan = list(plan)
        self.budget = budget
        self.fired: list[tuple[int, str, int, int]] = []
        self.budget_fired = 0
        self._modes: list[Any] = []

    def _attempt_of(self, trainer: Any) -> Any:
        start: list[int | None] = [None]

        def attempt() -> int:
            recovery = getattr(trainer.strategy, "oom_recovery", None)
            retries = recovery.retries if recovery is not None else 0
            if start[0] is None:
                start[0] = retries
            return retries - (start[0] or 0)

        return attempt

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step, rank = trainer.global_step, trainer.global_rank
        entries = [e for e in self.plan if e.rank == rank and e.step == step]
        modes: list[Any] = []
        if entries:
            modes.append(ScriptedOOM(entries, self._attempt_of(trainer)))
        if self.budget is not None:
            modes.append(BudgetOOM(self.budget))
        if getattr(trainer.strategy, "oom_recovery", None) is not None:
            # Recovery covers the attempts of a step (forward and backward), not the agreement after them.
            for mode in modes:
                mode.covered = inside_attempt
        for mode in modes:
            mode.__enter__()
        self._modes = modes

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        for mode in self._modes:
            mode.armed = False

    def _exit(self) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
            if isinstance(mode, ScriptedOOM):
                self.fired.extend(mode.fired)
            else:
                self.budget_fired += mode.fired
        self._modes = []

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._exit()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._exit()
