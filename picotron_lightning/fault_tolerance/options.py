"""``FaultToleranceOptions``: how a run survives a dead rank (resume, checkpoint safety, heartbeats)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RESUME_MODES = ("on_restart", "auto", "never")


@dataclass(frozen=True, kw_only=True)
class FaultToleranceOptions:
    """Automatic resume, complete-only checkpoints, asynchronous saving and dead-rank detection."""

    resume: Literal["on_restart", "auto", "never"] = "on_restart"
    """Where ``fit`` starts when no ``ckpt_path`` is given. ``"on_restart"``: from the newest complete checkpoint
    in the Trainer's ``ModelCheckpoint`` directories when the launcher restarted the group (torchrun's
    ``--max-restarts``: ``TORCHELASTIC_RESTART_COUNT > 0``; SLURM requeue: ``SLURM_RESTART_COUNT > 0``), from
    scratch otherwise. ``"auto"``: from the newest complete checkpoint whenever one exists. ``"never"``: never
    resume by itself. An explicit ``fit(ckpt_path=...)`` always wins."""

    async_checkpointing: bool = False
    """Write checkpoints with DCP's ``async_save``: the step waits only for the copy of the state into host
    memory, the write to disk runs in a background thread (on its own gloo process group)."""

    max_checkpoints_in_flight: int = 1
    """With ``async_checkpointing``: how many asynchronous saves may be unfinished at once; a new save first
    waits for the oldest (each in-flight save holds a host-memory copy of this rank's state)."""

    keep_last_checkpoints: int | None = None
    """Keep only the newest this many complete checkpoints in a checkpoint directory (older ones are removed
    after each save completes); ``None`` keeps all (``ModelCheckpoint(save_top_k=...)`` still applies)."""

    heartbeat_timeout: float | None = 15.0
    """Seconds without a heartbeat after which a rank is declared dead: every other rank prints its identity
    and stops (exit code 75), so the launcher can restart the group at once instead of waiting for the
    collective timeout. Heartbeats go through the process group's store (a thread per rank beats about every
    ``heartbeat_timeout / 10`` seconds). ``None`` turns detection off."""

    heartbeat_exit_code: int = field(default=75, metadata={"flat": None})
    """Exit code of a rank that stops because another rank is dead (``EX_TEMPFAIL``: try again)."""

    def __post_init__(self) -> None:
        if self.resume not in RESUME_MODES:
            raise ValueError(f"`resume={self.resume!r}` is not supported; use one of {RESUME_MODES} "
                             "(or pass `ckpt_path=` to `fit` to resume from one checkpoint).")
        if not isinstance(self.async_checkpointing, bool):
            raise ValueError(f"`async_checkpointing` must be True or False, got {self.async_checkpointing!r}.")
        n = self.max_checkpoints_in_flight
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`max_checkpoints_in_flight={n!r}` must be an integer >= 1.")
        k = self.keep_last_checkpoints
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"`keep_last_checkpoints={k!r}` must be an integer >= 1 or None (keep all).")
        t = self.heartbeat_timeout
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0):
            raise ValueError(f"`heartbeat_timeout={t!r}` must be a positive number of seconds or None (off).")
