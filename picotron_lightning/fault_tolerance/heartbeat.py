"""Dead-rank detection: every rank beats through the process group's store and watches the others' beats.

A rank blocked in a collective with a dead peer waits for the collective timeout (30 minutes by
default). A daemon thread per rank instead increments its own counter in the store about every
``timeout / 10`` seconds and reads everyone's; a counter that has not moved for ``timeout`` seconds
(timed on the watching rank's own clock, so clocks of different hosts never compare) means that
rank is gone. The watcher then prints the dead rank's identity (rank, host, pid) and ends its own
process with ``exit_code``, so the launcher (torchrun, SLURM) restarts the group right away.

The thread uses its own connection to the store (a second ``TCPStore`` client), so a long store
wait of the main thread never delays a beat. A store that stops answering (its host, rank 0 under
Lightning's launcher, died) is reported the same way after ``timeout`` seconds of failures.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

_KEY_PREFIX = "picotron3d/heartbeat"
_DONE = -1
_generation = 0  # heartbeats started in this process: the same count on every rank, so keys never collide


def _own_store_client(timeout: float) -> Any:
    """A new client of the default process group's TCP store, or the store itself if it is not a TCPStore."""
    store = dist.distributed_c10d._get_default_store()
    inner = store
    while not isinstance(inner, dist.TCPStore) and hasattr(inner, "underlying_store"):
        inner = inner.underlying_store
    if isinstance(inner, dist.TCPStore):
        return dist.TCPStore(inner.host, inner.port, is_master=False, timeout=timedelta(seconds=timeout),
                             wait_for_workers=False)
    return store


class Heartbeat:
    """Beat for this rank and stop the process when another rank's beats stop (see the module docstring)."""

    def __init__(self, timeout: float, exit_code: int = 75, restart_count: int = 0) -> None:
        global _generation
        _generation += 1
        self.timeout = timeout
        self.interval = max(0.2, timeout / 10)
        self.exit_code = exit_code
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._prefix = f"{_KEY_PREFIX}/{restart_count}/{_generation}"
        self._store = _own_store_client(max(timeout, 5.0))
        self._stop = threading.Event()
        self._count = 0
        self._store.set(self._key("who", self.rank),
                        json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        self._store.set(self._key("beat", self.rank), "0")
        self._thread = threading.Thread(target=self._run, name="picotron3d-heartbeat", daemon=True)

    def _key(self, kind: str, rank: int) -> str:
        return f"{self._prefix}/{kind}/{rank}"

    def start(self) -> None:
        """Start beating and watching. Every rank's first beat must be in the store: call after a barrier."""
        self._thread.start()

    def stop(self, done: bool = True) -> None:
        """End the thread; with ``done``, say this rank finished normally (the others stop watching it)."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join()
        if not done:
            return
        try:
            self._store.set(self._key("beat", self.rank), str(_DONE))
        except Exception:  # noqa: BLE001 - the store host may already be gone at the very end of a run
            pass

    def _run(self) -> None:
        others = [r for r in range(self.world_size) if r != self.rank]
        last_value: dict[int, str] = {}
        last_change = {r: time.monotonic() for r in others}
        store_failing_since: float | None = None
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                self._count += 1
                self._store.set(self._key("beat", self.rank), str(self._count))
                values = self._store.multi_get([self._key("beat", r) for r in others]) if others else []
                store_failing_since = None
            except Exception as err:  # noqa: BLE001 - an unreachable store is itself the symptom
                if any(v == float("inf") for v in last_change.values()):
                    return  # a rank finished normally and took its store along: the run is ending, not failing
                store_failing_since = store_failing_since or now
                if now - store_failing_since > self.timeout and not self._stop.is_set():
                    self._die(f"the process group's store has not answered for {now - store_failing_since:.1f} s "
                              f"({err}); the rank hosting it (rank 0 under Lightning's launcher) is presumed dead")
                continue
            for r, raw in zip(others, values, strict=True):
                value = raw.decode() if isinstance(raw, bytes) else str(raw)
                if value == str(_DONE):
                    last_change[r] = float("inf")  # finished normally: never dead
                elif value != last_value.get(r):
                    last_value[r], last_change[r] = value, now
            silent = [r for r in others if now - last_change[r] > self.timeout]
            if silent and not self._stop.is_set():
                self._die(", ".join(f"rank {r} ({self._identity(r)}) sent no heartbeat for "
                                    f"{now - last_change[r]:.1f} s" for r in silent) + " and is presumed dead")

    def _identity(self, rank: int) -> str:
        try:
            who = json.loads(self._store.get(self._key("who", rank)))
            return f"host {who['host']}, pid {who['pid']}"
        except Exception:  # noqa: BLE001 - the message must go out even if the store fails now
            return "host unknown"

    def _die(self, reason: str) -> None:
        message = (f"picotron3d: rank {self.rank} stops: {reason}. Stopping instead of waiting for the collective "
                   "timeout; a restarted group resumes from the newest complete checkpoint "
                   "(resume='on_restart' or 'auto').")
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(self.exit_code)  # the main thread may be blocked in a collective: nothing else can end it
