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

**OOM recovery** (``memory.oom_recovery``, :mod:`picotron_lightning.memory.replay`). A rank that runs
out of memory mid-step must still take part in every exchange its peers make, but the row counts
follow the routing, which a trace on fake tensors cannot compute. So while an attempt may fail, each
dispatch keeps its counts (:meth:`ExpertCommunication.dispatch`); under a trace,
:meth:`ExpertCommunication.traced_exchange` records the five collectives of a dispatch and combine
(forward and backward) as protocol calls. Replayed, the failed rank sends no rows: it exchanges zero
counts, learns from the counts it receives how many rows each peer sends it, and returns that many
rows of zeros. Where the failure came half-way through a dispatch, the counts the real exchange kept
give the sizes of the rest. A pipeline stage traces each chunk's computes apart, so it links a backward's
exchanges to its chunk's forward (:func:`traced_exchanges`, :meth:`_ReplayedExchange.sizes_from`;
``parallel/pipeline_parallel/exchange_replay.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from picotron_lightning.memory.replay import CollectiveCall, ProtocolCall, record_protocol_call, recorded_attempt

__all__ = ["ExpertCommunication", "all_to_all_rows", "traced_exchanges"]


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
        # OOM recovery: the counts of each dispatch of the attempt being recorded, and the dispatches a trace
        # of it has met so far (see the module docstring).
        self._kept_attempt: int | None = None
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._traced_attempt: int | None = None
        self._traced_count = 0
        self._traced_forward: _ReplayedExchange | None = None

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
        self._keep_for_replay(send_counts, recv_counts)
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

    # ------------------------------------------------------------------ OOM recovery
    def _keep_for_replay(self, send_counts: torch.Tensor, recv_counts: torch.Tensor) -> None:
        """While an attempt may fail, keep each dispatch's counts (no copy: the tensors are the step's own)."""
        attempt = recorded_attempt()
        if attempt is None:
            return
        if attempt != self._kept_attempt:
            self._kept_attempt, self._kept = attempt, []
        self._kept.append((send_counts, recv_counts))

    def kept_counts(self, attempt: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(ep, local experts)`` counts sent and received by dispatch ``index`` of ``attempt`` (kept by
        :meth:`dispatch`)."""
        if attempt != self._kept_attempt or index >= len(self._kept):
            raise RuntimeError(
                f"no counts were kept for dispatch {index} of attempt {attempt} of this MoE layer: the traced step "
                "has more dispatches than the real one issued counts for (a model whose MoE calls depend on values?)")
        return self._kept[index]

    def kept_dispatches(self) -> int:
        """How many dispatches of the attempt being recorded this layer has kept so far (the index of its next)."""
        return len(self._kept) if self._kept_attempt == recorded_attempt() else 0

    def traced_exchange(self, rows: torch.Tensor) -> torch.Tensor:
        """Under a collective trace: record dispatch and combine (and their backward) as protocol calls.

        Returns zeros shaped like ``rows`` that stand for the combined expert outputs; their backward
        records the two backward all-to-alls. The layer calls this instead of :meth:`dispatch` and
        :meth:`combine` while :func:`picotron_lightning.memory.replay.tracing_collectives` is true.
        """
        attempt = recorded_attempt()
        if attempt is None:
            raise RuntimeError("traced_exchange runs inside an OOM-recovery trace, after an attempt was recorded")
        if self._traced_attempt != attempt:
            self._traced_attempt, self._traced_count, self._traced_forward = attempt, 0, None
        # A dispatch inside backward is activation checkpointing recomputing the last forward's: the peers'
        # recompute checks that it receives what their forward received, so the replay sends the same counts.
        recomputes = torch._C._current_graph_task_id() != -1
        exchange = _ReplayedExchange(self, attempt, self._traced_count, tuple(rows.shape[1:]), rows.dtype, rows.device,
                                     origin=self._traced_forward if recomputes else None)
        if not recomputes:
            self._traced_forward = exchange
        self._traced_count += 1
        return _TracedExchange.apply(rows, exchange)


class _ReplayedExchange:
    """The failed rank's side of one traced dispatch and combine: the sizes its protocol calls share.

    Rows go both ways in the dtype of the tokens dispatched: the experts of :class:`~picotron_lightning.moe.MoELayer`
    compute in their input's dtype, so their outputs (combine) and the gradients (backward) share it.
    """

    def __init__(self, comm: ExpertCommunication, attempt: int, index: int, width: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device, origin: _ReplayedExchange | None) -> None:
        self.comm, self.attempt, self.index, self.origin = comm, attempt, index, origin
        self.width, self.dtype, self.device = width, dtype, device
        self.sent_counts: torch.Tensor | None = None  # (ep, local experts) counts this rank sent, once known
        self.splits: tuple[list[int], list[int]] | None = None  # rows (sent, received) per rank, once known

    def record(self, step: str) -> None:
        record_protocol_call(_ExchangeStep(self, step))

    @property
    def recomputes(self) -> bool:
        """Whether this is activation checkpointing's recomputation of a forward's dispatch (inside a backward)."""
        return self.origin is not None

    def sizes_from(self, forward: _ReplayedExchange) -> None:
        """Take the sizes a replayed ``forward`` exchange learned (a later trace's copy of the same dispatch)."""
        self.sent_counts, self.splits = forward.sent_counts, forward.splits

    def sizes_from_dispatch(self, index: int) -> None:
        """Take the sizes of this layer's real dispatch ``index`` of the attempt (kept by the layer)."""
        sent, received = self.comm.kept_counts(self.attempt, index)
        self.index, self.sent_counts = index, sent
        self.splits = (sent.sum(1).tolist(), received.sum(1).tolist())


def traced_exchanges(calls: list) -> list[_ReplayedExchange]:
    """The token exchanges a trace recorded (:meth:`ExpertCommunication.traced_exchange`), in the order of their
    first collective: what a pipeline stage that replays a chunk's compute links to the chunk's dispatches."""
    seen: dict[int, _ReplayedExchange] = {}
    for call in calls:
        if isinstance(call, _ExchangeStep):
            seen.setdefault(id(call.exchange), call.exchange)
    return list(seen.values())


class _ExchangeStep(ProtocolCall):
    """One of the five collectives of a dispatch and combine, replayed by a rank that sends no rows.

    ``counts`` (forward): zero counts out (the real ones where the failure came after them, the recomputed
    forward's under activation checkpointing), the peers' counts in. ``dispatch``: rows sent to experts;
    ``combine``: expert outputs sent back; ``combine_backward`` and ``dispatch_backward``: their gradients,
    in the opposite directions.
    """

    # Which of (sent, received) each all-to-all of rows sends: dispatch and combine's backward send what the
    # dispatch sent; combine and dispatch's backward send what it received.
    _SENDS_SENT = {"dispatch": True, "combine": False, "combine_backward": True, "dispatch_backward": False}

    def __init__(self, exchange: _ReplayedExchange, step: str) -> None:
        self.exchange, self.step = exchange, step
        self.group = exchange.comm.group.group_name

    def same_as(self, other: CollectiveCall | ProtocolCall) -> bool:
        """The same step of the same layer's exchange (traces of one compute list a layer's exchanges in order)."""
        return (isinstance(other, _ExchangeStep) and other.exchange.comm is self.exchange.comm
                and other.step == self.step)

    def replay(self, issued: bool) -> None:
        ex, comm = self.exchange, self.exchange.comm
        if self.step == "counts":
            if issued:  # the real dispatch exchanged its counts before the failure: the rest follows them
                sent, received = comm.kept_counts(ex.attempt, ex.index)
            else:  # nothing sent, unless this recomputes a forward that sent rows
                origin = ex.origin.sent_counts if ex.origin is not None else None
                sent = origin if origin is not None else torch.zeros(
                    (comm.ep_size, comm.num_local), dtype=torch.long, device=ex.device)
                received = torch.empty_like(sent)
                dist.all_to_all_single(received, sent, group=comm.group)
            ex.sent_counts = sent
            ex.splits = (sent.sum(1).tolist(), received.sum(1).tolist())
            return
        if issued:
            return
        assert ex.splits is not None, "a dispatch's counts are replayed before its rows"
        rows_sent, rows_received = ex.splits
        send, receive = (rows_sent, rows_received) if self._SENDS_SENT[self.step] else (rows_received, rows_sent)
        out = torch.empty((sum(receive), *ex.width), dtype=ex.dtype, device=ex.device)
        zeros = torch.zeros((sum(send), *ex.width), dtype=ex.dtype, device=ex.device)
        dist.all_to_all_single(out, zeros, receive, send, group=comm.group)


class _TracedExchange(torch.autograd.Function):
    """Stands for dispatch, experts and combine in a trace: records the collectives, returns zeros."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, exchange: _ReplayedExchange) -> torch.Tensor:  # type: ignore[override]
        ctx.exchange = exchange
        # Saved only to be unpacked in backward: under activation checkpointing that unpacking recomputes the
        # block (and its exchange) before the backward all-to-alls, as the real layer's backward does.
        ctx.save_for_backward(rows)
        for step in ("counts", "dispatch", "combine"):
            exchange.record(step)
        return torch.zeros_like(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        for step in ("combine_backward", "dispatch_backward"):
            ctx.exchange.record(step)
        return torch.zeros_like(rows), None
