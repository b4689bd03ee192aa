"""A plain LightningModule around the reference Llama: nothing in it knows about parallelism."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from picotron_lightning.models.llama import Llama, LlamaConfig, llama_config


class CausalLMModule(L.LightningModule):
    """Next-byte prediction on batches of shape (batch, seq_len + 1).

    Args:
        preset: name of a :data:`~picotron_lightning.models.PRESETS` entry.
        config: overrides of preset fields, e.g. ``{"num_layers": 4}``.
        learning_rate, weight_decay, warmup_steps: AdamW with linear warm-up.
        seed: seeds the weight initialisation so every rank builds the same model.
    """

    def __init__(
        self,
        preset: str = "tiny",
        config: dict[str, Any] | None = None,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.learning_rate, self.weight_decay, self.warmup_steps = learning_rate, weight_decay, warmup_steps
        self.config: LlamaConfig = llama_config(preset, **(config or {}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = Llama(self.config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = self.model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        if not self.warmup_steps:
            return optimizer
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
