"""The one fit-and-record helper: a quiet CPU ``Trainer`` that records the loss of every training micro-batch.

Every test that runs ``Trainer.fit`` and compares its losses goes through :func:`fit_and_record`
(or, when it drives the Trainer itself, :func:`quiet_trainer` with a :class:`LossRecorder`), so
"the loss of a step" means the same thing everywhere: the value the user's ``training_step``
returned, as one process computes it. The one-process reference loop is
:func:`tests.parity.train_reference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class LossRecorder(L.Callback):
    """Collects the loss of every training micro-batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning reports the loss divided by the accumulation factor; undo that.
        self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)


def quiet_trainer(*, callbacks: Sequence[L.Callback] = (), ckpt_dir: str | None = None, **kwargs: Any) -> L.Trainer:
    """A CPU ``Trainer`` without logger, progress bar or model summary; ``kwargs`` go to ``L.Trainer``.

    With ``ckpt_dir`` it saves a checkpoint after every epoch there (and only then checkpoints at all).
    """
    callbacks = list(callbacks)
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1))
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("logger", False)
    return L.Trainer(enable_checkpointing=bool(ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, **kwargs)


@dataclass
class Fitted:
    """What :func:`fit_and_record` hands back."""

    trainer: L.Trainer
    """The trainer after ``fit`` (its strategy, ``callback_metrics``, ``global_rank``)."""

    losses: list[float]
    """This rank's loss of every training micro-batch, in order."""


def fit_and_record(module: L.LightningModule, train: Any, val: Any = None, *, callbacks: Sequence[L.Callback] = (),
                   ckpt_dir: str | None = None, resume_from: str | None = None, **trainer_kwargs: Any) -> Fitted:
    """``quiet_trainer(**trainer_kwargs).fit(module, train, val)`` recording every micro-batch's loss."""
    recorder = LossRecorder()
    trainer = quiet_trainer(callbacks=[recorder, *callbacks], ckpt_dir=ckpt_dir, **trainer_kwargs)
    trainer.fit(module, train, val, ckpt_path=resume_from)
    return Fitted(trainer=trainer, losses=recorder.losses)
