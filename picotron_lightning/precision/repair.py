"""Repair a forward overflow where it happens: recompute the culprit module in fp32.

When a module's low-precision output is non-finite although its inputs were finite, the
analyzer's forward hook asks :func:`recompute_in_fp32` for a replacement output. The module's own
``forward`` (not ``__call__``: the hooks of wrappers such as FSDP2 must not run twice) runs again
with autocast off and fp32 inputs, and the hook returns that output, so everything downstream sees
finite values, further culprits of the same forward are found too, and the step keeps its loss.

The recompute runs on one rank only (each rank finds its own culprits), so it must not contain a
collective that the other ranks would not join. :func:`repair_blocker` refuses those cases, and
the overflow then costs a skipped step as before:

* the module (or a module inside it) already runs in fp32: not a precision problem;
* a data-parallel unit (FSDP2) *inside* it: its forward would all-gather again;
* DTensor parameters (tensor parallelism): their ops may redistribute;
* an MoE layer with expert-parallel dispatch inside it (``all_to_all``); the experts themselves
  compute locally and are repaired;
* activation checkpointing around it: the backward recompute must see the same saved tensors as
  the forward did.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from picotron_lightning.precision.analyzer import _is_fsdp_unit
from picotron_lightning.precision.promotion import _to_fp32

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
_CHECKPOINTED = "_checkpoint_wrapped_module"  # the attribute torch's checkpoint_wrapper stores the block in


def repair_blocker(name: str, module: nn.Module, device_type: str) -> str | None:
    """Why ``module`` cannot be recomputed in place on this rank alone, or None when it can."""
    if not torch.is_autocast_enabled(device_type):
        return "it already runs in fp32 (inside a promoted module or outside autocast)"
    if _CHECKPOINTED in name.split("."):
        return "it is inside an activation-checkpointed block (the backward recompute would differ)"
    for child_name, child in module.named_modules():
        if child_name and _is_fsdp_unit(child):
            return f"it contains the data-parallel unit {child_name!r} (its forward all-gathers)"
        if getattr(child, "communication", None) is not None:
            return f"it contains the expert-parallel MoE layer {child_name or name!r} (its forward is all_to_all)"
    for param in module.parameters():
        if hasattr(param, "to_local"):
            return "its parameters are DTensors (tensor-parallel ops may communicate)"
    return None


def recompute_in_fp32(module: nn.Module, args: tuple, kwargs: dict, device_type: str) -> Any:
    """``module.forward`` again on fp32 copies of ``args``/``kwargs`` with autocast off."""
    with torch.autocast(device_type, enabled=False):
        return module.forward(*tree_map(_to_fp32, args), **tree_map(_to_fp32, kwargs))


def structural_siblings(model: nn.Module, name: str) -> tuple[str, list[str]]:
    """The modules at the same place as ``name`` in the other blocks of its stack.

    ``model.layers.2.mlp`` in a ``ModuleList`` ``model.layers`` has the siblings
    ``model.layers.{0,1,3}.mlp`` when those exist and have the same class. Only a block's *child*
    has siblings (promoting every block of a stack would put the whole stack in fp32). Returns
    ``(stack name, sibling names)``; the innermost stack with siblings wins.
    """
    modules = dict(model.named_modules())
    culprit = modules.get(name)
    if culprit is None:
        return "", []
    parts = name.split(".")
    for cut in range(len(parts) - 2, -1, -1):  # parts[cut] is the block key; parts[cut + 1:] is non-empty
        stack_name = ".".join(parts[:cut])
        stack = modules.get(stack_name)
        if not isinstance(stack, _CONTAINERS):
            continue
        rest = ".".join(parts[cut + 1:])
        siblings = []
        for key in stack._modules:
            if key == parts[cut]:
                continue
            other = f"{stack_name}.{key}.{rest}" if stack_name else f"{key}.{rest}"
            if type(modules.get(other)) is type(culprit):
                siblings.append(other)
        if siblings:
            return stack_name or "<root>", siblings
    return "", []
