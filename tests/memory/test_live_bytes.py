"""The live-byte counter when storages are released on another thread (as gloo's worker threads do).

A collective's buffers can outlive the step thread's last reference: the worker that ran the collective
drops its own a moment later. ``LiveBytes`` must count such a release once and exactly (its totals are
changed by two threads), and ``PeakProbe`` must not report a step whose peak a late release inflated.
"""

from __future__ import annotations

import sys
import threading

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from picotron_lightning.memory.tracker import LiveBytes
from picotron_lightning.testing_memory import PeakProbe

MIB = 2**20


def test_releases_on_another_thread_keep_the_totals_exact() -> None:
    """A thread releases thousands of storages while this thread allocates; every byte is returned once."""
    handed: list[torch.Tensor] = []
    lock = threading.Lock()
    done = threading.Event()

    def release_all() -> None:
        while not done.is_set() or handed:
            with lock:
                batch = handed[:]
                handed.clear()
            del batch  # the last references: the storages are released on this thread

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside the counter's updates too
    tracker = LiveBytes()
    releaser = threading.Thread(target=release_all)
    try:
        with tracker:
            kept = [torch.empty(256) for _ in range(500)]  # a live set for a release at a peak to copy
            releaser.start()
            for _ in range(25000):
                tracker.reset_peak()  # every release that follows leaves a peak (the counter copies its live set)
                t = torch.empty(256)  # 1 KiB, counted on this thread
                with lock:
                    handed.append(t)
                del t
            done.set()
            releaser.join()
            del kept
    finally:
        sys.setswitchinterval(interval)
        done.set()
        releaser.join()
    assert tracker.current == 0, tracker.current
    assert 501 * 1024 <= tracker.peak <= 25500 * 1024


class _LateRelease(L.LightningModule):
    """A linear model whose step ``late_step`` creates a 1 MiB buffer that a thread holds until the step ends,
    as gloo's worker holds a finished collective's buffers, after this thread dropped it."""

    def __init__(self, late_step: int) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 64)
        self.late_step = late_step
        self._holder: threading.Thread | None = None
        self._release = threading.Event()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if batch_idx == self.late_step:
            buffer = [torch.empty(MIB // 4)]  # 1 MiB, dropped below by this thread, held by the holder

            def hold(kept: list[torch.Tensor] = buffer) -> None:
                held = kept.pop()
                self._release.wait()
                del held

            self._holder = threading.Thread(target=hold)
            self._holder.start()
            while buffer:  # until the holder took it
                pass
        return self.layer(batch).square().mean()

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        # Runs after PeakProbe's hook (callbacks first): the buffer was alive through the whole measured step.
        if self._holder is not None:
            self._release.set()
            self._holder.join()
            self._holder = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _probe_run(late_step: int, steps: tuple[int, ...]) -> PeakProbe:
    probe = PeakProbe(steps=steps)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    trainer.fit(_LateRelease(late_step), DataLoader(torch.randn(32, 64), batch_size=8))
    return probe


def test_peak_probe_reports_the_smallest_of_its_steps() -> None:
    clean = _probe_run(late_step=-1, steps=(1, 2, 3))
    assert len(set(clean.peaks.values())) == 1, clean.peaks  # steady steps: equal peaks
    late = _probe_run(late_step=2, steps=(1, 2, 3))
    assert late.peaks[2] >= clean.peak + MIB, late.peaks  # the late release is in step 2's peak
    assert late.peak == clean.peak and late.breakdown == clean.breakdown, (late.peaks, clean.peaks)
    only_late = _probe_run(late_step=2, steps=(2,))
    assert only_late.peak == late.peaks[2]  # one step measured: nothing to take the smaller of
