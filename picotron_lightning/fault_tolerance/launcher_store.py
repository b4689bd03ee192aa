"""A process-group store whose keys belong to this start of the group only (torchrun restarts).

torchrun's c10d rendezvous (``--standalone`` or ``--rdzv-backend=c10d``) shares its agent's TCP store with
the workers (``TORCHELASTIC_USE_AGENT_STORE=True``): ``MASTER_ADDR:MASTER_PORT`` is the agent's store, and
the agent keeps that same store, same port and same keys, across ``--max-restarts`` restarts. The keys a
process group writes are the same on every start (``default_pg/0/...``: each gloo rank's listening address),
so a rank of the restarted group that gets to the store before a slower peer reads the *dead* peer's
address from the previous start and fails with "Connection refused" (or waits on a port that something
else took). Measured on this machine with plain ``torch.distributed`` and no picotron code: 2 of 3 restarts
failed that way when one restarted rank started 3 s after the other.

The fix: every start of the group uses its own namespace of the agent's store, named after the restart
count the launcher gives each worker (``TORCHELASTIC_RESTART_COUNT``).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from picotron_lightning.fault_tolerance.resume import restart_count

KEY_PREFIX = "picotron3d/start"


def uses_launcher_store() -> bool:
    """Whether the launcher's own store serves the process group (torchrun's c10d rendezvous)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def restart_scoped_store(timeout: timedelta | None) -> dist.Store | None:
    """The launcher's store seen through a namespace of this start, or None when no launcher store is shared.

    Pass it as ``store=`` to ``init_process_group`` (with ``rank`` and ``world_size``). Every worker of one
    start has the same restart count, so they all meet in the same namespace; a later start never sees the
    keys an earlier one left behind.
    """
    if not uses_launcher_store():
        return None
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        return None  # not a complete torchrun environment: let init_process_group report what is missing
    launcher_store = dist.TCPStore(host, port, is_master=False, timeout=timeout or timedelta(minutes=30))
    return dist.PrefixStore(f"{KEY_PREFIX}_{restart_count()}", launcher_store)
