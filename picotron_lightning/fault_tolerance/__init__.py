"""Fault tolerance: a dead rank costs the steps since the last complete checkpoint, not the run.

* :mod:`.completeness`: a checkpoint is complete only when its marker, written last, says so;
  half-written ones are cleaned up; retention of the newest k.
* :mod:`.writer`: synchronous or asynchronous (DCP ``async_save``) sharded saves with that marker.
* :mod:`.resume`: launcher restarts and the newest complete checkpoint of a run.
* :mod:`.data_order` and :mod:`.rng`: the sampler's position in the epoch and every rank's RNG states.
* :mod:`.heartbeat`: dead-rank detection in seconds, through the process group's store.
* :mod:`.runtime`: how the strategies use all of the above.
"""

from picotron_lightning.fault_tolerance.completeness import (
    CompleteCheckpoint,
    clean_incomplete,
    complete_checkpoints,
    is_complete,
    keep_newest,
)
from picotron_lightning.fault_tolerance.heartbeat import Heartbeat
from picotron_lightning.fault_tolerance.options import FaultToleranceOptions
from picotron_lightning.fault_tolerance.resume import newest_complete_checkpoint, restart_count, wants_resume
from picotron_lightning.fault_tolerance.writer import CheckpointWriter

__all__ = [
    "CheckpointWriter",
    "CompleteCheckpoint",
    "FaultToleranceOptions",
    "Heartbeat",
    "clean_incomplete",
    "complete_checkpoints",
    "is_complete",
    "keep_newest",
    "newest_complete_checkpoint",
    "restart_count",
    "wants_resume",
]
