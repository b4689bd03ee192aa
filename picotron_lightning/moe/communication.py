"""ExpertCommunication: send each token to the rank that owns its expert, and bring it back.

With ``P`` expert-parallel ranks and ``E`` experts, rank ``p`` owns experts ``[p L, (p+1) L)``,
``L = E / P``. Rows arrive sorted by global expert, so the rows for rank ``p`` are one contiguous
block. A dispatch is:

1. an all-to-all of the ``(P, L)`` per-expert counts, so every rank learns how many rows it
   receives from whom for each of its experts (one small collective, one host sync for sizes);
2. ``all_to_all_single`` of the rows with uneven split sizes;
3. a local reordering from (source rank, expert) to (expert, source rank), so each local expert's
   rows are contiguous for the grouped matmul.

``combine`` undoes 3 and 2 with the split sizes swapped. Both all-to-alls are autograd functions
whose backward is the opposite all-to-all, so gradients flow to the sending rank's tokens and to
the receiving rank's expert weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["ExpertCommunication", "all_to_all_rows"]


class _AllToAllRows(torch.autograd.Function):
    """``all_to_all_single`` over rows with uneven splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        output_splits, input_splits = ctx.splits
        grad_in = grad.new_empty((sum(input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all_rows(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                    group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable uneven all-to-all of the rows of ``x``."""
    return _AllToAllRows.apply(x, output_splits, input_splits, group)


class DispatchHandle(NamedTuple):
    """What :meth:`ExpertCommunication.combine` needs to reverse one dispatch."""

    send_splits: list[int]
    recv_splits: list[int]
    inverse: torch.Tensor


class ExpertCommunication:
    """Token exchange for one MoE layer over the expert-parallel process ``group``.

    Args:
        group: the ``ep`` process group (ranks holding different experts of one replica).
        num_experts: global number of routed experts (divisible by the group size).
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by expert_parallel_size={self.ep_size}.")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size

    @property
    def local_experts(self) -> range:
        """Global indices of the experts this rank owns."""
        return range(self.ep_rank * self.num_local, (self.ep_rank + 1) * self.num_local)

    def dispatch(self, rows: torch.Tensor, counts: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """Send ``rows`` (sorted by global expert, ``counts`` per expert) to their owners.

        Returns the rows this rank's experts must process (sorted by local expert), their
        per-local-expert counts, and a handle for :meth:`combine`.
        """
        p, local = self.ep_size, self.num_local
        send_counts = counts.reshape(p, local).contiguous()
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # One host sync: the split sizes of the row exchange must be Python ints.
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        received = all_to_all_rows(rows, recv_splits, send_splits, self.group)
        # Received rows are grouped (source, expert); the experts need (expert, source).
        segments = torch.arange(p * local, device=rows.device)
        segment = torch.repeat_interleave(segments, recv_counts.reshape(-1))
        key = (segment % local) * p + segment // local
        perm = torch.argsort(key, stable=True)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        handle = DispatchHandle(send_splits, recv_splits, inverse)
        return received.index_select(0, perm), recv_counts.sum(0), handle

    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Return expert outputs to the ranks their tokens came from, in the original row order."""
        back = expert_out.index_select(0, handle.inverse)
        return all_to_all_rows(back, handle.send_splits, handle.recv_splits, self.group)
