"""The gradient norm of the whole model, whatever the layout, in one all-reduce.

Every rank holds pieces of the gradients: FSDP shards, tensor-parallel shards, one pipeline
stage's parameters, its own experts, or a full replica. Summing squares over all ranks would
count a replicated piece once per copy, so each rank divides its local sum by the number of
ranks that hold the same piece. With ``ranks_per_stage`` ranks holding some piece of every
parameter of their stage, a parameter split into ``pieces`` distinct parts has
``ranks_per_stage / pieces`` copies of each part.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

# Plain (non-DTensor) parameters that differ between ranks mark how many distinct pieces exist
# per stage with this attribute; expert parallelism sets it to the expert-parallel size.
DISTINCT_PIECES_ATTR = "_picotron_distinct_pieces"

# The last pipeline stage's copy of a weight tied to the first stage (tied embeddings) carries this
# attribute: the weight is counted once, on the first stage (the copies' gradients are equal).
TIED_COPY_ATTR = "_picotron_tied_copy"


def _local_piece(grad: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The locally held part of a gradient and into how many distinct parts the full one is split."""
    from torch.distributed.tensor import DTensor

    if isinstance(grad, DTensor):
        mesh = grad.device_mesh
        pieces = 1
        for dim, placement in enumerate(grad.placements):
            if placement.is_shard():
                pieces *= mesh.size(dim)
        return grad.to_local(), pieces
    return grad, 1


@torch.no_grad()
def global_grad_norm(
    parameters: Iterable[torch.nn.Parameter],
    norm_type: float = 2.0,
    ranks_per_stage: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The norm of all gradients of the model across all ranks; the same value on every rank.

    Args:
        parameters: this rank's parameters (sharded, replicated or stage-local).
        norm_type: 2.0 or ``inf``.
        ranks_per_stage: ranks that share one pipeline stage (world size / pp); defaults to the world size.
        group: the group spanning the whole model (default: world).
    """
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size(group) if distributed else 1
    per_stage = ranks_per_stage or world
    params_with_grad = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params_with_grad if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    if math.isinf(norm_type):
        total = torch.zeros((), device=device, dtype=torch.float32)
        for grad in grads:
            local, _ = _local_piece(grad)
            if local.numel():
                total = torch.maximum(total, local.detach().abs().max().float())
        if distributed:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        return total
    if norm_type != 2.0:
        raise ValueError(f"`norm_type` must be 2.0 or inf, got {norm_type}.")
    # Group the local pieces by how many ranks hold each copy, then one fused norm per group.
    by_copies: dict[float, list[torch.Tensor]] = {}
    for p, grad in zip(params_with_grad, grads, strict=True):
        if getattr(p, TIED_COPY_ATTR, False):
            continue
        local, pieces = _local_piece(grad)
        pieces *= getattr(p, DISTINCT_PIECES_ATTR, 1)
        if local.numel():
            by_copies.setdefault(per_stage / pieces, []).append(local.detach())
    total = torch.zeros((), device=device, dtype=torch.float32)
    for copies, tensors in by_copies.items():
        total += torch.nn.utils.get_total_norm(tensors, 2.0).float().pow(2) / copies
    if distributed:
        dist.all_reduce(total, group=group)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.nn.Parameter],
    max_norm: float,
    norm_type: float = 2.0,
    ranks_per_stage: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Scale all gradients so that their global norm is at most ``max_norm``; return the norm before."""
    params = [p for p in parameters if p.grad is not None]
    total = global_grad_norm(params, norm_type, ranks_per_stage, group)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in [p.grad for p in params if p.grad is not None]:
        local, _ = _local_piece(grad)
        local.mul_(coef.to(local.device, local.dtype))
    return total
