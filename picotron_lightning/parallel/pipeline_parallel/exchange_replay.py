"""MoE token exchanges (``expert_parallel_size > 1``) of a pipeline stage that runs hollow after an OOM.

An MoE layer at ep > 1 exchanges tokens with the other ranks of its ``ep`` group (replicas of the
same stage) in a chunk's forward (counts, dispatch, combine) and again in the chunk's backward (the
gradients of combine and dispatch, in the opposite directions), with sizes that follow the chunk's
routing. A stage that ran out of memory still takes part in each of them, as a rank that sends no
tokens (``moe/communication.py``): its forward replay exchanges zero counts and learns how many rows
each peer sends it; the chunk's backward replay must then send back gradients for exactly those rows.

The stage replays each compute from a trace of it on fake tensors (``recovery.py``), one trace per
chunk here (the sizes differ between chunks), and the trace of a backward starts with the chunk's
forward again. :class:`ChunkExchanges` links those traces to what the chunk really did:

* before each real forward and backward of a chunk, the number of dispatches each layer has kept in
  the attempt (so the k-th exchange of that compute is the layer's dispatch ``start + k``: where the
  failure came half-way through it, the replay reads the sizes the real exchange used);
* the exchanges of a chunk's replayed forward, whose sizes the replay learned, for its backward;
* a backward's trace (or a zero-bubble backward's input half, where its exchanges run) takes, for each
  exchange of its forward part, the sizes of that chunk's forward:
  the replayed one's, or the real dispatch's kept counts. Activation checkpointing recomputes a block's
  forward inside its backward; the recomputed dispatch sends what the forward sent (its origin), and is
  the layer's dispatch ``start + k`` of the backward.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from picotron_lightning.moe.communication import ExpertCommunication, traced_exchanges


def _by_layer(exchanges: Iterable[Any]) -> Iterator[tuple[Any, int]]:
    """Each exchange with its position among the exchanges of the same layer (in order)."""
    seen: dict[int, int] = {}
    for exchange in exchanges:
        position = seen.get(id(exchange.comm), 0)
        seen[id(exchange.comm)] = position + 1
        yield exchange, position


class ChunkExchanges:
    """What each chunk of one schedule run exchanged, for the replays of a stage's MoE layers (module doc)."""

    def __init__(self, stage_module: nn.Module) -> None:
        self.layers = [layer for m in stage_module.modules()
                       if isinstance(layer := getattr(m, "communication", None), ExpertCommunication)]
        self._starts: dict[tuple[str, int], dict[int, int]] = {}
        self._replayed_forwards: dict[int, list[Any]] = {}

    def compute_starts(self, kind: str, chunk: int) -> None:
        """Before a chunk's forward or backward: each layer's dispatches kept so far in the attempt."""
        self._starts[(kind, chunk)] = {id(layer): layer.kept_dispatches() for layer in self.layers}

    def link_forward(self, chunk: int, calls: list) -> None:
        """A chunk's forward traced for its replay: number its exchanges as the layers' dispatches, keep them."""
        exchanges = traced_exchanges(calls)
        starts = self._starts.get(("forward", chunk), {})
        for exchange, position in _by_layer(exchanges):
            exchange.index = starts.get(id(exchange.comm), 0) + position
        self._replayed_forwards[chunk] = exchanges

    def link_backward(self, chunk: int, forward_calls: list, backward_calls: list) -> None:
        """A chunk's backward traced (``forward_calls``: its trace's forward part, not replayed): give its exchanges
        the sizes of the chunk's forward, and number the recomputed ones as the backward's dispatches."""
        replayed = self._replayed_forwards.get(chunk)
        by_position = {(id(e.comm), p): e for e, p in _by_layer(replayed)} if replayed is not None else {}
        starts = self._starts.get(("forward", chunk))
        for exchange, position in _by_layer(traced_exchanges(forward_calls)):
            if replayed is not None:
                exchange.sizes_from(by_position[(id(exchange.comm), position)])
            elif starts is not None:
                exchange.sizes_from_dispatch(starts[id(exchange.comm)] + position)
            else:
                raise RuntimeError(f"`memory.oom_recovery`: the backward of chunk {chunk} has no forward to take the "
                                   "sizes of its MoE token exchanges from")
        backward_starts = self._starts.get(("backward", chunk), {})
        recomputed = [e for e in traced_exchanges(backward_calls) if e.recomputes]
        for exchange, position in _by_layer(recomputed):
            exchange.index = backward_starts.get(id(exchange.comm), 0) + position

    def clear(self) -> None:
        self._starts.clear()
        self._replayed_forwards.clear()
