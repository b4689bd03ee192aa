"""Writing a sharded checkpoint so a crash never leaves a "complete" one half-written; optionally asynchronous.

Every rank writes its DCP shards into ``<path>.partial``. When all are written (DCP's coordinator,
rank 0, writes ``.metadata`` only after gathering every rank's write result), rank 0 writes
``meta.pt``, then the completeness marker, then renames the directory into place and applies the
retention rule. With ``asynchronous=True`` the shards are copied to host memory during the call and
written by DCP's background thread on a gloo group of its own; rank 0 finishes the checkpoint
(``meta.pt``, marker, rename, retention) when that write completes. At most ``max_in_flight`` saves are
unfinished at once: a new save first waits for the oldest.
"""

from __future__ import annotations

import io
import shutil
import sys
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from picotron_lightning.fault_tolerance.completeness import OLD_SUFFIX, PARTIAL_SUFFIX, keep_newest, write_marker

METADATA_FILE = "meta.pt"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def finish_checkpoint(
    partial: Path, path: Path, metadata: bytes, marker: dict[str, int], keep_last: int | None
) -> None:
    """Rank 0, once every rank's shards are in ``partial``: loop state, marker, swap into ``path``, retention."""
    (partial / METADATA_FILE).write_bytes(metadata)
    write_marker(partial, **marker)
    old = path.with_name(path.name + OLD_SUFFIX)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    partial.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    if keep_last is not None:
        keep_newest(path.parent, keep_last)


class CheckpointWriter:
    """Saves sharded checkpoints (every rank calls :meth:`save` with the same path, in the same order)."""

    def __init__(self, asynchronous: bool = False, max_in_flight: int = 1, keep_last: int | None = None) -> None:
        self.asynchronous = asynchronous
        self.max_in_flight = max_in_flight
        self.keep_last = keep_last
        self._in_flight: deque[Future] = deque()
        self._group: Any = None  # the async writes' own gloo group: their collectives run on a background thread
        self._errors: list[BaseException] = []
        self.async_saves = 0
        """Saves started with DCP's ``async_save`` by this writer."""

    def save(self, path: str | Path, state: dict[str, Any], metadata: dict[str, Any] | None = None) -> Path:
        """Write ``state`` (DCP state dicts) and ``metadata`` (rank 0's, any picklable object) as ``path``."""
        path = Path(path)
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        if self.asynchronous:
            while len(self._in_flight) >= self.max_in_flight:
                self._wait_oldest()
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        buffer = io.BytesIO()
        if _rank() == 0:
            torch.save(metadata, buffer)  # now: the loop state of this step, not of a later one
        metadata = metadata or {}
        marker = {"global_step": int(metadata.get("global_step", 0)), "epoch": int(metadata.get("epoch", 0)),
                  "world_size": _world_size()}
        keep_last = self.keep_last
        if not self.asynchronous:
            dcp.save(state, checkpoint_id=str(partial))
            if _rank() == 0:
                finish_checkpoint(partial, path, buffer.getvalue(), marker, keep_last)
            _barrier()
            return path
        if self._group is None and _distributed():
            self._group = dist.new_group(backend="gloo")
        written = dcp.async_save(state, checkpoint_id=str(partial), process_group=self._group)
        self.async_saves += 1
        done: Future = Future()

        def on_written(result: Future) -> None:  # on DCP's background thread
            try:
                result.result()
                if _rank() == 0:
                    finish_checkpoint(partial, path, buffer.getvalue(), marker, keep_last)
                done.set_result(path)
            except BaseException as err:  # noqa: BLE001 - reported by wait(); the partial directory stays incomplete
                self._errors.append(err)
                print(f"picotron3d: asynchronous checkpoint {path} failed: {err}", file=sys.stderr, flush=True)
                done.set_exception(err)

        written.add_done_callback(on_written)  # type: ignore[union-attr]  # a Future with the default stager
        self._in_flight.append(done)
        return path

    def _wait_oldest(self) -> None:
        self._in_flight.popleft().exception()  # failures are collected in self._errors

    def wait(self) -> None:
        """Wait until every asynchronous save has finished; raise if one failed."""
        while self._in_flight:
            self._wait_oldest()
        if self._errors:
            err, self._errors = self._errors[0], []
            raise RuntimeError(f"An asynchronous checkpoint could not be written: {err}") from err

    @property
    def in_flight(self) -> int:
        """Asynchronous saves not yet finished on this rank."""
        return sum(not f.done() for f in self._in_flight)


