"""One call per step for Fabric loops that should run under every layout, pipelines included.

A Fabric loop runs forward and ``fabric.backward`` itself, one batch at a time, which no pipeline
schedule can interleave across stages. Two lines of the loop change::

    loss = loss_fn(model(x), y)                              # before
    fabric.backward(loss)

    loss = forward_backward(fabric, model, x, y, loss_fn)    # after: any strategy, any layout

Everything else in the loop stays: ``fabric.clip_gradients``, ``optimizer.step()``,
``fabric.no_backward_sync``, ``fabric.save``/``fabric.load``, ``fabric.all_reduce``. Without
pipeline parallelism (and with any other Fabric strategy) the call is exactly the two lines it replaces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import Module

from picotron_lightning.strategies.fabric import LossFunction, Picotron3DFabricStrategy

if TYPE_CHECKING:
    from lightning.fabric import Fabric


def _pipelined(fabric: Fabric) -> Picotron3DFabricStrategy | None:
    strategy = fabric.strategy
    if isinstance(strategy, Picotron3DFabricStrategy) and strategy.layout.pp > 1:
        return strategy
    return None


def forward_backward(fabric: Fabric, model: Module, inputs: Any, target: Any, loss_fn: LossFunction) -> Tensor:
    """``loss = loss_fn(model(*inputs), target)`` and ``fabric.backward(loss)``; returns the detached loss.

    ``inputs`` is one tensor or a tuple of the model's positional arguments; ``loss_fn(output, target)``
    returns the batch's mean loss. With ``pipeline_parallel_size > 1`` the batch runs through the
    pipeline schedule (:meth:`Picotron3DFabricStrategy.pipeline_step`): the gradients equal those of
    one ``backward`` on the whole batch, and every rank gets the batch's mean loss.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    strategy = _pipelined(fabric)
    if strategy is not None:
        return strategy.pipeline_step(model, args, target, loss_fn, training=True)
    loss = loss_fn(model(*args), target)
    fabric.backward(loss)
    return loss.detach()


def evaluate(fabric: Fabric, model: Module, inputs: Any, target: Any, loss_fn: LossFunction) -> Tensor:
    """``loss_fn(model(*inputs), target)`` without gradients, under every layout (forward-only schedule under pp)."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    strategy = _pipelined(fabric)
    if strategy is not None:
        return strategy.pipeline_step(model, args, target, loss_fn, training=False)
    with torch.no_grad():
        return loss_fn(model(*args), target).detach()
