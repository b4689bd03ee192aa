"""How the strategies use fault tolerance: heartbeats, resume, checkpoint extras, the data position.

One :class:`FaultToleranceRuntime` per strategy. The Trainer strategy calls it at five points: after the
process group exists (:meth:`start`), at the end of ``setup`` (:meth:`resume`), for each training
loader (:meth:`process_dataloader`), around each save and load (:meth:`add_to_checkpoint`,
:meth:`restore_from_checkpoint`), and at teardown (:meth:`stop`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from picotron_lightning.fault_tolerance.data_order import ResumableSampler, make_resumable, samples_consumed
from picotron_lightning.fault_tolerance.heartbeat import Heartbeat
from picotron_lightning.fault_tolerance.options import FaultToleranceOptions
from picotron_lightning.fault_tolerance.resume import newest_complete_checkpoint, restart_count, wants_resume
from picotron_lightning.fault_tolerance.rng import gather_rng_states, restore_rng_states
from picotron_lightning.fault_tolerance.writer import CheckpointWriter

CHECKPOINT_KEY = "picotron3d_fault_tolerance"


class FaultToleranceRuntime:
    """The fault-tolerance state of one Trainer strategy (see the module docstring)."""

    def __init__(self, options: FaultToleranceOptions) -> None:
        self.options = options
        self.writer = CheckpointWriter(options.async_checkpointing, options.max_checkpoints_in_flight,
                                       options.keep_last_checkpoints)
        self._heartbeat: Heartbeat | None = None
        self._sampler: ResumableSampler | None = None
        self._batch_size = 1
        self._pending_position: dict[str, int] | None = None
        self.resumed_from: Path | None = None
        """The checkpoint this run resumed from by itself (None: it started from scratch or from ``ckpt_path``)."""

    # ------------------------------------------------------------------ heartbeats
    def start(self) -> None:
        """Start this rank's heartbeat (every rank; after the process group exists)."""
        if self.options.heartbeat_timeout is None or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        self._heartbeat = Heartbeat(self.options.heartbeat_timeout, self.options.heartbeat_exit_code, restart_count())
        dist.barrier()  # every rank's first beat is in the store before anyone watches
        self._heartbeat.start()

    def stop(self, succeeded: bool = True) -> None:
        """At teardown. After success (every rank): finish asynchronous saves, say "done", stop the heartbeat,
        and wait for every rank to get here (the store a rank leaves with may be the one the others watch).
        After a failure: stop beating without saying "done", so the other ranks report this one and stop."""
        heartbeat, self._heartbeat = self._heartbeat, None
        if not succeeded:
            if heartbeat is not None:
                heartbeat.stop(done=False)
            return
        try:
            self.writer.wait()
        finally:
            if heartbeat is not None:
                heartbeat.stop(done=True)
        if dist.is_initialized():
            dist.barrier()

    def stop_at_exit(self) -> None:
        """At interpreter exit (Fabric scripts have no teardown): say "done", without waiting for the others."""
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop(done=True)

    # ------------------------------------------------------------------ resume
    def resume(self, trainer: Any, strategy: Any) -> None:
        """Pre-load the newest complete checkpoint when the ``resume`` option asks for it (every rank).

        Called at the end of the strategy's ``setup``: the ``ModelCheckpoint`` directories are resolved and
        the model and optimizers are sharded. Lightning then restores from the pre-loaded checkpoint exactly
        as from ``fit(ckpt_path=...)`` (a ``ckpt_path`` given to ``fit`` is loaded after this and wins).
        """
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn != TrainerFn.FITTING or not wants_resume(self.options.resume):
            return
        directories = [c.dirpath for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        found = None
        if strategy.global_rank == 0:
            newest = newest_complete_checkpoint(directories)  # also removes what a crash left half-written
            found = str(newest.path) if newest is not None else None
        found = strategy.broadcast(found)
        if found is None:
            rank_zero_info(f"picotron3d: resume={self.options.resume!r}: no complete checkpoint in "
                           f"{directories or 'the ModelCheckpoint directories (there are none)'}; starting fresh.")
            return
        rank_zero_info(f"picotron3d: resuming from the newest complete checkpoint {found} "
                       f"(launcher restart #{restart_count()}).")
        connector = trainer._checkpoint_connector
        connector.resume_start(found)  # Lightning's own loading path: loops, callbacks, precision, optimizers
        self.resumed_from = Path(found)

    # ------------------------------------------------------------------ data order
    def process_dataloader(self, dataloader: Any) -> Any:
        """Make the training loader's distributed sampler resumable inside an epoch."""
        sampler = make_resumable(dataloader)
        if sampler is None:
            return dataloader
        self._sampler, self._batch_size = sampler, int(dataloader.batch_size or 1)
        if self._pending_position is not None:
            self._apply_position(self._pending_position)
        return dataloader

    def _apply_position(self, position: dict[str, int]) -> None:
        assert self._sampler is not None
        saved, now = position.get("samples_per_batch"), self._batch_size * self._sampler.sampler.num_replicas
        if saved is not None and saved != now:
            # Like Lightning, the strategy takes the loader's batch_size as per rank and never rescales it.
            rank_zero_warn(
                f"picotron3d: the checkpoint was written with {saved} samples per batch over all data-parallel "
                f"ranks; this run has {now} (batch_size {self._batch_size} x {self._sampler.sampler.num_replicas} "
                "data-parallel ranks), so it does not continue the same training. To keep the global batch when "
                "the number of data-parallel ranks changes, build the loader in `train_dataloader` with "
                "batch_size = global batch // trainer.strategy.distributed_sampler_kwargs['num_replicas']."
            )
        self._sampler.resume_at(position["epoch"], position["samples_consumed"])
        self._pending_position = None

    # ------------------------------------------------------------------ checkpoint contents
    def add_to_checkpoint(self, checkpoint: dict[str, Any], trainer: Any) -> None:
        """Every rank's RNG states and the data position, into the (rank 0) loop state (a collective)."""
        extra: dict[str, Any] = {"rng_states": gather_rng_states()}
        if self._sampler is not None:
            batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            replicas = self._sampler.sampler.num_replicas
            extra["data_position"] = {"epoch": trainer.current_epoch,
                                      "samples_consumed": samples_consumed(batches_done, self._batch_size, replicas),
                                      "samples_per_batch": self._batch_size * replicas}
        checkpoint[CHECKPOINT_KEY] = extra

    def restore_from_checkpoint(self, checkpoint: dict[str, Any], rank: int) -> None:
        """Restore this rank's RNG states and the data position a checkpoint recorded."""
        extra = checkpoint.get(CHECKPOINT_KEY)
        if not extra:
            return
        if not restore_rng_states(extra.get("rng_states", []), rank):
            rank_zero_warn("picotron3d: the checkpoint was written by a different number of ranks; the random "
                           "number generators keep their fresh states.")
        position = extra.get("data_position")
        if position is not None:
            if self._sampler is not None:
                self._apply_position(position)
            else:
                self._pending_position = position  # the loader is set up after the checkpoint is loaded
