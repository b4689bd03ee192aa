"""MoE layers inside graphs traced by ``torch.export`` (``pipeline_split="trace"``).

``torch.export`` cannot trace an MoE layer: the tokens each expert receives are data-dependent
sizes (measured on the reference ``tiny-moe`` Llama, torch 2.13: ``GuardOnDataDependentSymNode``
at ``moe/grouped.py`` ``pad_by_group``), and under expert parallelism the all-to-all's split sizes
are read on the host. So, for the trace only, every :class:`~picotron_lightning.moe.MoELayer` calls
one opaque custom op, ``picotron::moe_layer``, that the export keeps as a single graph node:

* its fake implementation returns a tensor of the input's shape (an MoE layer maps
  ``(batch, seq, hidden)`` to the same shape), so nothing data-dependent is traced;
* its real implementation runs the layer's own eager forward (router, sorting, the all-to-all over
  the ``ep`` group, grouped experts, shared experts). It runs without autograd (an op's forward
  does), so the balancer sees no training forward: no statistics all-reduce, no auxiliary gradient;
* its backward *recomputes* that forward with autograd on (the layer in training mode: routing
  statistics all-reduced over the data-parallel ranks, the auxiliary and z-losses injected through
  :class:`~picotron_lightning.moe.balancing.AuxLossInjector`, bias-balancing counts recorded once)
  and returns the gradients of the input and of the layer's parameters, which are the op's inputs,
  so the traced graph accumulates them into the model's own parameters (expert parameters'
  ``grad / ep`` hooks included) exactly once.

The recompute is what a checkpointed MoE block costs with the structural split: the layer's forward
(and, under expert parallelism, its two all-to-alls) twice per training microbatch. Every rank of an
``ep`` group runs the same schedule, so the recomputes' collectives pair up as the forwards' do.
Router jitter draws random numbers: the state before the forward is kept and restored for the
recompute, so both see the same noise. The statistics the layer keeps for monitoring
(``MoELayer.moe_metrics``) are those of its latest training recompute, i.e. of the same microbatch
whose forward the structural split leaves there (a microbatch's backward comes after its forward).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from picotron_lightning.moe.layer import MoELayer

_KEY_ATTR = "_picotron_traced_key"
_RNG_ATTR = "_picotron_traced_rng"
_LAYERS: weakref.WeakValueDictionary[str, MoELayer] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def _layer(key: str) -> MoELayer:
    layer = _LAYERS.get(key)
    if layer is None:  # the graph outlived its model: nothing to run
        raise RuntimeError(f"picotron::moe_layer: the MoE layer {key!r} of this traced graph no longer exists.")
    return layer


def _rng_state(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    accelerator = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
    return torch.get_rng_state(), accelerator


@torch.library.custom_op("picotron::moe_layer", mutates_args=())
def moe_layer(x: torch.Tensor, key: str, params: list[torch.Tensor]) -> torch.Tensor:
    """The MoE layer registered under ``key`` applied to ``x``; ``params`` are its parameters (for autograd)."""
    layer = _layer(key)
    if layer.training and layer.router.jitter_eps > 0:
        setattr(layer, _RNG_ATTR, _rng_state(x))  # taken by _setup_context when a backward will follow
    with torch.no_grad():  # the backward recomputes with autograd; this forward only gives the output
        return MoELayer.forward(layer, x).clone()  # an op's output must not alias its input


@moe_layer.register_fake
def _(x: torch.Tensor, key: str, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(x)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, key, params = inputs
    ctx.key = key
    ctx.rng = _layer(key).__dict__.pop(_RNG_ATTR, None)
    ctx.save_for_backward(x, *params)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, list[torch.Tensor | None]]:
    x, *params = ctx.saved_tensors
    layer = _layer(ctx.key)
    names = [name for name, _ in layer.named_parameters()]
    # Detached aliases (the same storage): gradients leave through this op's outputs only, so the
    # parameters' own hooks (an expert parameter's grad / ep) run once, in the traced graph.
    x_alias = x.detach().requires_grad_(ctx.needs_input_grad[0])
    aliases = {name: p.detach().requires_grad_(p.requires_grad) for name, p in zip(names, params, strict=True)}
    devices = [x.device] if x.is_cuda else []
    with torch.enable_grad(), torch.random.fork_rng(devices=devices, enabled=ctx.rng is not None):
        if ctx.rng is not None:
            cpu, accelerator = ctx.rng
            torch.set_rng_state(cpu)
            if accelerator is not None:
                torch.cuda.set_rng_state(accelerator, x.device)
        out = torch.func.functional_call(layer, aliases, (x_alias,))
    wanted = [t for t in (x_alias, *aliases.values()) if t.requires_grad]
    found = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    grads = [next(found) if t.requires_grad else None for t in (x_alias, *aliases.values())]
    return grads[0], None, grads[1:]


moe_layer.register_autograd(_backward, setup_context=_setup_context)


def _opaque_forward(layer: MoELayer, key: str) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return moe_layer(x, key, [p for _, p in layer.named_parameters()])

    return forward


@contextmanager
def opaque_moe_layers(root: nn.Module) -> Iterator[None]:
    """Every ``MoELayer`` under ``root`` calls ``picotron::moe_layer`` while the context is open (for a trace).

    The traced graph keeps the op with the layer's key; the real layer (registered here, weakly) runs
    when the graph runs. Each layer keeps its key, so tracing again (a new input shape) reuses it.
    """
    layers = [m for m in root.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        key = layer.__dict__.setdefault(_KEY_ATTR, f"moe{next(_KEYS)}")
        _LAYERS[key] = layer
        layer.__dict__["forward"] = _opaque_forward(layer, key)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
