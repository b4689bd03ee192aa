"""A user's training script under torchrun; one rank can be killed to test the restart.

``python -m torch.distributed.run --nproc-per-node=N --max-restarts=1 train_resume.py SPEC.json OUT_DIR``

SPEC: ``{"strategy": {...}, "model": {...}, "steps": 6, "micro_batch": 2, "samples": 16,
"checkpoint_every": 2, "kill": {"rank": 1, "step": 3, "during_save": false}, "late_start": {"rank": 1,
"seconds": 8}, "attempt": 0, "devices": 2}``.

* ``kill`` applies to the first start only (``TORCHELASTIC_RESTART_COUNT`` + ``attempt`` is 0): that
  rank SIGKILLs itself at the end of that step, or, with ``during_save``, while it writes that step's
  checkpoint: a thread kills the process as soon as this rank's DCP shard file appears in the ``.partial``
  directory (the shards of the others may or may not be written; the marker never is).
* ``late_start``: on a restart, that rank sleeps before creating its Trainer, so its peers reach the
  process group's store first (the order in which torchrun's restarted workers read stale keys).
* ``kill.agent``: the killing worker (``local_rank`` of this agent, in place of ``rank``) SIGKILLs its torchrun
  agent and every worker of that agent, then itself: a whole node is lost (torchrun starts each worker in a
  session of its own, so the agent's process group would not take them with it).
* ``global_batch`` (in place of ``micro_batch``): the batch of all data-parallel ranks together; each rank's
  DataLoader gets ``global_batch / dp`` of the world it runs in, so a start with fewer ranks keeps the
  global batch (the strategy, like Lightning, takes the DataLoader's ``batch_size`` as per rank).
* ``devices``: for Lightning's own launcher (``python train_resume.py``); under torchrun the local world size.
* ``precision``: ``AdaptivePrecision`` arguments, with ``scaler`` as ``AdaptiveLossScaler`` arguments;
  ``anomaly``: ``AnomalyDetector`` arguments. With either, each entry of ``attempts.json`` also holds
  ``states``: the plugin's and the detector's ``state_dict`` as Lightning put them into each checkpoint
  (``saved``, by step), as they were when training started (``at_start``: after a resume, the restored ones)
  and after each step (``after_step``).

Global rank 0 writes ``OUT_DIR/attempts.json``: one entry per start with the per-step global-batch losses
by step, the world size, the checkpoint it resumed from, and whether the process group's store still held
a key that the first start's rank 0 wrote into its own (``saw_first_start_key``: torchrun keeps its store
across restarts; a restarted group must not read what the dead one left there).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "user_path" / "scripts"))
from user_models import build_module  # noqa: E402

from picotron_lightning import Picotron3DStrategy  # noqa: E402
from picotron_lightning.testing import token_data  # noqa: E402

SPEC = json.loads(Path(sys.argv[1]).read_text())
# This start of the run: the launcher's restarts plus the starts the test made by hand (``attempt``).
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) + int(SPEC.get("attempt", 0))

FIRST_START_KEY = "train_resume/first_start"


class Tokens(Dataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


class TokenData(L.LightningDataModule):
    """The run's samples; ``global_batch`` is split over the data-parallel ranks of the world this start has."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec

    def train_dataloader(self) -> DataLoader:
        micro_batch = self.spec.get("micro_batch")
        if micro_batch is None:  # called after the strategy's setup, when the data-parallel size is known
            micro_batch = self.spec["global_batch"] // self.trainer.strategy.distributed_sampler_kwargs["num_replicas"]
        return DataLoader(Tokens(token_data(self.spec["samples"])), batch_size=micro_batch)


def _die(how: str = "SIGKILL") -> None:
    """SIGKILL: the process is gone (its sockets close). SIGSTOP: it hangs like a lost node (sockets stay open)."""
    print(f"train_resume: rank {os.environ.get('RANK', '0')} (pid {os.getpid()}) sends itself {how} at "
          f"{time.time():.3f}", flush=True)
    os.kill(os.getpid(), getattr(signal, how))


class KillDuringSave(Picotron3DStrategy):
    """On the first start, ``rank`` dies while it writes step ``step``'s checkpoint (its shard file just appeared)."""

    def __init__(self, kill: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kill = kill

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if ATTEMPT == 0 and checkpoint["global_step"] == self.kill["step"] and self.global_rank == self.kill["rank"]:
            partial = Path(str(filepath) + ".partial")
            threading.Thread(target=_kill_when_written, args=(partial, self.global_rank), daemon=True).start()
        super().save_checkpoint(checkpoint, filepath, storage_options)


def _states(trainer: L.Trainer) -> dict[str, Any]:
    """The precision plugin's and the AnomalyDetector's state now (JSON, so saved and restored compare alike)."""
    from picotron_lightning import AdaptivePrecision, AnomalyDetector

    plugin = trainer.precision_plugin
    detector = next((c for c in trainer.callbacks if isinstance(c, AnomalyDetector)), None)
    return json.loads(json.dumps({
        "precision": plugin.state_dict() if isinstance(plugin, AdaptivePrecision) else None,
        "anomaly": detector.state_dict() if detector is not None else None}, default=str))


def _register_worker(out: Path) -> None:
    """Note this worker's pid under its agent's pid, so that a worker can take its whole node down."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        node = out / "workers" / str(os.getppid())
        node.mkdir(parents=True, exist_ok=True)
        (node / str(os.getpid())).touch()


def _kill_node() -> None:
    """SIGKILL this worker's torchrun agent first (so it cannot restart anyone), then its other workers, then self."""
    agent = os.getppid()
    print(f"train_resume: rank {os.environ.get('RANK')} kills its agent (pid {agent}) and its workers at "
          f"{time.time():.3f}", flush=True)
    os.kill(agent, signal.SIGKILL)
    for worker in (Path(sys.argv[2]) / "workers" / str(agent)).iterdir():
        if int(worker.name) != os.getpid():
            try:
                os.kill(int(worker.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
    _die()


def _kill_when_written(partial: Path, rank: int) -> None:
    while not any(partial.glob(f"__{rank}_*.distcp")):  # DCP's file name for this rank's shards
        time.sleep(0.001)
    _die()


class Record(L.Callback):
    def __init__(self, out: Path, kill: dict[str, Any] | None) -> None:
        self.out, self.kill = out, kill
        self.losses: dict[int, float] = {}
        self.saw_first_start_key: bool | None = None
        self.states: dict[str, Any] = {"saved": {}, "at_start": None, "after_step": {}}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        from picotron_lightning import AnomalyDetector

        detector = next((c for c in trainer.callbacks if isinstance(c, AnomalyDetector)), None)
        self.states["saved"][checkpoint["global_step"]] = json.loads(json.dumps({
            "precision": checkpoint.get(type(trainer.precision_plugin).__qualname__),
            "anomaly": checkpoint["callbacks"].get(detector.state_key) if detector is not None else None},
            default=str))
        if trainer.is_global_zero:  # ModelCheckpoint saves after this callback's on_train_batch_end wrote the step
            self._write(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.states["at_start"] = _states(trainer)
        if not trainer.is_global_zero or not torch.distributed.is_initialized():
            return
        store = torch.distributed.distributed_c10d._get_default_store()  # the process group's store
        if ATTEMPT == 0:
            store.set(FIRST_START_KEY, "written by the first start")
        else:
            self.saw_first_start_key = store.check([FIRST_START_KEY])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        loss = float(trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean"))
        if trainer.fit_loop._should_accumulate():
            return
        self.losses[trainer.global_step] = loss * trainer.accumulate_grad_batches
        self.states["after_step"][trainer.global_step] = _states(trainer)
        if trainer.is_global_zero:
            self._write(trainer)
        kill = self.kill
        if kill and not kill.get("during_save") and ATTEMPT == 0 and trainer.global_step == kill["step"]:
            if kill.get("agent") and trainer.local_rank == kill["local_rank"]:
                _kill_node()
            elif not kill.get("agent") and trainer.global_rank == kill["rank"]:
                _die(kill.get("signal", "SIGKILL"))

    def _write(self, trainer: L.Trainer) -> None:
        path = self.out / "attempts.json"
        attempts = json.loads(path.read_text()) if path.exists() else {}
        resumed = trainer.strategy._fault_tolerance.resumed_from
        attempts[str(ATTEMPT)] = {"losses": self.losses, "world_size": trainer.world_size,
                                  "resumed_from": str(resumed) if resumed else None,
                                  "async_saves": trainer.strategy._fault_tolerance.writer.async_saves,
                                  "saw_first_start_key": self.saw_first_start_key, "states": self.states}
        path.write_text(json.dumps(attempts))


def main() -> None:
    spec = SPEC
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    _register_worker(out)
    late = spec.get("late_start")
    if late and ATTEMPT > 0 and int(os.environ.get("RANK", "0")) == late["rank"]:
        time.sleep(late["seconds"])
    kill = spec.get("kill")
    kwargs = dict(spec.get("strategy", {}))
    strategy = KillDuringSave(kill, **kwargs) if kill and kill.get("during_save") else Picotron3DStrategy(**kwargs)
    accumulate = spec.get("accumulate", 1)
    plugins: list[Any] = []
    if spec.get("precision") is not None:
        from picotron_lightning import AdaptivePrecision
        from picotron_lightning.precision import AdaptiveLossScaler

        precision = dict(spec["precision"])
        scaler = precision.pop("scaler", None)
        plugins.append(AdaptivePrecision(**precision, scaler=AdaptiveLossScaler(**scaler) if scaler else None))
    callbacks: list[L.Callback] = []
    if spec.get("anomaly") is not None:
        from picotron_lightning import AnomalyDetector

        callbacks.append(AnomalyDetector(**spec["anomaly"]))
    trainer = L.Trainer(
        accelerator="cpu", devices=int(os.environ.get("LOCAL_WORLD_SIZE", spec.get("devices", 1))),
        num_nodes=int(os.environ.get("GROUP_WORLD_SIZE", 1)), strategy=strategy, max_steps=spec["steps"],
        accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False, enable_model_summary=False,
        plugins=plugins,
        callbacks=[*callbacks, Record(out, kill), ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=-1,
                                                                  filename="{step}",
                                                                  every_n_train_steps=spec["checkpoint_every"])],
    )
    trainer.fit(build_module(spec.get("model", {})), datamodule=TokenData(spec))


if __name__ == "__main__":
    main()
