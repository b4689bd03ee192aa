"""Step time with all monitoring callbacks on versus off, in the same process.

Short fits alternate in ABBA order (off, on, on, off, ...) on the same model and data, so that
drift in the machine's load (other jobs on a shared host) hits both sides alike; each side's step
time is the median over all its timed steps.

    python benchmarks/monitoring_overhead.py --preset small --steps 40 --rounds 3

Prints the ratio ``on / off`` (target: <= 1.03).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from picotron_lightning.data import ByteCorpus, stdlib_bytes
from picotron_lightning.models import CausalLMModule
from picotron_lightning.monitoring import AlertManager, AnomalyDetector, MetricsCollector


class StepTimer(Callback):
    """Wall time between consecutive batch ends (the whole iteration, hooks included)."""

    def __init__(self, skip: int = 3) -> None:
        self.skip, self.times, self._last = skip, [], None

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.global_step > self.skip:
            self.times.append(now - self._last)
        self._last = now


def one_fit(args: argparse.Namespace, data: ByteCorpus, monitored: bool, root: str) -> list[float]:
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if monitored:
        collector = MetricsCollector(
            log_every_n_steps=args.log_every, histogram_every_n_steps=args.hist_every,
            tokens_per_batch=lambda b: (b.size(0), b[:, :-1].numel(), b.size(1) - 1),
        )
        callbacks += [collector, AnomalyDetector(), AlertManager()]
    # The same logger on both sides: only the callbacks differ.
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=args.strategy, max_steps=args.steps,
        logger=TensorBoardLogger(root, name="bench"), callbacks=callbacks, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=args.log_every,
        limit_val_batches=0,
    )
    module = CausalLMModule(args.preset, learning_rate=1e-3)
    trainer.fit(module, DataLoader(data, batch_size=args.batch_size, shuffle=False, drop_last=True))
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--hist-every", type=int, default=100)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    args = parser.parse_args()

    data = ByteCorpus(stdlib_bytes(2_000_000), args.seq_len)
    root = tempfile.mkdtemp(prefix="monitoring-bench-")
    off: list[float] = []
    on: list[float] = []
    for _ in range(args.rounds):
        for monitored in (False, True, True, False):
            (on if monitored else off).extend(one_fit(args, data, monitored, root))
    if not off or not on:
        return
    t_off, t_on = statistics.median(off), statistics.median(on)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device={device} preset={args.preset} seq={args.seq_len} batch={args.batch_size} "
          f"steps={len(off)}+{len(on)} timed")
    print(f"step time off: {t_off * 1e3:.2f} ms   on: {t_on * 1e3:.2f} ms")
    print(f"ratio on/off: {t_on / t_off:.3f}  (target <= 1.03)")


if __name__ == "__main__":
    main()
