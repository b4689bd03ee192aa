"""Small models and helpers shared by the precision tests (importable by spawned workers)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from picotron_lightning.data import ByteCorpus, stdlib_bytes
from tests.fitting import quiet_trainer


class HotLinear(nn.Linear):
    """A linear layer with a fixed output gain: ~1e5-1e6 outputs are fine in fp32, Inf in fp16."""

    def __init__(self, n: int, gain: float = 1e6) -> None:
        super().__init__(n, n)
        self.register_buffer("gain", torch.tensor(gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The product stays in the input's dtype (0-dim tensors do not promote), so fp16 overflows.
        return super().forward(x) * self.gain


class OverflowNet(nn.Module):
    """in -> hot (overflows in fp16) -> LayerNorm (removes the gain in fp32) -> out."""

    def __init__(self, width: int = 32, gain: float = 1e6) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.hot = HotLinear(width, gain)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(self.norm(torch.relu(self.hot(h)))).squeeze(-1)


class OverflowModule(L.LightningModule):
    """Regression on a fixed random data set with :class:`OverflowNet`."""

    def __init__(self, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        self.lr = lr
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = OverflowNet()
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x).float(), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def regression_data(n: int = 256, seed: int = 1, noise: float = 0.3) -> TensorDataset:
    """y = f(x) + noise: the loss has a floor, so "within 2% of fp32" compares fits, not noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + noise * torch.randn(n, generator=g)
    return TensorDataset(x, y)


@torch.no_grad()
def full_loss(module: OverflowModule) -> float:
    """fp32 MSE of a trained module on the whole data set."""
    x, y = regression_data().tensors
    return float(F.mse_loss(module.net(x).float(), y))


def _loader(dataset: Dataset, batch_size: int, rank: int, world: int) -> DataLoader:
    # An explicit unshuffled split (rank r takes samples r, r + world, ...): the ranks' shares of
    # one step together are exactly the one-process batch of that step.
    sampler = DistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler)


def regression_loader(batch_size: int = 32, rank: int = 0, world: int = 1) -> DataLoader:
    return _loader(regression_data(), batch_size, rank, world)


def byte_loader(batch_size: int = 8, seq_len: int = 32, max_bytes: int = 100_000, rank: int = 0,
                world: int = 1) -> DataLoader:
    return _loader(ByteCorpus(stdlib_bytes(max_bytes), seq_len), batch_size, rank, world)


def trainer(max_steps: int, **kwargs: object) -> L.Trainer:
    """A quiet CPU trainer without sanity validation (record losses with ``tests.fitting.LossRecorder``)."""
    kwargs.setdefault("num_sanity_val_steps", 0)
    return quiet_trainer(max_steps=max_steps, **kwargs)
