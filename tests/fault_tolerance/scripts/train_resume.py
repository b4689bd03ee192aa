"""A user's training script under torchrun; one rank can be killed to test the restart.

``python -m torch.distributed.run --nproc-per-node=N --max-restarts=1 train_resume.py SPEC.json OUT_DIR``

SPEC: ``{"strategy": {...}, "model": {...}, "steps": 6, "micro_batch": 2, "samples": 16,
"checkpoint_every": 2, "accumulate": 1, "kill": {"rank": 1, "step": 3, "during_save": false}}``.
``kill`` applies to the first start only (``TORCHELASTIC_RESTART_COUNT == 0``): that rank SIGKILLs itself
at the end of that step, or, with ``during_save``, while saving that step's checkpoint, after every rank's
shards are written and before the completeness marker. Global rank 0 appends to ``OUT_DIR/attempts.json``
one entry per start: the per-step global-batch losses by step, and the checkpoint it resumed from.
"""

from __future__ import annotations

import json
import os
import signal
import sys
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

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class Tokens(Dataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(Picotron3DStrategy):
    """On the first start, ``rank`` dies while step ``step``'s checkpoint is written (shards on disk, no marker)."""

    def __init__(self, kill: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kill = kill

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if ATTEMPT == 0 and checkpoint["global_step"] == self.kill["step"]:
            import torch.distributed.checkpoint as dcp

            partial = Path(str(filepath) + ".partial")
            if self.global_rank == 0:
                partial.mkdir(parents=True)
            self.barrier()
            state = {"model": checkpoint["state_dict"]}
            state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint["optimizer_states"])})
            dcp.save(state, checkpoint_id=str(partial))  # every rank's shards, as the strategy writes them
            if self.global_rank == self.kill["rank"]:
                _die()  # before meta.pt and the marker
            self.barrier()  # the others wait here until the launcher stops them
        super().save_checkpoint(checkpoint, filepath, storage_options)


class Record(L.Callback):
    def __init__(self, out: Path, kill: dict[str, Any] | None) -> None:
        self.out, self.kill = out, kill
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        loss = float(trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean"))
        if trainer.fit_loop._should_accumulate():
            return
        self.losses[trainer.global_step] = loss * trainer.accumulate_grad_batches
        if trainer.is_global_zero:
            self._write(trainer)
        kill = self.kill
        if kill and not kill.get("during_save") and ATTEMPT == 0 and trainer.global_step == kill["step"] \
                and trainer.global_rank == kill["rank"]:
            _die()

    def _write(self, trainer: L.Trainer) -> None:
        path = self.out / "attempts.json"
        attempts = json.loads(path.read_text()) if path.exists() else {}
        resumed = trainer.strategy._fault_tolerance.resumed_from
        attempts[str(ATTEMPT)] = {"losses": self.losses, "world_size": trainer.world_size,
                                  "resumed_from": str(resumed) if resumed else None}
        path.write_text(json.dumps(attempts))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    kill = spec.get("kill")
    kwargs = dict(spec.get("strategy", {}))
    strategy = KillDuringSave(kill, **kwargs) if kill and kill.get("during_save") else Picotron3DStrategy(**kwargs)
    accumulate = spec.get("accumulate", 1)
    trainer = L.Trainer(
        accelerator="cpu", devices=int(os.environ["LOCAL_WORLD_SIZE"]), strategy=strategy, max_steps=spec["steps"],
        accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Record(out, kill), ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=-1, filename="{step}",
                                                      every_n_train_steps=spec["checkpoint_every"])],
    )
    data = token_data(spec["samples"])
    trainer.fit(build_module(spec.get("model", {})), DataLoader(Tokens(data), batch_size=spec["micro_batch"]))


if __name__ == "__main__":
    main()
