"""A user's script with a memory budget:
``python train_budget.py BUDGET_BYTES OUT.json [fsdp|tp2|pp2|moe-ddp|moe-ep2]``.

Two ranks on CPU started by Lightning's launcher, data parallel (FSDP2, the default), tensor parallel or
pipeline parallel with the 4-layer tiny Llama, or the tiny-moe Llama under DDP (ep=1) or FSDP2 with
expert parallelism (ep=2); the strategy picks the memory policy that fits the budget. Global rank 0 writes
each step's global-batch loss and the chosen policy to OUT.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import lightning as L
from torch.utils.data import DataLoader

from picotron_lightning import Picotron3DStrategy
from picotron_lightning.models import CausalLMModule
from picotron_lightning.testing import TokenDataset, token_data


class RecordLoss(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")))


if __name__ == "__main__":
    budget, out = int(sys.argv[1]), sys.argv[2]
    name = sys.argv[3] if len(sys.argv) > 3 else "fsdp"
    layout = {"fsdp": {}, "tp2": {"tensor_parallel_size": 2}, "pp2": {"pipeline_parallel_size": 2},
              "moe-ddp": {"data_parallel_mode": "ddp"}, "moe-ep2": {"expert_parallel_size": 2}}[name]
    strategy = Picotron3DStrategy(memory_budget=budget, timeout=timedelta(seconds=300),
                                  **{"data_parallel_mode": "fsdp", **layout})
    recorder = RecordLoss()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[recorder])
    if name.startswith("moe"):
        model = CausalLMModule("tiny-moe", learning_rate=1e-2, seed=0)
    else:
        model = CausalLMModule("tiny", config={"num_layers": 4}, learning_rate=1e-2, seed=0)
    trainer.fit(model, DataLoader(TokenDataset(token_data(128, 16, 256, 1234)), batch_size=16))
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump({"losses": recorder.losses, "policy": strategy.memory_policy.policy.name,
                       "checkpointing": strategy.options.memory.activation_checkpointing,
                       "checkpoint_every": strategy.options.memory.checkpoint_every,
                       "data_parallel_mode": strategy.data_parallel_mode}, f)
