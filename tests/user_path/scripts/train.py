"""A user's training script: ``python train.py SPEC.json OUT.json``; Lightning starts the ranks.

SPEC is ``{"devices": N, "num_nodes": 1, "api": "trainer" | "fabric", "start_method": "popen" | "spawn",
"runs": [RUN, ...]}``; each RUN trains one layout on the same fixed tokens and global rank 0 writes
the per-step global-batch losses (``strategy.reduce(loss, "mean")``, the data-parallel mean) to OUT:

    {"name": ..., "strategy": {Picotron3DStrategy arguments}, "model": {"kind": "llama" | "moe" | "gpt" | "gpt2"},
     "steps": 6, "micro_batch": 2, "samples": 48, "precision": {AdaptivePrecision arguments} (optional),
     "monitoring": true (optional), "checkpoint_every": n (optional), "resume": "<run name>@<step>" (optional),
     "inject_oom": [{OOMAt arguments}, ...] (optional: test tooling that raises torch.OutOfMemoryError there),
     "accumulate": M (optional: Trainer(accumulate_grad_batches=M))}

Nothing here sets up processes or environment variables: it is the script a user would write.
Several runs share one launch, as several ``Trainer.fit`` calls in one script do under Lightning's ``ddp``.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from user_models import build_module, vocab_size

import picotron_lightning  # noqa: F401 - registers "picotron3d"
from picotron_lightning import Picotron3DFabricStrategy, Picotron3DStrategy, forward_backward
from picotron_lightning.parallel.compile import compiled_blocks
from picotron_lightning.testing import TokenDataset, token_data

TIMEOUT = timedelta(seconds=120)  # a collective that waits longer than this fails the run instead of hanging


def write_result(out: Path, name: str, result: dict) -> None:
    results = json.loads(out.read_text()) if out.exists() else {}
    results[name] = result
    out.write_text(json.dumps(results))


class RecordLoss(L.Callback):
    """The global-batch mean loss of every step (a collective on every rank); global rank 0 writes them.

    Written from the rank itself, so it works however the ranks were started (spawned ranks do not
    run the rest of the script).
    """

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name = out, name
        self.losses: list[float] = []
        self.extra: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")))

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        strategy = trainer.strategy
        if trainer.is_global_zero:
            write_result(self.out, self.name, {
                "losses": self.losses, "layout": str(strategy.layout), "world_size": trainer.world_size,
                "data_parallel_mode": strategy.data_parallel_mode,
                "precision_mode": getattr(getattr(trainer.precision_plugin, "plan", None), "mode", None),
                "compiled_blocks": compiled_blocks(pl_module), "memory": memory_applied(strategy, pl_module),
                **self.extra})


def memory_applied(strategy: Any, module: Any) -> dict[str, Any]:
    """What of the memory options took effect: checkpointed blocks, the budget's policy, offloaded bytes."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    groups = [m._get_fsdp_state()._fsdp_param_group for m in module.modules() if isinstance(m, FSDPModule)]
    chosen = strategy.memory_policy
    return {"checkpointed_blocks": sum(isinstance(m, CheckpointWrapper) for m in module.modules()),
            "policy": None if chosen is None else chosen.policy.name, "reason": strategy.memory_policy_reason,
            "offloaded_activation_bytes": strategy.offloaded_activation_bytes,
            "cpu_offload": any(isinstance(g.offload_policy, CPUOffloadPolicy) for g in groups if g is not None)}


def train_with_trainer(spec: dict, run: dict, out: Path) -> None:
    strategy = Picotron3DStrategy(timeout=TIMEOUT, start_method=spec.get("start_method", "popen"),
                                  **run.get("strategy", {}))
    out_dir = out.parent
    callbacks: list[Any] = [RecordLoss(out, run["name"])]
    plugins: list[Any] = []
    logger: Any = False
    if run.get("precision") is not None:
        from picotron_lightning import AdaptivePrecision

        plugins.append(AdaptivePrecision(**run["precision"]))
    if run.get("monitoring"):
        from lightning.pytorch.loggers import TensorBoardLogger

        from picotron_lightning import AlertManager, AnomalyDetector, MetricsCollector

        logger = TensorBoardLogger(str(out_dir / "tb"), name=run["name"])
        callbacks += [MetricsCollector(log_every_n_steps=1, histogram_every_n_steps=2), AnomalyDetector(),
                      AlertManager()]
    if run.get("inject_oom"):
        from picotron_lightning.testing_memory import InjectOOM, OOMAt

        callbacks.append(InjectOOM([OOMAt(**entry) for entry in run["inject_oom"]]))
    ckpt_dir = out_dir / "checkpoints" / run["name"]
    if run.get("checkpoint_every"):
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_train_steps=run["checkpoint_every"],
                                         filename="{step}"))
    resume = None
    if run.get("resume"):
        name, step = run["resume"].split("@")
        resume = str(out_dir / "checkpoints" / name / f"step={step}.ckpt")
    trainer = L.Trainer(
        accelerator="cpu", devices=spec["devices"], num_nodes=spec.get("num_nodes", 1), strategy=strategy,
        plugins=plugins, max_steps=run["steps"], accumulate_grad_batches=run.get("accumulate", 1),
        logger=logger, log_every_n_steps=1, callbacks=callbacks,
        enable_checkpointing=bool(run.get("checkpoint_every")), enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = build_module(run.get("model", {}))
    data = token_data(run["samples"], vocab_size=vocab_size(run.get("model", {})))
    if strategy.options.memory.oom_recovery:  # what the recovery agreed, and what the monitors received
        recorder = callbacks[0]
        recorder.extra["oom_events"] = []
        recorder.extra["alerts"] = {}

        class RecordRecovery(L.Callback):
            def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
                recorder.extra["oom_events"] = strategy.oom_recovery.events
                alerts = [c for c in trainer.callbacks if hasattr(c, "counts")]
                recorder.extra["alerts"] = dict(alerts[0].counts) if alerts else {}
                collectors = [c for c in trainer.callbacks if hasattr(c, "history")]
                recorder.extra["oom_metrics"] = [m.get("memory/oom_retries") for _, m in collectors[0].history
                                                 if "memory/oom_retries" in m] if collectors else []

        trainer.callbacks.insert(0, RecordRecovery())
    trainer.fit(module, DataLoader(TokenDataset(data), batch_size=run["micro_batch"], shuffle=False), ckpt_path=resume)


def next_token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def train_with_fabric(spec: dict, run: dict, out: Path) -> None:
    """A plain Fabric loop. ``forward_backward`` runs it under every layout; ``clip``, ``save_at`` (a step
    after which ``fabric.save`` writes model, optimizer and step) and ``resume`` ("<run>@<step>": ``fabric.load``
    that checkpoint, then train the remaining steps) exercise the rest of a Fabric loop."""
    fabric = L.Fabric(accelerator="cpu", devices=spec["devices"], num_nodes=spec.get("num_nodes", 1),
                      strategy=Picotron3DFabricStrategy(timeout=TIMEOUT, **run.get("strategy", {})))
    data = TokenDataset(token_data(run["samples"], vocab_size=vocab_size(run.get("model", {}))))
    module = build_module(run.get("model", {}))
    if "memory_budget" in run.get("strategy", {}):  # chosen before launch, on one micro-batch as the loop feeds it
        fabric.strategy.choose_memory_policy(module, torch.stack([data[i] for i in range(run["micro_batch"])]))
    fabric.launch()
    optimizer = module.configure_optimizers()
    model, optimizer = fabric.setup(module, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=run["micro_batch"]))
    checkpoints = out.parent / "fabric_checkpoints"
    start = 0
    if run.get("resume"):
        name, step = run["resume"].split("@")
        state = {"model": model, "optimizer": optimizer, "step": 0}
        fabric.load(checkpoints / name / f"step={step}", state)
        start = state["step"]
    losses = []
    batches = iter(loader)
    direct_call_error = None
    if run.get("try_direct_call"):  # under pp a rank holds only its stages: `model(x)` must say what to do instead
        try:
            model(data[0][None, :-1])
        except RuntimeError as error:
            direct_call_error = str(error)
    for _ in range(start):
        next(batches)  # the batches the checkpointed run already trained on (Fabric keeps the loader's order)
    for step in range(start, run["steps"]):
        batch = next(batches)
        if run.get("forward_backward"):  # the loop that runs under every layout, pipelines included
            loss = forward_backward(fabric, model, batch[:, :-1], batch[:, 1:], next_token_loss)
        else:  # the plain Fabric loop
            loss = next_token_loss(model(batch[:, :-1]), batch[:, 1:])
            fabric.backward(loss)
        if run.get("clip"):
            fabric.clip_gradients(model, optimizer, max_norm=run["clip"])
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(fabric.all_reduce(loss.detach(), reduce_op="mean")))
        if run.get("save_at") == step + 1:
            fabric.save(checkpoints / run["name"] / f"step={step + 1}",
                        {"model": model, "optimizer": optimizer, "step": step + 1})
    if fabric.is_global_zero:
        write_result(out, run["name"], {"losses": losses, "layout": str(fabric.strategy.layout),
                                        "world_size": fabric.world_size, "direct_call_error": direct_call_error,
                                        "memory": memory_applied(fabric.strategy, module)})


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    for run in spec["runs"]:
        if spec.get("api", "trainer") == "fabric":
            train_with_fabric(spec, run, out)
        else:
            train_with_trainer(spec, run, out)


if __name__ == "__main__":
    main()
