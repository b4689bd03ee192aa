"""DTensor styles beyond ``torch.distributed.tensor.parallel``'s: uneven row-wise, transposed and fused linears.

* :class:`UnevenRowwiseParallel`: ``RowwiseParallel`` whose input annotation states the global width.
  Torch's ``DTensor.from_local`` otherwise assumes every rank holds the same width and infers
  ``local * tp``, so a width tp does not divide (an MLP of 129 features) fails in the matmul's
  sharding propagation. With the shape given, uneven shards run as even ones do.
* :class:`LocalLinearParallel`: a linear-like layer whose parameters are DTensors (so checkpoints,
  the gradient norm and FSDP2 see the model's own shapes and names) but whose forward runs on local
  tensors. Used for transposed linears (HF ``Conv1D``: DTensor's matmul rules do not know the
  layer's ``addmm(bias, x, weight)`` layout) and for fused column-wise layers (``groups`` > 1).

A fused layer keeps its weight sharded *contiguously* in the model's own column order, the layout
DCP stores and any tp size can load. Each forward gathers the weight (one all-gather, the size of the
layer's weight) and takes this rank's columns of each part (its q, k and v heads); the backward
reduce-scatters the weight gradient back to the contiguous shards. That costs one weight-sized
collective each way per step, in exchange for checkpoints and optimizer states that are the
one-process ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, RowwiseParallel

from picotron_lightning.parallel.tensor_parallel.linears import (
    bias_of,
    local_indices,
    out_dim,
    out_features,
    weight_of,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

SEQUENCE_DIM = 1


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def _from_local_with_width(x: torch.Tensor, mesh: DeviceMesh, placements: Any, width: int) -> DTensor:
    """``DTensor.from_local`` of a tensor sharded on its last dim, stating the global ``width``."""
    shape = (*x.shape[:-1], width)
    return DTensor.from_local(x, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


class UnevenRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` that also works when tp does not divide the layer's input features."""

    @staticmethod
    def _prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh):  # noqa: ANN001, ANN205
        x = inputs[0]
        if isinstance(mod, nn.Linear) and not isinstance(x, DTensor) and input_layouts == (Shard(-1),):
            x = _from_local_with_width(x, device_mesh, input_layouts, weight_of(mod).shape[1])
        return RowwiseParallel._prepare_input_fn(input_layouts, desired_input_layouts, mod, (x,), device_mesh)


def _replicated_input_local(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The full input of a column-wise layer as a local tensor whose gradient is summed over tp.

    Each rank's input gradient covers only its output features (a partial sum); marking it
    ``Partial`` makes the DTensor boundary (here, or the norm's output) all-reduce it once.
    """
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    elif any(not p.is_replicate() for p in x.placements):
        x = x.redistribute(mesh, [Replicate()])
    return x.to_local(grad_placements=[Partial()])


class LocalLinearParallel(ParallelStyle):
    """Column- or row-wise sharding of a linear-like layer, computed on local tensors (module docstring).

    ``kind``: ``"colwise"`` or ``"rowwise"``. ``groups``: equal parts of a fused column-wise output.
    ``sequence_parallel``: a row-wise output reduce-scattered along the sequence instead of all-reduced.
    """

    def __init__(self, kind: str, groups: int = 1, sequence_parallel: bool = False) -> None:
        super().__init__()
        if kind not in ("colwise", "rowwise") or groups < 1 or (groups > 1 and kind != "colwise"):
            raise ValueError(f"LocalLinearParallel: kind={kind!r}, groups={groups} is not a supported combination.")
        self.kind, self.groups, self.sequence_parallel = kind, groups, sequence_parallel

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name:
            return
        dim = out_dim(module)
        weight_dim = dim if self.kind == "colwise" else 1 - dim
        bias_placement = [Shard(0)] if self.kind == "colwise" else [Replicate()]
        for pname, placement in (("weight", [Shard(weight_dim)]), ("bias", bias_placement)):
            param = getattr(module, pname, None)
            if param is None:
                continue
            dist = distribute_tensor(param.detach(), mesh, placement, src_data_rank=self.src_data_rank)
            module.register_parameter(pname, nn.Parameter(dist, requires_grad=param.requires_grad))

    def _local_params(self, module: nn.Module, mesh: DeviceMesh) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = weight_of(module), bias_of(module)
        if self.groups == 1:
            return weight.to_local(), None if bias is None else bias.to_local()
        # Fused: gather, then this rank's columns of each part; the gradient (partial: zero outside
        # those columns) is reduce-scattered back to the contiguous shards.
        rank = mesh.get_local_rank()
        dim = out_dim(module)
        idx = local_indices(out_features(module), mesh.size(), rank, self.groups).to(weight.device)
        full_w = weight.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        local_b = None
        if bias is not None:
            local_b = bias.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()]).index_select(0, idx)
        return full_w.index_select(dim, idx), local_b

    def _forward(self, module: nn.Module, mesh: DeviceMesh, x: torch.Tensor) -> torch.Tensor:
        transposed = out_dim(module) == 1
        if self.kind == "colwise":
            x_local = _replicated_input_local(x, mesh)
            weight, bias = self._local_params(module, mesh)
            return _matmul(x_local, weight, bias, transposed)
        x_local = x.to_local() if isinstance(x, DTensor) else x
        weight = weight_of(module).to_local()
        partial = _matmul(x_local, weight, None, transposed)
        out_placement = [Shard(SEQUENCE_DIM)] if self.sequence_parallel else [Replicate()]
        out = _from_local_with_width(partial, mesh, [Partial()], out_features(module)).redistribute(
            mesh, out_placement).to_local()
        bias = bias_of(module)
        if bias is not None:
            # Sequence-parallel: each rank adds the bias to its slice of positions, so its gradient is partial.
            out = out + bias.to_local(grad_placements=[Partial()] if self.sequence_parallel else None)
        return out

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or weight_of(module).dim() != 2:
            raise ValueError(f"LocalLinearParallel needs a linear-like layer, got {type(module).__name__}.")
        distribute_module(module, device_mesh, self._partition)
        style = self

        def forward(x: torch.Tensor) -> torch.Tensor:
            return style._forward(module, device_mesh, x)

        module.forward = forward  # type: ignore[method-assign]  # the layer's own math, on local shards
        return module

    def __repr__(self) -> str:
        return (f"LocalLinearParallel(kind={self.kind!r}, groups={self.groups}, "
                f"sequence_parallel={self.sequence_parallel})")


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """``x @ W^T + b`` for ``nn.Linear`` weights, ``x @ W + b`` for transposed ones."""
    out = x @ (weight if transposed else weight.t())
    return out if bias is None else out + bias
