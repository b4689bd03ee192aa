"""``MemoryCallback``: garbage collection, allocator fragmentation and memory metrics during ``fit``.

The picotron3d strategy installs one with its ``memory=`` options (unless the Trainer already has
one); it also works with other strategies: ``Trainer(callbacks=[MemoryCallback(MemoryOptions(...))])``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from picotron_lightning.memory.allocator import fragmentation, is_check_step, should_empty_cache
from picotron_lightning.memory.gc_control import GarbageCollection
from picotron_lightning.memory.options import MemoryOptions


class MemoryCallback(Callback):
    """Apply :class:`MemoryOptions` during training and log ``memory/*`` metrics.

    Attributes (for inspection after ``fit``): ``gc_steps``, the optimizer steps after which a
    collection ran; ``empty_cache_steps``, those after which the CUDA cache was released.
    """

    def __init__(self, options: MemoryOptions | dict[str, Any] | None = None) -> None:
        self.options = MemoryOptions.from_arg(options)
        self.gc = GarbageCollection(self.options.gc_every_n_steps, freeze=self.options.gc_freeze_after_setup)
        self.gc_steps: list[int] = []
        self.empty_cache_steps: list[int] = []
        self._last_step = 0

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_step = trainer.global_step
        self.gc.start()  # the model and optimizer exist now: freeze them out of every later collection

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # accumulating: no optimizer step, not a step boundary
            return
        self._last_step = step
        metrics: dict[str, float] = {}
        if self.gc.step(step):
            self.gc_steps.append(step)
        if self.gc.active:
            metrics.update({"memory/gc_collections": float(self.gc.collections),
                            "memory/gc_pause_s": self.gc.pause_s})
        device = trainer.strategy.root_device
        if device.type == "cuda":
            metrics.update(self._allocator_step(step, device))
        if metrics and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=step)

    def _allocator_step(self, step: int, device: torch.device) -> dict[str, float]:
        reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
        if is_check_step(step, self.options.fragmentation_check_every_n_steps):
            wanted = should_empty_cache(reserved, allocated, self.options.fragmentation_threshold,
                                        self.options.fragmentation_min_bytes)
            flag = torch.tensor([float(wanted)], device=device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # any rank fragmented: all release, same step
            if flag.item() > 0:
                torch.cuda.empty_cache()
                self.empty_cache_steps.append(step)
        return {"memory/reserved_bytes": float(reserved), "memory/allocated_bytes": float(allocated),
                "memory/fragmentation": fragmentation(reserved, allocated)}

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.gc.stop()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.gc.stop()


def install_memory_callback(trainer: Any, options: MemoryOptions) -> MemoryCallback:
    """The Trainer's :class:`MemoryCallback`, added with ``options`` if it has none yet."""
    for callback in trainer.callbacks:
        if isinstance(callback, MemoryCallback):
            return callback
    callback = MemoryCallback(options)
    trainer.callbacks.append(callback)
    return callback
