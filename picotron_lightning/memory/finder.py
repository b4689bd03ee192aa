"""``MicroBatchFinder``: the largest per-rank micro-batch that fits a memory budget, under picotron3d's layouts.

Lightning's ``BatchSizeFinder`` refuses distributed strategies (it would run many trial steps, each rank
deciding alone). This callback decides once for all ranks, in ``on_fit_start`` (the model is parallelized,
the data loaders not yet iterated):

1. **Estimate first**: :func:`~picotron_lightning.memory.estimate.estimate_memory` at micro-batches 1, 2, 4, ...
   until every rank is over the budget (on fake tensors, in a fresh interpreter started by global rank 0, since
   the estimate needs a process without a process group); the largest size under the budget by interpolation
   between the last size that fits and the first that does not, the minimum over ranks.
2. **Confirm with at most two real steps**: forward and backward at that size on every rank, measured
   (``torch.cuda.max_memory_allocated`` on CUDA, live tensor bytes on CPU; plus the optimizer state and DDP
   buckets the first step has not created yet, from the estimate), the maximum over ranks. If it is over the
   budget, back off by less than half, in proportion to the overshoot, and confirm once more.
3. **Apply**: set ``batch_size`` (Lightning's ``lightning_setattr``: the module, its ``hparams`` or the
   datamodule, as ``BatchSizeFinder`` does) and rebuild the training data loader.

The real steps leave no trace: gradients are cleared and no optimizer step is taken. Pipeline parallelism
is refused (its per-step batch is split by the schedule; set ``num_microbatches`` instead).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
from torch import nn
from torch.utils._pytree import tree_map
from typing_extensions import override


def linear_fit(size_a: int, peak_a: int, size_b: int, peak_b: int) -> tuple[float, float]:
    """``(fixed, per_sample)`` bytes through two measured points (``per_sample`` at least 1 byte)."""
    per_sample = max((peak_b - peak_a) / (size_b - size_a), 1.0)
    return peak_a - per_sample * size_a, per_sample


def largest_fitting(fixed: float, per_sample: float, budget: int, max_size: int) -> int:
    """The largest micro-batch ``b`` in ``[1, max_size]`` with ``fixed + per_sample * b <= budget`` (1 if none)."""
    return int(max(1, min(max_size, (budget - fixed) // per_sample)))


def back_off(size: int, peak: int, budget: int) -> int:
    """A smaller size after a step of ``size`` peaked at ``peak`` > ``budget``: by the overshoot, by less than half.

    The result is in ``[size // 2 + 1, size - 1]`` (1 for sizes 1 and 2): never the halving of a binary
    search, which would give away up to half the memory when the estimate was only a little optimistic.
    """
    if size <= 2:
        return 1
    proportional = int(size * budget / max(peak, 1))
    return max(size // 2 + 1, min(size - 1, proportional))


def repeat_rows(batch: Any, size: int) -> Any:
    """``batch`` with ``size`` samples along dim 0, cycling its rows (only shapes matter for memory)."""
    def grow(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        index = torch.arange(size, device=t.device) % t.size(0)
        return t.index_select(0, index)

    return tree_map(grow, batch)


def _estimate_worker(build_module: Callable[[], nn.Module], sample: Any, layout: Any, options: Any, budget: int,
                     max_size: int) -> dict[int, dict[int, tuple[int, int, int]]]:
    """Estimates at micro-batches 1, 2, 4, ... until every rank is over ``budget`` (or ``max_size``).

    Returns ``{size: {rank: (peak, optimizer bytes, DDP bucket bytes)}}``.
    """
    from picotron_lightning.memory.estimate import estimate_memory

    out: dict[int, dict[int, tuple[int, int, int]]] = {}
    size = 1
    while True:
        estimates = estimate_memory(build_module, repeat_rows(sample, size), layout, options=options,
                                    checkpointing=options.memory.activation_checkpointing,
                                    checkpoint_every=options.memory.checkpoint_every)
        out[size] = {e.rank: (e.peak, e.breakdown.optimizer, e.gradient_buckets) for e in estimates}
        if size >= max_size or all(peak > budget for peak, _, _ in out[size].values()):
            return out
        size = min(2 * size, max_size)


def fitting_size(peaks: dict[int, int], budget: int) -> int:
    """The largest size under ``budget`` from estimated ``{size: peak}`` (sizes 1, 2, 4, ...), by interpolation.

    Between the last size that fits and the first that does not, the peak is taken on the straight line
    through the two; a peak is the maximum of a constant part (e.g. the end of DDP's backward) and a part
    linear in the size, a convex function, so the line lies above it and the answer errs on the small side.
    """
    sizes = sorted(peaks)
    fitting = [b for b in sizes if peaks[b] <= budget]
    if not fitting:
        return 1
    low = fitting[-1]
    above = [b for b in sizes if b > low]
    if not above:
        return low
    high = above[0]
    return max(low, min(high - 1, largest_fitting(*linear_fit(low, peaks[low], high, peaks[high]), budget, high)))


def _estimate_in_child(build_module: Callable[[], nn.Module], sample: Any, layout: Any, options: Any, budget: int,
                       max_size: int) -> dict[int, dict[int, tuple[int, int, int]]]:
    """:func:`_estimate_worker` in a fresh interpreter (``python -m picotron_lightning.memory.finder IN OUT``).

    A plain subprocess, not multiprocessing: ranks started by a test harness are daemonic and may not
    have multiprocessing children. ``build_module`` travels by pickle, so it must be importable.
    """
    with tempfile.TemporaryDirectory() as directory:
        given, result = Path(directory) / "in.pkl", Path(directory) / "out.pkl"
        given.write_bytes(pickle.dumps((build_module, sample, layout, options, budget, max_size)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        done = subprocess.run([sys.executable, "-m", "picotron_lightning.memory.finder", str(given), str(result)],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"MicroBatchFinder: the memory estimate failed:\n{done.stderr[-4000:]}")
        return pickle.loads(result.read_bytes())


class MicroBatchFinder(Callback):
    """Set the largest per-rank micro-batch (``batch_size``) under ``budget`` before training starts, on every rank.

    Args:
        build_module: builds the model as the script does, unparallelized; it is pickled to the estimate's process,
            so it must be importable (a function of an importable module, or ``functools.partial(ModelClass,
            ...)``; not a function defined in the script itself). The estimate traces it on fake tensors.
        budget: bytes per rank, or on CUDA a fraction of the device's memory (e.g. ``0.9``).
        max_micro_batch: the largest size considered.
        attribute: the name of the batch size on the module, its ``hparams`` or the datamodule.

    After ``on_fit_start``: ``micro_batch_size`` (the choice), ``estimated`` (the estimate's size) and
    ``measured`` (``[(size, max peak over ranks)]`` of the real steps, at most two).
    """

    def __init__(self, build_module: Callable[[], nn.Module], budget: int | float, *, max_micro_batch: int = 4096,
                 attribute: str = "batch_size") -> None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
            raise ValueError(f"`budget={budget!r}` must be bytes (an int > 0) or, on CUDA, a fraction in (0, 1].")
        self.build_module, self.budget_arg = build_module, budget
        self.max_micro_batch, self.attribute = max_micro_batch, attribute
        self.micro_batch_size: int | None = None
        self.estimated: int | None = None
        self.measured: list[tuple[int, int]] = []

    def _budget(self, device: torch.device) -> int:
        if isinstance(self.budget_arg, int):
            return self.budget_arg
        if device.type != "cuda" or not 0 < self.budget_arg <= 1:
            raise ValueError(f"`budget={self.budget_arg!r}`: a fraction of device memory needs CUDA and (0, 1]; "
                             "pass bytes (an int) on CPU.")
        return int(torch.cuda.get_device_properties(device).total_memory * self.budget_arg)

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        strategy = trainer.strategy
        layout = getattr(strategy, "layout", None)
        if layout is None or layout.pp > 1:
            raise ValueError("MicroBatchFinder works with picotron3d and pipeline_parallel_size=1; under pipeline "
                             "parallelism set `num_microbatches` (the schedule splits each batch) instead.")
        if not lightning_hasattr(pl_module, self.attribute):
            raise ValueError(f"MicroBatchFinder sets `{self.attribute}` on the module, its hparams or the datamodule; "
                             f"none has it. Read the batch size from `self.{self.attribute}` in `train_dataloader`.")
        device = strategy.root_device
        budget = self._budget(device)
        trainer.fit_loop.setup_data()
        sample = next(iter(trainer.train_dataloader))
        by_size = self._estimate(strategy, sample, budget)
        ranks = list(next(iter(by_size.values())))
        size = self.estimated = min(fitting_size({b: by_size[b][r][0] for b in by_size}, budget) for r in ranks)
        me = layout.coordinates(trainer.global_rank)
        _, optimizer_bytes, bucket_bytes = by_size[1][layout.rank_of(pp=me.pp, dp=0, tp=me.tp)]
        not_created_yet = optimizer_bytes + bucket_bytes  # made by the first real step
        peak = self._measure(strategy, pl_module, repeat_rows(sample, size), device) + not_created_yet
        self.measured.append((size, peak))
        if peak > budget:
            size = back_off(size, peak, budget)
            peak = self._measure(strategy, pl_module, repeat_rows(sample, size), device) + not_created_yet
            self.measured.append((size, peak))
            if peak > budget:
                raise RuntimeError(
                    f"MicroBatchFinder: a micro-batch of {size} needs {peak / 2**20:.1f} MiB on the fullest rank, over "
                    f"the budget of {budget / 2**20:.1f} MiB (the estimate said {self.estimated} would fit). Turn on "
                    "memory.activation_checkpointing, shard with data_parallel_mode='fsdp', or raise the budget.")
        self.micro_batch_size = size
        lightning_setattr(pl_module, self.attribute, size)
        trainer.fit_loop._combined_loader = None  # rebuilt with the new batch size, as BatchSizeFinder does
        trainer.fit_loop.setup_data()

    def _estimate(self, strategy: Any, sample: Any, budget: int) -> dict[int, dict[int, tuple[int, int, int]]]:
        """:func:`_estimate_worker`'s result, computed on global rank 0 and sent to every rank."""
        box: list[Any] = [None]
        if dist.get_rank() == 0:
            cpu_sample = tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, sample)
            box[0] = _estimate_in_child(self.build_module, cpu_sample, strategy.layout, strategy.options, budget,
                                        self.max_micro_batch)
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _measure(self, strategy: Any, pl_module: Any, batch: Any, device: torch.device) -> int:
        """One real forward and backward of ``batch`` on every rank; the maximum peak over ranks, in bytes."""
        from picotron_lightning.memory.tracker import LiveBytes

        params = list(pl_module.parameters())
        tracker = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            tracker = LiveBytes()
            tracker.register([*params, *pl_module.buffers(), batch])
            tracker.reset_peak()
            tracker.__enter__()
        # `self.log` needs Lightning's loop (its result collection); these steps are not part of training.
        pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None
        try:
            out = strategy.training_step(batch, 0)
            loss = out["loss"] if isinstance(out, dict) else out
            with strategy._step_context():
                loss.backward()
            del out, loss
        finally:
            del pl_module.log, pl_module.log_dict
            if tracker is not None:
                tracker.__exit__(None, None, None)
        for p in params:
            p.grad = None
        peak = torch.cuda.max_memory_allocated(device) if tracker is None else tracker.peak
        worst = torch.tensor([float(peak)], device=device, dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return int(worst.item())


if __name__ == "__main__":  # the estimate's own process (see _estimate_in_child)
    arguments = pickle.loads(Path(sys.argv[1]).read_bytes())
    Path(sys.argv[2]).write_bytes(pickle.dumps(_estimate_worker(*arguments)))
