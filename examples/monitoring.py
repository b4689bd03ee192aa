"""Train the reference MoE model with all monitoring callbacks and open the result in TensorBoard.

    python examples/monitoring.py                      # one process on CPU, ~1 minute
    python examples/monitoring.py --devices 2          # picotron3d, dp=2 (Lightning launches the ranks)
    tensorboard --logdir lightning_logs/monitoring     # dashboard: CUSTOM SCALARS tab

With ``--inject`` the run poisons one gradient with NaN at step 60 (the detector skips that step
on every rank) and feeds one batch of junk bytes at step 90 (a loss spike), so the alert views
have something to show.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

import picotron_lightning  # noqa: F401 - registers "picotron3d"
from picotron_lightning.data import ByteCorpus, stdlib_bytes
from picotron_lightning.models import CausalLMModule
from picotron_lightning.monitoring import AlertManager, AnomalyDetector, MetricsCollector


class WithJunkBatch(Dataset):
    """Source-code bytes, except one global batch of a byte that never occurs in source code."""

    def __init__(self, corpus: ByteCorpus, first: int, count: int) -> None:
        self.corpus, self.junk = corpus, range(first, first + count)

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.corpus[i]
        return torch.full_like(item, 7) if i in self.junk else item


class PoisonGradient(Callback):
    """Put a NaN into rank 0's gradients at one step (a stand-in for an fp16 overflow or a bad kernel)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 0:
            grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            local.view(-1)[0] = float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--root", default="lightning_logs")
    parser.add_argument("--inject", action="store_true", help="inject a NaN gradient and a loss spike")
    args = parser.parse_args()

    corpus = ByteCorpus(stdlib_bytes(1_000_000), args.seq_len)
    global_batch = args.batch_size * args.devices
    data = WithJunkBatch(corpus, 90 * global_batch, global_batch) if args.inject else corpus
    callbacks: list[Callback] = [
        MetricsCollector(log_every_n_steps=5, histogram_every_n_steps=25,
                         tokens_per_batch=lambda b: (b.size(0), b[:, :-1].numel(), b.size(1) - 1)),
        AnomalyDetector(window=50, warmup=20, actions={"nonfinite": ["skip"], "loss_spike": ["log"]}),
        AlertManager(),
    ]
    if args.inject:
        callbacks.append(PoisonGradient(60))
    trainer = L.Trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=args.devices,
        strategy="picotron3d" if args.devices > 1 else "auto", max_steps=args.steps,
        logger=TensorBoardLogger(args.root, name="monitoring"), callbacks=callbacks,
        enable_checkpointing=False, limit_val_batches=0, log_every_n_steps=5,
    )
    # Lightning adds a DistributedSampler (shuffling) under picotron3d; one device reads in order.
    trainer.fit(CausalLMModule(args.preset, learning_rate=3e-3), DataLoader(data, batch_size=args.batch_size))
    # The logger's own log_dir: Trainer.log_dir is a collective, and the other ranks have finished.
    if trainer.is_global_zero and trainer.logger is not None:
        print(f"TensorBoard logs are in {trainer.logger.log_dir}; open them with: "
              f"tensorboard --logdir {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
