"""Trainer runs of the reference Llama under pipeline parallelism, and their one-process references."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from picotron_lightning import Picotron3DStrategy
from picotron_lightning.testing import COLLECTIVE_TIMEOUT
from tests.fitting import fit_and_record
from tests.parity import TokenDataset, make_module, train_reference

CFG = {"num_layers": 4}  # d=64, 4 heads, seq 16: the tiny preset with four blocks


def run(
    world: int,
    data: torch.Tensor,
    micro: int,
    steps: int,
    strategy_kwargs: dict[str, Any],
    accumulate: int = 1,
    clip: float | None = None,
    val_data: torch.Tensor | None = None,
    ckpt_dir: str | None = None,
    resume_from: str | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``Trainer.fit`` of the reference LightningModule (``config`` over :data:`CFG`); losses, val loss, bubble."""
    grads_seen: list[bool] = []

    class GradientProbe(L.Callback):
        def on_after_backward(self, trainer, pl_module):  # noqa: ANN001
            grads_seen.append(all(p.grad is not None for p in pl_module.parameters()))

    strategy = Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, **strategy_kwargs)
    module = make_module(config={**CFG, **(config or {})})
    val = DataLoader(TokenDataset(val_data), batch_size=micro) if val_data is not None else None
    fitted = fit_and_record(
        module, DataLoader(TokenDataset(data), batch_size=micro), val, callbacks=[GradientProbe()], ckpt_dir=ckpt_dir,
        resume_from=resume_from, strategy=strategy, devices=world, max_steps=steps,
        accumulate_grad_batches=accumulate, gradient_clip_val=clip, num_sanity_val_steps=1,
        val_check_interval=steps * accumulate if val_data is not None else None,
    )
    losses, trainer = fitted.losses, fitted.trainer
    metrics = trainer.callback_metrics
    return {
        "losses": losses,
        "grads_seen": grads_seen,
        "val_loss": float(metrics["val_loss"]) if "val_loss" in metrics else None,
        "logged_train_loss": float(metrics["train_loss"]),
        "bubble": strategy.pipeline_bubble,
        "params": sorted(n for n, _ in module.named_parameters()),
        "pp_rank": strategy.layout.coordinates(trainer.global_rank).pp,
        "data_parallel_mode": strategy.data_parallel_mode,
        # parameters held as DTensors sharded over dp (FSDP2), each with its local shard's size
        "dp_sharded": {n: p.to_local().numel() for n, p in module.named_parameters()
                       if isinstance(p, DTensor) and any(d.startswith("dp") for d in p.device_mesh.mesh_dim_names or ())
                       and any(pl.is_shard() for pl in p.placements)},
    }


def predict(world: int, data: torch.Tensor, micro: int, strategy_kwargs: dict[str, Any]) -> torch.Tensor:
    """``Trainer.predict`` with the module's default ``predict_step`` (its forward: logits)."""
    trainer = L.Trainer(
        strategy=Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, **strategy_kwargs), accelerator="cpu",
        devices=world, logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    out = trainer.predict(make_module(config=CFG), DataLoader(TokenDataset(data[:, :-1]), batch_size=micro))
    return torch.cat(out)


def reference_model(data: torch.Tensor, steps: int, global_batch: int, config: dict[str, Any] | None = None,
                    clip: float | None = None):  # noqa: ANN201
    """The one-process model after ``steps`` steps (Trainer's shuffled order) and its step losses."""
    out = train_reference(make_module(config={**CFG, **(config or {})}), data, steps, global_batch, clip=clip)
    return out["module"], out["losses"]


@torch.no_grad()
def reference_val_loss(module: torch.nn.Module, val_data: torch.Tensor, batch: int) -> float:
    """Lightning's epoch value of ``val_loss``: the batch-size-weighted mean of the batch losses."""
    total, count = 0.0, 0
    for start in range(0, len(val_data), batch):
        chunk = val_data[start:start + batch]
        total += module._loss(chunk).item() * len(chunk)
        count += len(chunk)
    return total / count
