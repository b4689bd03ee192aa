"""Live tensor bytes during a training step, by storage, with the peak broken down by kind.

:class:`LiveBytes` is a ``TorchDispatchMode``: every tensor an op creates is counted once per
storage (views share their base's bytes) until its storage is freed. Tensors that exist before
the mode is entered (parameters, gradients, optimizer state, the batch) are registered with
:meth:`LiveBytes.register`. It works the same on real and on fake tensors, which is what makes it
useful twice: the estimator traces a step on fake tensors with it, and the tests measure real
steps with it (and inject out-of-memory errors with a subclass, ``picotron_lightning.testing_memory.BudgetOOM``).

At every new peak the set of live storages is remembered, so the peak can be broken down into
parameters, gradients, optimizer state, activations (tensors autograd saved for backward) and
temporaries (everything else) after the step.

With ``offload_saved=True`` it also plays ``torch.autograd.graph.save_on_cpu`` on a device whose
host is elsewhere: every saved tensor is copied into a storage counted as *host* bytes (not in
``current``/``peak``), and each unpack makes a new device copy, as ``tensor.to(device)`` does. That
is how the estimate counts activation offload on a CPU trace, where the real ``save_on_cpu`` moves
nothing.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KINDS = ("params", "grads", "optimizer", "activations", "temporaries")


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns memory: a DTensor's local shard, else the tensor itself."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def storage_of(t: torch.Tensor) -> torch.UntypedStorage | None:
    """The untyped storage behind ``t`` (None for tensors without one, e.g. sparse or nested)."""
    try:
        return _plain(t).untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


@dataclass(frozen=True)
class PeakBreakdown:
    """Bytes live at the step's peak, by kind; ``total`` is their sum."""

    params: int
    grads: int
    optimizer: int
    activations: int
    temporaries: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.temporaries

    def as_dict(self) -> dict[str, int]:
        return {kind: getattr(self, kind) for kind in KINDS} | {"total": self.total}


class LiveBytes(TorchDispatchMode):
    """Count the bytes of live tensor storages; remember the peak and what was live at it."""

    def __init__(self, offload_saved: bool = False) -> None:
        super().__init__()
        self.offload_saved = offload_saved

        self.host_current = 0  # bytes of the simulated host copies (offload_saved) alive now
        self.host_peak = 0
        self.offloaded_bytes = 0  # bytes copied to the host (each comes back once: 2x this crosses the link)
        self._host_live: dict[int, int] = {}  # id(storage) -> bytes, for the simulated host copies
        self._to_host = False
        self._live: dict[int, tuple[int, weakref.ref]] = {}  # id(storage) -> (bytes, storage)
        self._saved: set[int] = set()  # storages autograd packed for backward
        self.current = 0
        self.peak = 0
        self._peak_pending = False  # the live set is the peak's and has not been copied yet
        self._at_peak: dict[int, tuple[int, weakref.ref, bool]] = {}
        self._saved_hooks: Any = None
        # A storage is released on whichever thread drops its last reference: gloo's worker thread does
        # so for a collective's buffers (after the step's thread waited for it). The counters are
        # updated under this lock so that the two threads' updates cannot overwrite each other; re-entrant
        # because a collection on the counting thread can release a storage in the middle of ``_track``.
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ accounting
    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        nbytes = storage.nbytes()
        with self._lock:
            if key in self._live or key in self._host_live:
                return
            if self._to_host:  # a simulated host copy: never device bytes
                self._host_live[key] = nbytes
                weakref.finalize(storage, self._release, key)
                self.host_current += nbytes
                self.host_peak = max(self.host_peak, self.host_current)
                return
            self._on_allocate(nbytes)
            self._live[key] = (nbytes, weakref.ref(storage))
            weakref.finalize(storage, self._release, key)
            self.current += nbytes
            if self.current > self.peak:
                self.peak = self.current
                self._peak_pending = True

    def _release(self, key: int) -> None:
        with self._lock:
            if key in self._host_live:
                self.host_current -= self._host_live.pop(key)
                return
            if self._peak_pending:  # leaving the peak: remember what was live there (copied once per peak)
                self._at_peak = {k: (n, ref, k in self._saved) for k, (n, ref) in self._live.items()}
                self._peak_pending = False
            nbytes, _ = self._live.pop(key, (0, None))
            self.current -= nbytes
            self._saved.discard(key)

    def _on_allocate(self, nbytes: int) -> None:
        """Called before ``nbytes`` more become live; the OOM injector of the tests raises here."""

    def start_step(self, module: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer], batch: Any) -> None:
        """Count what exists when a training step starts (parameters, buffers, the batch, the previous step's
        gradients, which live until ``zero_grad``, and optimizer state) and start the peak from there."""
        params = list(module.parameters())
        self.register([*params, *module.buffers(), batch])
        self.register(p.grad for p in params if p.grad is not None)
        self.register(v for opt in optimizers for state in opt.state.values() for v in state.values())
        self.reset_peak()

    def register(self, tensors: Iterable[Any]) -> None:
        """Count tensors that already exist (parameters, gradients, optimizer state, the batch)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                storage = storage_of(t)
                if storage is not None:
                    self._track(storage)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = storage_of(t)
                if storage is not None:
                    self._track(storage)
        return out

    # ------------------------------------------------------------------ saved activations
    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = storage_of(t)
        if self.offload_saved:
            self._to_host = True
            try:
                host = t.detach().clone()  # what save_on_cpu's copy to the host allocates
            finally:
                self._to_host = False
            self.offloaded_bytes += t.numel() * t.element_size()
            return host
        with self._lock:
            if storage is not None and id(storage) in self._live:
                self._saved.add(id(storage))
        return t

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone() if self.offload_saved else t  # save_on_cpu's unpack: a new device copy each time

    def peak_sizes(self) -> list[int]:
        """Bytes of each storage live at the peak (what an allocator would have had to hold)."""
        with self._lock:
            if self._peak_pending:
                return [n for n, _ in self._live.values()]
            return [n for n, _, _ in self._at_peak.values()]

    def __enter__(self) -> LiveBytes:
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._saved_hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._saved_hooks.__exit__(*exc)

    # ------------------------------------------------------------------ results
    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now (e.g. after a warm-up step)."""
        with self._lock:
            self.peak = self.current
            self._peak_pending = True

    def breakdown(self, module: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> PeakBreakdown:
        """Split the peak's bytes into kinds, by the identity of the storages live at the peak.

        Parameters, gradients and optimizer state are looked up *now* (after the step); a storage
        live at the peak that is still one of them counts as that kind. Gathered (unsharded) FSDP
        parameters and gradients freed during the step are not by then, and count as activations
        (if autograd saved them) or temporaries.
        """
        with self._lock:
            if self._peak_pending:
                self._at_peak = {k: (n, ref, k in self._saved) for k, (n, ref) in self._live.items()}
                self._peak_pending = False

        def ids(tensors: Iterable[Any]) -> set[int]:
            found = set()
            for t in tensors:
                if isinstance(t, torch.Tensor) and (s := storage_of(t)) is not None:
                    found.add(id(s))
            return found

        params = ids([*module.parameters(), *module.buffers()])
        grads = ids(p.grad for p in module.parameters() if p.grad is not None)
        optim = ids(v for opt in optimizers for state in opt.state.values() for v in state.values())
        buckets = dict.fromkeys(KINDS, 0)
        for nbytes, ref, saved in self._at_peak.values():
            alive = ref()
            key = id(alive) if alive is not None else None  # ids of live objects are unique
            kind = ("params" if key in params else "grads" if key in grads else "optimizer" if key in optim
                    else "activations" if saved else "temporaries")
            buckets[kind] += nbytes
        return PeakBreakdown(**buckets)
