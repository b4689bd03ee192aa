"""MetricsCollector: loss, throughput, MFU, gradient/parameter norms, memory, MoE and pipeline metrics.

Counts are kept on every rank; every ``log_every_n_steps`` optimizer steps one all-reduce sums
them and rank 0 writes. Throughput is counted per data-parallel replica (tensor- and
pipeline-parallel ranks of one replica see the same samples and are not counted twice), so
tokens/s and MFU are right for any layout:

* tokens/s (global)  = tokens of all replicas in the window / wall time of the window
* tokens/s/device    = global / number of devices
* MFU                = tokens/s/device x model FLOPs per token / dense peak FLOP/s of one device

Fabric::

    collector = MetricsCollector(log_every_n_steps=10)
    collector.setup_fabric(fabric, model, optimizers=[optimizer])
    for step, batch in enumerate(loader, start=1):
        collector.start_batch(batch)
        loss = ...; collector.record_loss(loss); fabric.backward(loss)
        collector.before_optimizer_step(step)        # gradient norm on logging steps
        optimizer.step(); optimizer.zero_grad()
        collector.end_batch(step)                    # logs on every N-th step
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from picotron_lightning.monitoring.context import RunContext, cached_grad_norm, memory_stats, param_norm
from picotron_lightning.monitoring.flops import ModelFlops, compute_precision, peak_flops
from picotron_lightning.monitoring.moe_stats import collect_moe
from picotron_lightning.monitoring.tensorboard_output import (
    GRAD,
    LOSS,
    MEMORY,
    OPTIM,
    PIPELINE,
    THROUGHPUT,
    shared_output,
)


def default_batch_size(batch: Any) -> tuple[int, int, int]:
    """``(samples, tokens, seq_len)`` of a batch: the first integer tensor found is the token ids.

    A 2-D ``(batch, seq)`` tensor counts ``batch * seq`` tokens; a dict is searched for
    ``input_ids`` first. Pass ``tokens_per_batch=`` when the batch means something else (for
    example the reference module's ``(batch, seq + 1)`` windows, whose last column is only a target).
    """
    def first_tensor(obj: Any) -> torch.Tensor | None:
        if isinstance(obj, torch.Tensor):
            return obj
        if isinstance(obj, dict):
            for key in ("input_ids", "tokens", "input"):
                if isinstance(obj.get(key), torch.Tensor):
                    return obj[key]
            obj = list(obj.values())
        if isinstance(obj, (list, tuple)):
            for item in obj:
                found = first_tensor(item)
                if found is not None:
                    return found
        return None

    t = first_tensor(batch)
    if t is None or t.dim() == 0:
        return 0, 0, 0
    seq = t.size(1) if t.dim() >= 2 else 1
    return t.size(0), t.size(0) * seq, seq


class MetricsCollector(Callback):
    """Log training health and speed every ``log_every_n_steps`` optimizer steps (rank 0 writes).

    Args:
        log_every_n_steps: optimizer steps between logged points.
        histogram_every_n_steps: weight/gradient histograms and the expert heatmap every this
            many steps (0: never).
        tokens_per_batch: ``batch -> (samples, tokens, seq_len)``; see :func:`default_batch_size`.
        flops_per_token: training FLOPs per token; measured from the model when ``None``.
        peak_flops_per_device: dense peak FLOP/s of one device; looked up (GPU) or measured (CPU)
            for the precision in use when ``None``.
        log_param_norm, log_memory, log_moe: switch groups of metrics off.
    """

    def __init__(
        self,
        log_every_n_steps: int = 10,
        histogram_every_n_steps: int = 100,
        tokens_per_batch: Callable[[Any], tuple[int, int, int]] | None = None,
        flops_per_token: float | None = None,
        peak_flops_per_device: float | None = None,
        log_param_norm: bool = True,
        log_memory: bool = True,
        log_moe: bool = True,
    ) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"`log_every_n_steps` must be >= 1, got {log_every_n_steps}.")
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.tokens_per_batch = tokens_per_batch or default_batch_size
        self.flops_per_token = flops_per_token
        self.peak_flops_per_device = peak_flops_per_device
        self.log_param_norm, self.log_memory, self.log_moe = log_param_norm, log_memory, log_moe
        self.ctx = RunContext()
        self.module: nn.Module | None = None
        self.model_flops: ModelFlops | None = None
        self.last_metrics: dict[str, float] = {}  # what was logged last (also on ranks that do not write)
        self.history: deque[tuple[int, dict[str, float]]] = deque(maxlen=1000)  # (step, metrics), recent
        self._window_start: float | None = None
        self._reset_window()
        self._norms: dict[str, float] = {}
        self._reported: dict[str, float] = {}

    # ------------------------------------------------------------------------------ setup
    def attach(self, ctx: RunContext, module: nn.Module) -> None:
        """Bind to a run and measure the model; call before the strategy shards it if possible."""
        self.ctx, self.module = ctx, module
        if self.model_flops is None and self.flops_per_token is None:
            self.model_flops = ModelFlops.from_module(module)

    def setup_fabric(self, fabric: Any, module: nn.Module, optimizers: Any = ()) -> None:
        """Use from a Fabric script; pass the optimizers to log their learning rate."""
        self.attach(RunContext.from_fabric(fabric, optimizers), module)
        shared_output(self.ctx).write_layout()

    def _reset_window(self) -> None:
        self._steps = 0
        self._samples = 0
        self._tokens = 0
        self._seq_len = 0
        self._loss_sum = 0.0
        self._loss_count = 0
        self._losses: list[torch.Tensor] = []

    # ------------------------------------------------------------------------------ per step
    def start_batch(self, batch: Any) -> None:
        """Call with every (micro-)batch before its forward pass."""
        if self._window_start is None:
            self._window_start = time.perf_counter()
        samples, tokens, seq = self.tokens_per_batch(batch)
        self._samples += samples
        self._tokens += tokens
        self._seq_len = seq or self._seq_len

    def record_loss(self, loss: torch.Tensor) -> None:
        """Call with each micro-batch's loss (kept on device; read only on logging steps)."""
        self._losses.append(loss.detach().float().reshape(()))

    def record_metric(self, name: str, value: float) -> None:
        """A value another part of the run reports (e.g. ``memory/oom_retries``), written with the next logged step.

        Not reduced over ranks: the reporter gives every rank the same value (an agreed decision).
        """
        self._reported[name] = float(value)

    def _is_log_step(self, step: int) -> bool:
        return step % self.log_every_n_steps == 0

    def before_optimizer_step(self, step: int) -> None:
        """After backward, before the update: norms for the step that will be number ``step``."""
        if not self._is_log_step(step) or self.module is None:
            return
        self._norms = {f"{GRAD}/norm": float(cached_grad_norm(self.ctx, self.module, step))}
        if self.log_param_norm:
            self._norms[f"{GRAD}/param_norm"] = float(param_norm(self.ctx, self.module))

    def end_batch(self, step: int, optimizer_stepped: bool = True) -> dict[str, float] | None:
        """Call after every (micro-)batch with the number of optimizer steps done so far.

        Returns the logged metrics on logging steps (on every rank), else ``None``.
        """
        if not optimizer_stepped:
            return None  # a micro-batch inside an accumulation window
        self._steps += 1
        if not self._is_log_step(step):
            return None  # losses stay on the device: reading them every step would sync it
        if self._losses:
            self._loss_sum, self._loss_count = float(torch.stack(self._losses).sum()), len(self._losses)
        return self._log(step)

    def _log(self, step: int) -> dict[str, float]:
        ctx = self.ctx
        now = time.perf_counter()
        elapsed = max(now - (self._window_start or now), 1e-9)
        # One all-reduce: loss sum and count, samples and tokens over all ranks.
        totals = ctx.all_reduce(ctx.collective_tensor(
            [self._loss_sum, self._loss_count, self._samples, self._tokens])).tolist()
        loss_sum, loss_count, samples, tokens = totals
        copies = ctx.world_size / max(ctx.data_parallel_size, 1)  # ranks of one replica see the same batch
        samples, tokens = samples / copies, tokens / copies
        metrics: dict[str, float] = {}
        if loss_count:
            metrics[f"{LOSS}/loss"] = loss_sum / loss_count
        step_time = elapsed / max(self._steps, 1)
        metrics.update({
            f"{THROUGHPUT}/step_time_s": step_time,
            f"{THROUGHPUT}/samples_per_sec": samples / elapsed,
            f"{THROUGHPUT}/samples_per_sec_per_device": samples / elapsed / ctx.world_size,
            f"{THROUGHPUT}/tokens_per_sec": tokens / elapsed,
            f"{THROUGHPUT}/tokens_per_sec_per_device": tokens / elapsed / ctx.world_size,
        })
        flops = self.flops_per_token
        if flops is None and self.model_flops is not None and self._seq_len:
            flops = self.model_flops.per_token(self._seq_len)
        peak = self.peak_flops_per_device
        if peak is None:
            peak = peak_flops(ctx.device, compute_precision(ctx.precision, ctx.device.type))
        if flops and peak:
            achieved = tokens / elapsed / ctx.world_size * flops
            metrics[f"{THROUGHPUT}/mfu"] = achieved / peak
            metrics[f"{THROUGHPUT}/tflops_per_device"] = achieved / 1e12
        metrics.update(self._norms)
        metrics.update(self._reported)
        metrics.update({f"{OPTIM}/{k}": v for k, v in ctx.learning_rates().items()})
        if self.log_memory:
            metrics.update({f"{MEMORY}/{k}": v for k, v in memory_stats(ctx.device).items()})
        bubble = getattr(ctx.strategy, "pipeline_bubble", None)
        if isinstance(bubble, (int, float)) and math.isfinite(bubble):
            metrics[f"{PIPELINE}/bubble"] = float(bubble)
        matrix = None
        if self.log_moe and self.module is not None:
            moe_scalars, matrix = collect_moe(self.module)
            metrics.update(moe_scalars)
        out = shared_output(ctx)
        out.scalars(metrics, step)
        hist_every = self.histogram_every_n_steps
        if hist_every and step % hist_every == 0 and self.module is not None:
            out.histograms(self.module, step)
            if matrix is not None:
                out.expert_heatmap(matrix, step)
        self.last_metrics = metrics
        self.history.append((step, metrics))
        self._norms = {}
        self._reported = {}
        self._reset_window()
        self._window_start = time.perf_counter()
        return metrics

    # ------------------------------------------------------------------------------ Lightning
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.attach(RunContext.from_trainer(trainer), pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.ctx = RunContext.from_trainer(trainer)  # optimizers and loggers are final now
        shared_output(self.ctx).write_layout()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.start_batch(batch)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        self.record_loss(loss * trainer.accumulate_grad_batches)  # Lightning divided it for accumulation

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._stepping = True
        self.before_optimizer_step(trainer.global_step + 1)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stepped, self._stepping = getattr(self, "_stepping", False), False
        self.end_batch(trainer.global_step, stepped)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        shared_output(self.ctx).flush()
