"""What one pipeline step captured, shared by the runtime (which fills it) and the stages (which read it).

The stages run inside a ``torch.distributed.pipelining`` schedule, which calls them with only the
activations and a microbatch index. Everything else a stage needs for that microbatch (the inner
model's captured call, where to keep the structure of the last stage's output) lives here, so
stages depend on this small object instead of on the runtime that drives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


@dataclass
class StepState:
    """The current step's per-microbatch inputs and output structures (reset at the end of every step)."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    """Per microbatch, the ``(args, kwargs)`` the user's step passed to the inner model (captured, not run)."""

    output_structure: dict[int, tuple[Any, list[Any]]] = field(default_factory=dict)
    """Per microbatch, the last stage's output without its tensors: ``(pytree spec, non-tensor leaves)``."""

    def pack_output(self, out: Any, index: int) -> Any:
        """The last stage's model output as tensors for the schedule; the rest is kept for the loss."""
        leaves, spec = tree_flatten(out)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        self.output_structure[index] = (spec, [None if isinstance(x, torch.Tensor) else x for x in leaves])
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def unpack_output(self, output: Any, index: int) -> Any:
        """The model output of microbatch ``index`` rebuilt from the tensors the schedule handed back."""
        spec, leaves = self.output_structure[index]
        tensors = iter((output,) if isinstance(output, torch.Tensor) else output)
        return tree_unflatten([next(tensors) if x is None else x for x in leaves], spec)

    def end_step(self) -> None:
        """Forget the step's output structures (the calls are replaced at the next step)."""
        self.output_structure.clear()


def microbatch_index(tag: torch.Tensor) -> int:
    """The microbatch number a schedule passed as a tensor (``mb_index``, the loss's ``target``).

    Read with any fake-tensor mode set aside: OOM recovery infers a stage's shapes on fake tensors
    (``recovery.py``), and the tag itself is a real tensor whose value the stage needs.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return int(tag.reshape(-1)[0])
