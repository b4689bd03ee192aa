"""Trainer runs with picotron3d tensor parallelism for any LightningModule, with probes of what was sharded."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils.data import DataLoader

from picotron_lightning import Picotron3DStrategy
from picotron_lightning.testing import COLLECTIVE_TIMEOUT
from tests.fitting import fit_and_record
from tests.parity import TokenDataset, make_module, train_reference
from tests.tensor.tp_models import LMModule

RTOL = 1e-4


def make(kind: str) -> Any:
    """A fresh, identically initialised module: ``llama`` (reference) or a kind from ``tp_models``."""
    if kind.startswith("llama"):
        # "llama_mha": 4 kv heads, so that tp=4 divides them (the tiny preset has 2).
        return make_module(config={"num_kv_heads": 4} if kind == "llama_mha" else None)
    return LMModule(kind)


def reference(kind: str, data: torch.Tensor, steps: int, global_batch: int, clip: float | None = None,
              shuffle: bool = True) -> dict[str, list[float]]:
    """One process, plain loop, the Trainer's DistributedSampler order (seed 0 + epoch; Fabric: ``shuffle=False``)."""
    out = train_reference(make(kind), data, steps, global_batch, clip=clip, shuffle=shuffle)
    return {"losses": out["losses"], "norms": out["norms"]}


def fit(world: int, kind: str, data: torch.Tensor, micro_batch: int, steps: int, strategy_kwargs: dict,
        clip: float | None = None, ckpt_dir: str | None = None, resume_from: str | None = None) -> dict[str, Any]:
    """``Trainer.fit`` on this rank; returns its per-step losses and probes of the sharding."""
    import lightning as L
    from torch.distributed.tensor import DTensor


    probes: dict[str, Any] = {}

    class ShardingProbe(L.Callback):
        def on_train_start(self, trainer, pl_module):  # noqa: ANN001
            plan = trainer.strategy.parallel_model.tensor_plan
            params = list(pl_module.parameters())
            probes["local_numel"] = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
            probes["global_numel"] = sum(p.numel() for p in params)
            if plan is None:
                return
            probes["source"] = plan.source
            probes["sequence_parallel"] = plan.sequence_parallel
            probes["styles"] = dict(plan.styles)
            probes["fused"] = dict(plan.fused)
            probes["local_shapes"] = {n: tuple(_local(p).shape) for n, p in pl_module.named_parameters()}
            probes["state_shapes"] = {n: tuple(t.shape) for n, t in pl_module.state_dict().items()}
            modules = dict(pl_module.named_modules())
            norms = plan.modules_with("norm")
            if norms:
                modules[norms[0]].register_forward_pre_hook(
                    lambda m, a: probes.setdefault("norm_input_shape", tuple(_local(a[0]).shape)) and None)
            heads = plan.modules_with("head")
            if heads:
                modules[heads[0]].register_forward_hook(
                    lambda m, a, o: probes.setdefault("logits_type", type(o).__name__) and None)

    strategy = Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, **strategy_kwargs)
    fitted = fit_and_record(
        make(kind), DataLoader(TokenDataset(data), batch_size=micro_batch), callbacks=[ShardingProbe()],
        ckpt_dir=ckpt_dir, resume_from=resume_from, strategy=strategy, devices=world, max_steps=steps,
        gradient_clip_val=clip,
    )
    return {"losses": fitted.losses, **probes}


def fabric_fit(world: int, kind: str, data: torch.Tensor, micro_batch: int, steps: int, strategy_kwargs: dict,
               loss_parallel: bool = False) -> dict[str, Any]:
    """An ordinary Fabric loop (the loader's own order) on this rank; its per-step losses."""
    import lightning as L
    import torch.nn.functional as F

    from picotron_lightning import Picotron3DFabricStrategy

    strategy = Picotron3DFabricStrategy(timeout=COLLECTIVE_TIMEOUT, loss_parallel=loss_parallel, **strategy_kwargs)
    fabric = L.Fabric(strategy=strategy, accelerator="cpu", devices=world)
    fabric.launch()
    module = make(kind)
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    batches = iter(fabric.setup_dataloaders(DataLoader(TokenDataset(data), batch_size=micro_batch, shuffle=False)))
    losses = []
    for _ in range(steps):
        batch = next(batches)
        logits = model(batch[:, :-1])
        with fabric.strategy.loss_parallel() if loss_parallel else contextlib.nullcontext():
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(_local(loss)))
    return {"losses": losses, "logits_type": type(logits).__name__}


def _local(x: Any) -> torch.Tensor:
    return x.to_local() if hasattr(x, "to_local") else x


def refusal(world: int, kind: str, strategy_kwargs: dict) -> str:
    """The message with which ``Trainer.fit`` refuses the layout (empty string if it did not)."""
    try:
        fit(world, kind, torch.zeros(8, 17, dtype=torch.long), 2, 1, strategy_kwargs)
    except Exception as err:  # noqa: BLE001 - the message is what the test checks
        return f"{type(err).__name__}: {err}"
    return ""
