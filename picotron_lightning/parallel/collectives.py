"""Collectives on lists of tensors that several parallel dimensions share."""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def mean_all_reduce_(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Replace every tensor by its mean over ``group``, in place: one flat all-reduce per dtype.

    Every rank of the group must pass tensors of the same dtypes, shapes and order (the order of the
    dtypes is the order of first appearance, so it is the same everywhere). gloo has no AVG: sum, then divide.
    """
    size = dist.get_world_size(group)
    if size == 1 or not tensors:
        return
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        for t, piece in zip(same, flat.split([t.numel() for t in same]), strict=True):
            t.copy_(piece.view_as(t))
