"""Parity helpers: one-process reference losses, and Trainer/Fabric runs that record theirs.

The single-process reference is a plain PyTorch loop, independent of Lightning and of the
strategy, on the *global* batch: the same samples that all data-parallel ranks see together.
A parallel run's step loss is the mean of its data-parallel ranks' losses (the mean over equal
micro-batches equals the loss of their union).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from picotron_lightning.testing import COLLECTIVE_TIMEOUT, TokenDataset, token_data
from tests.fitting import fit_and_record

RTOL = 1e-4
VOCAB = 256
SEQ = 16


def make_data(num_samples: int, seed: int = 1234) -> torch.Tensor:
    return token_data(num_samples, SEQ, VOCAB, seed)


def make_module(preset: str = "tiny", config: dict | None = None, lr: float = 1e-2):
    from picotron_lightning.models import CausalLMModule

    return CausalLMModule(preset=preset, config=config, learning_rate=lr, seed=0)


def train_reference(
    module: Any,
    data: torch.Tensor,
    steps: int,
    global_batch: int,
    loss_fn: Any = None,
    clip: float | None = None,
    shuffle: bool = True,
    chunks: int = 1,
) -> dict[str, Any]:
    """Train ``module`` in one process on ``global_batch`` samples per step; losses, pre-clip norms, module.

    ``shuffle`` follows the order of the ``DistributedSampler`` that Lightning's Trainer inserts
    for training (shuffled with seed 0 + epoch; the ranks' shares of one step together are the
    next ``global_batch`` of that permutation). Fabric keeps the loader's own (sequential) order.

    ``chunks`` > 1 accumulates gradients over that many contiguous chunks of the global batch, as a
    pipeline's microbatches do; it matters only for MoE models, whose auxiliary loss is per chunk.
    """
    from picotron_lightning.parallel.expert import set_aux_loss_scale

    loss_fn = loss_fn or module._loss
    optimizer = module.configure_optimizers()
    losses, norms = [], []
    per_epoch = len(data) // global_batch
    for step in range(steps):
        epoch, start = divmod(step, per_epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch)) if shuffle else None
        index = torch.arange(len(data)) if order is None else order
        batch = data[index[start * global_batch : (start + 1) * global_batch]]
        set_aux_loss_scale(module, 1.0 / chunks)
        loss = sum(loss_fn(chunk) / chunks for chunk in batch.chunk(chunks))
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(module.parameters(), clip or float("inf")).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "module": module}


def reference_losses(
    data: torch.Tensor,
    steps: int,
    global_batch: int,
    preset: str = "tiny",
    config: dict | None = None,
    lr: float = 1e-2,
    clip: float | None = None,
    shuffle: bool = True,
    chunks: int = 1,
) -> dict[str, Any]:
    """:func:`train_reference` of the reference ``CausalLMModule``, plus its final state dict."""
    out = train_reference(make_module(preset, config, lr), data, steps, global_batch, clip=clip, shuffle=shuffle,
                          chunks=chunks)
    out["state"] = {k: v.detach().clone() for k, v in out.pop("module").state_dict().items()}
    return out


def max_relative_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def mean_over_ranks(per_rank: list[list[float]]) -> list[float]:
    return [sum(vals) / len(vals) for vals in zip(*per_rank, strict=True)]


def step_means(micro_losses: list[float], accumulate: int) -> list[float]:
    """Mean of each optimizer step's micro-batch losses."""
    return [sum(micro_losses[i : i + accumulate]) / accumulate for i in range(0, len(micro_losses), accumulate)]


def trainer_run(
    world_size: int,
    data: torch.Tensor,
    micro_batch: int,
    max_steps: int,
    strategy_kwargs: dict[str, Any] | None = None,
    accumulate: int = 1,
    clip: float | None = None,
    preset: str = "tiny",
    config: dict | None = None,
    ckpt_dir: str | None = None,
    resume_from: str | None = None,
) -> dict[str, Any]:
    """Run ``Trainer.fit`` with picotron3d inside a worker; return this rank's micro-batch losses."""
    import lightning as L

    from picotron_lightning import Picotron3DStrategy

    class SyncProbe(L.Callback):
        """After each backward: is any gradient visible yet, and its local checksum."""

        def on_after_backward(self, trainer, pl_module):  # noqa: ANN001
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            local = [getattr(g, "_local_tensor", g) for g in grads]
            sync_probe.append(None if not grads else float(sum(t.double().sum() for t in local)))

    sync_probe: list[float | None] = []
    strategy = Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, **(strategy_kwargs or {}))
    module = make_module(preset, config)
    loader = DataLoader(TokenDataset(data), batch_size=micro_batch, shuffle=False)
    fitted = fit_and_record(
        module, loader, callbacks=[SyncProbe()], ckpt_dir=ckpt_dir, resume_from=resume_from, strategy=strategy,
        devices=world_size, max_steps=max_steps, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
    )
    losses, trainer = fitted.losses, fitted.trainer
    dp_rank = strategy.layout.coordinates(trainer.global_rank).dp
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    checkpointed = sum(isinstance(m, CheckpointWrapper) for m in module.modules())
    return {"losses": losses, "sync_probe": sync_probe, "mode": trainer.strategy.data_parallel_mode, "dp_rank": dp_rank,
            "checkpointed_blocks": checkpointed}


def fabric_run(
    world_size: int,
    data: torch.Tensor,
    micro_batch: int,
    max_steps: int,
    strategy_kwargs: dict[str, Any] | None = None,
    accumulate: int = 1,
    clip: float | None = None,
) -> dict[str, Any]:
    """An ordinary Fabric training loop with picotron3d; returns this rank's micro-batch losses."""
    import lightning as L

    from picotron_lightning import Picotron3DFabricStrategy

    fabric = L.Fabric(
        strategy=Picotron3DFabricStrategy(timeout=COLLECTIVE_TIMEOUT, **(strategy_kwargs or {})),
        accelerator="cpu",
        devices=world_size,
    )
    fabric.launch()
    module = make_module()
    optimizer = module.configure_optimizers()
    model, optimizer = fabric.setup(module, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(TokenDataset(data), batch_size=micro_batch, shuffle=False))
    losses: list[float] = []
    batches = iter(loader)
    for _ in range(max_steps):
        for micro in range(accumulate):
            batch = next(batches)
            with fabric.no_backward_sync(model, enabled=micro < accumulate - 1):
                logits = model(batch[:, :-1])  # a Fabric script calls the model's forward
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
                fabric.backward(loss / accumulate)
            losses.append(loss.item())
        if clip is not None:
            fabric.clip_gradients(model, optimizer, max_norm=clip)
        optimizer.step()
        optimizer.zero_grad()
    return {"losses": losses, "mode": fabric.strategy.data_parallel_mode}
