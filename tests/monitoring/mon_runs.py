"""Training runs for the monitoring tests, executed inside real (gloo) ranks or one process.

Kept apart from the test files so that spawned workers import only this module.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

MICRO = 2  # samples per rank per step


def lm_tokens(batch: torch.Tensor) -> tuple[int, int, int]:
    """The reference module predicts ``seq`` tokens from windows of ``seq + 1``."""
    return batch.size(0), batch[:, :-1].numel(), batch.size(1) - 1


class Samples(Dataset):
    """Fixed samples; ``slow_rank`` sleeps in every item, a rank with a slow data pipeline."""

    def __init__(self, data: torch.Tensor, slow_rank: int | None = None, delay: float = 0.0) -> None:
        self.data, self.slow_rank, self.delay = data, slow_rank, delay

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.slow_rank is not None and int(os.environ.get("RANK", "0")) == self.slow_rank:
            time.sleep(self.delay)
        return self.data[i]


def loader(dataset: Dataset, world: int, rank: int, batch: int = MICRO) -> DataLoader:
    # Our own sampler in order: rank r takes samples r, r+world, ... so the ranks' shares of one
    # step together are the next `world * batch` samples, exactly a one-process batch.
    sampler = DistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
    return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True)


def strategy_for(world: int, prefer: Any = "picotron3d") -> Any:
    if world == 1:
        return "auto"
    if not isinstance(prefer, str):
        return prefer
    if prefer == "picotron3d":
        try:
            import picotron_lightning  # noqa: F401 - registers "picotron3d"

            return "picotron3d"
        except ImportError:
            return "ddp"
    return prefer


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights (gathers DTensors: every rank must call it)."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().clone().cpu()
    return out


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def fit(
    world: int,
    rank: int,
    data: torch.Tensor,
    steps: int,
    callbacks: list,
    root: str | None = None,
    preset: str = "tiny",
    strategy: Any = "picotron3d",
    dataset: Dataset | None = None,
    lr: float = 1e-2,
    batch: int = MICRO,
    dp: int | None = None,
) -> Any:
    """Train the reference module; return the trainer. ``dp``: data-parallel size (default: world)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from picotron_lightning.models import CausalLMModule
    from tests.fitting import quiet_trainer

    module = CausalLMModule(preset=preset, learning_rate=lr, seed=0)
    logger = TensorBoardLogger(root, name="tb", version=0) if root else False
    trainer = quiet_trainer(
        callbacks=callbacks, devices=world, strategy=strategy_for(world, strategy), max_steps=steps,
        logger=logger, use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
        log_every_n_steps=1, default_root_dir=root or tempfile.mkdtemp(prefix="mon-"),
    )
    dp = dp or world
    # Ranks of one tensor-parallel group read the same samples: the sampler spans dp only.
    trainer.fit(module, loader(dataset or Samples(data), dp, rank // (world // dp), batch))
    return trainer


def picotron_fsdp() -> Any:
    """picotron3d with FSDP2 data parallelism, or Lightning's ddp where the strategy is missing."""
    try:
        from picotron_lightning import Picotron3DStrategy
    except ImportError:
        return "ddp"
    return Picotron3DStrategy(data_parallel_mode="fsdp")

