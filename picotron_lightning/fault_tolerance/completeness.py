"""Which checkpoints are complete: a marker written last, listing, clean-up of half-written ones, retention.

A sharded checkpoint is written into ``<name>.partial`` by every rank; once every rank's shards and
DCP's ``.metadata`` are on disk, rank 0 writes the loop state (``meta.pt``), then the marker
``COMPLETE`` (a small JSON file, written to a temporary name, flushed and renamed), then renames the
directory to ``<name>``. A directory without the marker is never resumed from, whatever else it holds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

MARKER_FILE = "COMPLETE"
PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"


@dataclass(frozen=True)
class CompleteCheckpoint:
    """A checkpoint directory whose marker says every rank's part is written."""

    path: Path
    global_step: int
    epoch: int
    world_size: int
    written_at: float


def write_marker(directory: Path, global_step: int, epoch: int, world_size: int) -> None:
    """Declare ``directory`` complete. Call last, on one rank, after every rank's shards are written."""
    marker = {"global_step": global_step, "epoch": epoch, "world_size": world_size, "written_at": time.time()}
    tmp = directory / (MARKER_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(directory / MARKER_FILE)


def read_marker(directory: Path) -> CompleteCheckpoint | None:
    """The marker of ``directory``, or None when it has none (not a checkpoint, or not complete)."""
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
        return CompleteCheckpoint(directory, int(marker["global_step"]), int(marker["epoch"]),
                                  int(marker["world_size"]), float(marker["written_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_complete(directory: str | Path) -> bool:
    """Whether ``directory`` holds a checkpoint whose every part was written."""
    return read_marker(Path(directory)) is not None


def complete_checkpoints(directory: str | Path) -> list[CompleteCheckpoint]:
    """Complete checkpoints directly inside ``directory``, oldest first (by step, then write time)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.endswith((PARTIAL_SUFFIX, OLD_SUFFIX)) or not child.is_dir():
            continue
        marker = read_marker(child)
        if marker is not None:
            found.append(marker)
    return sorted(found, key=lambda c: (c.global_step, c.written_at))


def clean_incomplete(directory: str | Path) -> list[Path]:
    """Remove what a crash mid-save left in ``directory``; return what was removed. Run on one rank.

    A ``.partial`` directory with its marker was complete but not yet renamed (the crash came between the
    two): it is renamed into place if nothing holds its name, so no finished checkpoint is lost.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    removed = []
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        if child.name.endswith(PARTIAL_SUFFIX):
            final = child.with_name(child.name[: -len(PARTIAL_SUFFIX)])
            if is_complete(child) and not final.exists():
                child.rename(final)
                continue
        elif child.name.endswith(OLD_SUFFIX):
            final = child.with_name(child.name[: -len(OLD_SUFFIX)])
            if not is_complete(final) and is_complete(child):
                child.rename(final)  # the crash came after moving the old one aside, before the new one
                continue
        else:
            continue
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child)
    return removed


def keep_newest(directory: str | Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints in ``directory``; return the removed ones."""
    old = complete_checkpoints(directory)[:-keep] if keep > 0 else []
    for checkpoint in old:
        # The marker goes first: a removal cut short leaves an incomplete directory, never a "complete" one.
        (checkpoint.path / MARKER_FILE).unlink(missing_ok=True)
        shutil.rmtree(checkpoint.path, ignore_errors=True)
    return [c.path for c in old]
