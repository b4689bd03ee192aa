"""Where a (re)started run resumes: detecting a launcher restart and finding the newest complete checkpoint."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from picotron_lightning.fault_tolerance.completeness import (
    CompleteCheckpoint,
    clean_incomplete,
    complete_checkpoints,
)

# Set by the launcher in every rank it restarts: torchrun (--max-restarts) and SLURM (--requeue).
RESTART_VARIABLES = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """How many times the launcher has restarted this group (0 on the first start or without such a launcher)."""
    environ = os.environ if environ is None else environ
    counts = []
    for name in RESTART_VARIABLES:
        try:
            counts.append(int(environ.get(name, "0")))
        except ValueError:
            counts.append(0)
    return max(counts)


def wants_resume(mode: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the ``resume`` option asks to look for a checkpoint on this start."""
    if mode == "auto":
        return True
    if mode == "on_restart":
        return restart_count(environ) > 0
    return False


def newest_complete_checkpoint(directories: Iterable[str | Path], clean: bool = True) -> CompleteCheckpoint | None:
    """The newest complete checkpoint in ``directories`` (by global step, then write time), or None.

    With ``clean``, half-written checkpoints a crash left behind are removed first (call on one rank only).
    """
    found: list[CompleteCheckpoint] = []
    for directory in dict.fromkeys(str(d) for d in directories):
        if clean:
            clean_incomplete(directory)
        found.extend(complete_checkpoints(directory))
    return max(found, key=lambda c: (c.global_step, c.written_at)) if found else None
