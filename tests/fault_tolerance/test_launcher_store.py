"""Each start of a torchrun group sees its own keys of the launcher's store (one process, a real TCPStore)."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from picotron_lightning.fault_tolerance.launcher_store import restart_scoped_store
from picotron_lightning.testing import free_port

TIMEOUT = timedelta(seconds=10)


def _torchrun_worker_env(monkeypatch, port: int, restart_count: int) -> None:
    """What torchrun's c10d rendezvous gives a worker: its agent's store, and how often it restarted the group."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart_count))


def test_a_restarted_group_does_not_see_the_keys_of_the_last_start(monkeypatch):
    port = free_port()
    launcher = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=TIMEOUT)  # the agent's, lives on
    _torchrun_worker_env(monkeypatch, port, 0)
    first = restart_scoped_store(TIMEOUT)
    assert first is not None
    first.set("default_pg/0//cpu/rank_1", "127.0.0.1:10642")  # a gloo address of the start that died
    _torchrun_worker_env(monkeypatch, port, 1)
    second = restart_scoped_store(TIMEOUT)
    assert second is not None
    assert not second.check(["default_pg/0//cpu/rank_1"])  # the restarted rank waits for the live peer's key
    second.set("default_pg/0//cpu/rank_1", "127.0.0.1:20000")
    assert first.get("default_pg/0//cpu/rank_1") == b"127.0.0.1:10642"  # and the two never mix
    # Workers of one start share the namespace.
    assert restart_scoped_store(TIMEOUT).get("default_pg/0//cpu/rank_1") == b"127.0.0.1:20000"  # type: ignore[union-attr]
    del launcher


def test_without_a_shared_launcher_store_the_process_group_makes_its_own(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert restart_scoped_store(TIMEOUT) is None  # Lightning's launcher, SLURM, torchrun with a static rendezvous
