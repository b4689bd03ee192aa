"""OOM recovery for pipeline stages sharded with FSDP2 (``memory.oom_recovery`` with pp and dp > 1).

A stage sharded with FSDP2 communicates with its data-parallel replicas inside its compute: each
unit all-gathers its parameters in its forward (and again in its backward after resharding), and the
stage reduce-scatters its gradients once after the schedule (``PipelineStage.perform_reduce_grad``).
A stage that ran out of memory goes on hollow (``recovery.py``): it skips the rest of its forwards and
backwards, and with them the all-gathers its replicas wait in. Which gathers a unit issues depends
on FSDP2's state (gathered or not, which microbatch, which schedule), not on anything a trace on
fake tensors could replay. So under recovery nothing of FSDP2 runs inside a stage's compute:

* **Every unit is gathered before the schedule** (:meth:`ShardedStageUnits.gathered_for_step`), at a
  point every replica reaches whatever fails later, and kept gathered through the schedule
  (``reshard_after_forward`` off for the step). FSDP2's hooks find the units gathered and issue no
  collective. Memory: the stage's whole unsharded parameters for the step. A pipeline stage holds
  them for most of a step anyway (torch's stage keeps units gathered from their first backward to
  the end of the schedule, and keeps its gradients unsharded until then), so the peak changes little.
  Torch's shape inference (a schedule's first step) reshards every unit after it; the recoverable
  stage gathers them again there, also a point every replica reaches. The multi-stage schedules'
  UNSHARD and RESHARD actions are schedule bookkeeping that a hollow stage runs too.
* **The gradient reduce-scatter after the schedule runs on every replica with the same tensors**
  (:func:`zero_missing_gradients`): a hollow stage gives its trainable parameters that received no
  gradient zeros (the step is redone; these values are thrown away), so its reduce-scatter pairs
  with its replicas'. Under tensor parallelism the zeros take the placements a computed backward
  gives, so FSDP2's redistribution of a partial gradient over tp pairs with the tp peer's. Torch's
  stage then reshards every unit, as it does for any FSDP2 stage.
* **A trace of a hollow stage's compute** (the collectives tensor parallelism or MoE statistics run,
  ``recovery.py``) **runs with FSDP2's hooks set aside** (:func:`fsdp_hooks_set_aside`): the units
  are gathered, so the stage's modules hold the unsharded parameters, and the hooks would only move
  FSDP2's state (resharding after the trace's backward) or gather inside the trace.

Only public FSDP2 calls change its state here (``unshard``, ``set_reshard_after_forward``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import zeros as dtensor_zeros

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_state_dict_pre_hooks")
"""``nn.Module`` hook dictionaries FSDP2 registers in (forward: gather/reshard; state dict: reshard)."""


def _is_fsdp_hook(hook: object) -> bool:
    return getattr(hook, "__module__", "").startswith("torch.distributed.fsdp")


@contextmanager
def fsdp_hooks_set_aside(modules: Sequence[nn.Module]) -> Iterator[None]:
    """FSDP2's forward and state-dict hooks removed from ``modules`` and everything under them, other hooks kept;
    put back on exit. Call it with the units gathered: the modules then compute with the unsharded parameters."""
    silenced: list[tuple[nn.Module, str, OrderedDict]] = []
    try:
        for unit in modules:
            for module in unit.modules():  # the state-dict hooks sit on the modules owning the parameters
                for name in _HOOK_DICTS:
                    hooks = getattr(module, name, None)
                    if hooks and any(_is_fsdp_hook(h) for h in hooks.values()):
                        kept = OrderedDict((k, h) for k, h in hooks.items() if not _is_fsdp_hook(h))
                        silenced.append((module, name, hooks))
                        setattr(module, name, kept)
        yield
    finally:
        for module, name, hooks in reversed(silenced):
            setattr(module, name, hooks)


class ShardedStageUnits:
    """The FSDP2 modules of this rank's stages (units and the stage roots), as sharded at setup.

    Args:
        units: every ``fully_shard``-ed module of this rank's stages but the roots.
        roots: the stage modules (FSDP2 roots: ``fully_shard_units`` shards them without resharding after forward).
        reshard_after_forward: the units' setting at setup (restored after each recoverable step).
    """

    def __init__(self, units: list[nn.Module], roots: list[nn.Module], reshard_after_forward: bool) -> None:
        self.roots = roots
        self.modules = [m for m in [*units, *roots] if isinstance(m, FSDPModule)]
        self._settings = [reshard_after_forward] * len([u for u in units if isinstance(u, FSDPModule)]) + \
            [False] * len([r for r in roots if isinstance(r, FSDPModule)])

    @contextmanager
    def gathered_for_step(self) -> Iterator[dict[int, list[nn.Parameter]]]:
        """Every unit all-gathered now and kept gathered until the schedule reshards it (its gradient reduction,
        or a lowered schedule's RESHARD action, whose UNSHARD gathers again outside any compute).

        Yields each root's unsharded parameters by ``id(root)``: FSDP2 keeps these objects for the life of the
        module (resharding frees their storage only), and its reduce-scatter reads their ``.grad``.
        """
        for module in self.modules:
            module.set_reshard_after_forward(False, recurse=False)
        try:
            for module in self.modules:
                module.unshard()
            yield {id(root): list(root.parameters()) for root in self.roots}
        finally:
            for module, setting in zip(self.modules, self._settings, strict=True):
                module.set_reshard_after_forward(setting, recurse=False)


def zero_missing_gradients(unsharded: list[nn.Parameter], placements: Mapping[int, tuple] | None = None) -> int:
    """Zeros as the gradient of every trainable parameter in ``unsharded`` that has none; how many were set.

    Called on a hollow FSDP2 stage before its reduce-scatter, with the stage's unsharded parameters: a replica that
    computed has a gradient for each, and the reduce-scatter reduces only those that have one. Under tensor
    parallelism ``placements`` (by ``id`` of the parameter) are the gradients' placements a computed backward gives
    (partial for a replicated parameter used on sharded activations): FSDP2 redistributes a gradient whose placements
    differ from its parameter's over tp before reducing, and the tp peer that computed does so too.
    """
    missing = [p for p in unsharded if p.requires_grad and p.grad is None]
    for p in missing:
        wanted = (placements or {}).get(id(p))
        if isinstance(p, DTensor) and wanted is not None and tuple(wanted) != tuple(p.placements):
            p.grad = dtensor_zeros(p.shape, device_mesh=p.device_mesh, placements=wanted, dtype=p.dtype)
        else:
            p.grad = torch.zeros_like(p)
    return len(missing)
