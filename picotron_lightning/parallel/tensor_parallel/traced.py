"""Tensor parallelism for graphs traced by ``torch.export`` (``pipeline_split="trace"``).

``torch.export`` cannot trace a module sharded with DTensor (measured, torch 2.13: ``DTensor.from_local``
in the ``parallelize_module`` hooks fails with ``RuntimeError: Expected all pytree.tree_leaves of (args,
kwargs) to be graphable types, but found non-fx-graphable type DTensorSpec``). So the traced split
shards the parameters with DTensor as the structural split does (``apply_plan``: state dicts,
checkpoints and the gradient norm see DTensors with the model's global shapes) and traces a
*local twin* instead: each sharded linear is swapped, for the trace only, for a
:class:`LocalShardLinear` holding this rank's local shards (the same storage as the DTensors) and
the two Megatron operators as opaque custom ops that the export keeps as single nodes:

* ``picotron::tp_copy`` before a column-wise linear: identity forward, gradient all-reduced over tp
  backward (every tp rank then has the whole gradient of the replicated activation);
* ``picotron::tp_reduce`` after a row-wise linear: all-reduce forward, identity backward; its bias is
  added once, after the reduction.

Activations between the two linears are this rank's local slices, so the sizes the graph hard-codes
(``view(b, t, -1, head_dim)``) are the local ones. Replicated parameters (norms, embeddings, the head,
row-wise biases) get the whole gradient on every tp rank.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from picotron_lightning.memory.replay import register_communicating_op
from picotron_lightning.parallel.tensor_parallel.linears import local_range
from picotron_lightning.parallel.tensor_parallel.plan_types import STYLES, TensorParallelPlan

TRACED_STYLES = ("colwise", "rowwise")
"""Plan styles the traced split shards; the embedding and head stay whole (replicated) on every tp rank."""


def _group(name: str) -> dist.ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(cast(Any, name))


@torch.library.custom_op("picotron::tp_copy", mutates_args=())
def tp_copy(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Megatron's ``f``: identity forward, all-reduce of the gradient over the tp group backward."""
    return x.clone()


@tp_copy.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def _copy_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
    grad = grad.contiguous().clone()
    dist.all_reduce(grad, group=_group(ctx.group_name))
    return grad, None


def _remember_group(ctx, inputs: tuple, output: torch.Tensor) -> None:  # noqa: ANN001
    ctx.group_name = inputs[1]


tp_copy.register_autograd(_copy_backward, setup_context=_remember_group)


@torch.library.custom_op("picotron::tp_reduce", mutates_args=())
def tp_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Megatron's ``g``: all-reduce (sum) over the tp group forward, identity backward."""
    out = x.contiguous().clone()
    dist.all_reduce(out, group=_group(group_name))
    return out


@tp_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def _reduce_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
    return grad, None


tp_reduce.register_autograd(_reduce_backward, setup_context=_remember_group)
# OOM recovery replays a failed pipeline stage's collectives from a trace on fake tensors, where this op's fake
# kernel communicates nothing: declared, so the trace records it (tp_copy's backward all-reduces through c10d).
register_communicating_op("picotron::tp_reduce")


class LocalShardLinear(nn.Module):
    """This rank's shard of a column- or row-wise ``nn.Linear`` as plain tensors, for tracing.

    Holds ``weight`` and ``bias`` under the linear's own names, so the traced stage's parameter names
    are the model's.
    """

    def __init__(self, kind: str, weight: nn.Parameter, bias: nn.Parameter | None, group_name: str) -> None:
        super().__init__()
        self.kind, self.group_name = kind, group_name
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "colwise":
            return F.linear(tp_copy(x, self.group_name), self.weight, self.bias)
        out = tp_reduce(F.linear(x, self.weight), self.group_name)
        return out if self.bias is None else out + self.bias


def traced_plan(root: nn.Module, plan: TensorParallelPlan) -> TensorParallelPlan:
    """The part of ``plan`` the traced split applies: its column- and row-wise ``nn.Linear`` entries.

    Embedding, head and norm entries are dropped (those modules stay whole on every tp rank: their
    gradients are then complete on each). Fused projections, transposed linears and ``ParallelStyle``
    instances are refused, naming the structural split. No collective: every rank raises alike.
    """
    from picotron_lightning.topology import LayoutError

    structural = 'Use pipeline_split="structural" (the default), which shards them.'
    modules = dict(root.named_modules())
    kept: dict[str, Any] = {}
    for name, kind in plan.styles.items():
        if kind not in STYLES:
            raise LayoutError(f"pipeline_split='trace' with tensor parallelism applies the styles {TRACED_STYLES} "
                              f"only; {name!r} has {kind!r}. {structural}")
        if kind not in TRACED_STYLES:
            continue
        if plan.fused.get(name, 1) > 1 or type(modules[name]) is not nn.Linear:
            what = "a fused projection (q|k|v in one linear)" if plan.fused.get(name, 1) > 1 else \
                f"a {type(modules[name]).__name__}, not an nn.Linear"
            raise LayoutError(f"pipeline_split='trace' with tensor parallelism shards plain nn.Linear layers; "
                              f"{name!r} is {what}. {structural}")
        kept[name] = kind
    return TensorParallelPlan(kept, plan.source, plan.block_stack, dict(plan.head_counts), sequence_parallel=False)


def _local(param: torch.Tensor) -> torch.Tensor:
    """A DTensor parameter's local shard (its own storage: optimizer steps and loads are seen)."""
    from torch.distributed.tensor import DTensor

    return param._local_tensor if isinstance(param, DTensor) else param


def local_twin(linear: nn.Linear, kind: str, tp: int, rank: int, group_name: str) -> LocalShardLinear:
    """The :class:`LocalShardLinear` of ``linear`` on tp rank ``rank``.

    A linear this rank holds is DTensor-sharded already (``apply_plan``): the twin's parameters share
    its local shards' storage. A linear of another pipeline stage (plain, only traced, never run here)
    is sliced by DTensor's ``Shard`` rule so the traced program has the shapes every rank's has.
    """
    from torch.distributed.tensor import DTensor

    weight, bias = linear.weight, linear.bias
    if isinstance(weight, DTensor):
        local_w = _local(weight)
        local_b = None if bias is None else _local(bias)
    else:
        dim = 0 if kind == "colwise" else 1
        start, stop = local_range(weight.shape[dim], tp, rank)
        local_w = weight.detach().narrow(dim, start, stop - start).clone()
        local_b = None if bias is None else (bias.detach()[start:stop].clone() if kind == "colwise"
                                             else bias.detach().clone())
    return LocalShardLinear(kind, nn.Parameter(local_w), None if local_b is None else nn.Parameter(local_b),
                            group_name)
