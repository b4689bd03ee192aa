"""Linear-like layers and how tp splits them: ``nn.Linear``, transposed linears, uneven and fused shards.

A *transposed linear* is a layer computing ``x @ weight + bias`` with ``weight`` of shape
``(in_features, out_features)``: Hugging Face's ``Conv1D`` (GPT-2, GPT). Column-wise it is split on
weight dim 1 (and its bias), row-wise on dim 0, the opposite of ``nn.Linear``.

Shards follow DTensor's ``Shard`` rule (``torch.chunk``): a size ``n`` over ``tp`` ranks gives each
rank ``ceil(n / tp)`` features, the last ones fewer, so sizes tp does not divide shard unevenly and
the parameters keep the model's own shapes.

A *fused* column-wise layer (``groups`` > 1) produces ``groups`` equal parts side by side (q, k and v
of one ``c_attn``); rank ``r`` holds its own shard of *each* part, so it gets whole heads of q, k
and v, not a contiguous block mixing them.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

TRANSPOSED_LINEAR_CLASSES = ("Conv1D",)  # Hugging Face's transposed linear (pytorch_utils.Conv1D)

# Attributes of a Hugging Face attention module that hold a global width or head count and that its
# forward uses to split the fused projection (GPT-2: ``split_size``); rewritten to rank-local values.
LOCAL_WIDTH_ATTRIBUTES = ("split_size", "embed_dim")
LOCAL_HEAD_ATTRIBUTES = ("num_heads",)


def weight_of(module: nn.Module) -> Any:
    """``module.weight`` (a tensor or DTensor; typed loosely, as ``nn.Module`` attributes are)."""
    return cast(Any, module).weight


def bias_of(module: nn.Module) -> Any:
    """``module.bias``, or None."""
    return getattr(module, "bias", None)


def is_transposed_linear(module: nn.Module) -> bool:
    """A layer with ``weight`` of shape ``(in, out)`` computing ``x @ weight + bias`` (HF ``Conv1D``)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ in TRANSPOSED_LINEAR_CLASSES and isinstance(weight, torch.Tensor)
            and weight.dim() == 2 and getattr(module, "nf", None) == weight.shape[1])


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or a transposed linear."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def out_dim(module: nn.Module) -> int:
    """The weight dimension that holds the output features (0 for ``nn.Linear``, 1 transposed)."""
    return 1 if is_transposed_linear(module) else 0


def out_features(module: nn.Module) -> int:
    return int(weight_of(module).shape[out_dim(module)])


def in_features(module: nn.Module) -> int:
    return int(weight_of(module).shape[1 - out_dim(module)])


def local_range(size: int, tp: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s shard of ``size`` features (DTensor's ``Shard`` rule)."""
    chunk = math.ceil(size / tp)
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


def local_indices(size: int, tp: int, rank: int, groups: int = 1) -> torch.Tensor:
    """Indices of rank ``rank``'s output features: its shard of each of ``groups`` equal parts."""
    part = size // groups
    start, stop = local_range(part, tp, rank)
    return torch.cat([torch.arange(g * part + start, g * part + stop) for g in range(groups)])


def shard_copy(module: nn.Module, style: str, tp: int, rank: int, groups: int = 1, meta: bool = False) -> None:
    """Replace ``module``'s parameters by rank ``rank``'s shard, in place (for validation, not training).

    Row-wise layers keep their bias on rank 0 only: it is added once, after the reduction.
    """
    dim = out_dim(module)
    w, bias = weight_of(module), bias_of(module)
    if style in ("colwise", "head"):
        idx = local_indices(w.shape[dim], tp, rank, groups)
        new_w = w.index_select(dim, idx.to(w.device)) if not w.is_meta else torch.empty(
            _replace(w.shape, dim, len(idx)), dtype=w.dtype, device="meta")
        new_b = None if bias is None else (torch.empty(len(idx), dtype=bias.dtype, device="meta") if bias.is_meta
                                           else bias[idx.to(bias.device)])
    else:
        start, stop = local_range(w.shape[1 - dim], tp, rank)
        new_w = w.narrow(1 - dim, start, stop - start)
        new_b = None if bias is None else (bias if rank == 0 else torch.zeros_like(bias))
    to = (lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")) if meta else (lambda t: t.detach().clone())
    module.weight = nn.Parameter(to(new_w), requires_grad=False)
    if new_b is not None:
        module.bias = nn.Parameter(to(new_b), requires_grad=False)
    set_local_features(module)


def set_local_features(module: nn.Module) -> None:
    """Make the module's size attributes (``out_features``, ``nf``...) agree with its (local) weight."""
    w = weight_of(module)
    local = w.to_local() if hasattr(w, "to_local") else w
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = local.shape[0], local.shape[1]
    elif type(module).__name__ in TRANSPOSED_LINEAR_CLASSES:
        setattr(module, "nx", local.shape[0])  # noqa: B010 - attributes of a class we do not import
        setattr(module, "nf", local.shape[1])  # noqa: B010


def localize_attention(attention: nn.Module, tp: int, rank: int, width: int, heads: int | None) -> None:
    """Rewrite an attention module's global width / head-count attributes to rank ``rank``'s values.

    ``width`` is one part of the fused projection (the model width); only attributes holding exactly
    the global value are changed, so a module without them is left alone.
    """
    start, stop = local_range(width, tp, rank)
    for name in LOCAL_WIDTH_ATTRIBUTES:
        if getattr(attention, name, None) == width:
            setattr(attention, name, stop - start)
    if heads:
        h0, h1 = local_range(heads, tp, rank)
        for name in LOCAL_HEAD_ATTRIBUTES:
            if getattr(attention, name, None) == heads:
                setattr(attention, name, h1 - h0)


def _replace(shape: Any, dim: int, value: int) -> tuple[int, ...]:
    out = list(shape)
    out[dim] = value
    return tuple(out)
