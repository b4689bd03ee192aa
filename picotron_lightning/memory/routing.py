"""Worst-case MoE routing for the memory estimate: a bound on any batch's expert-side memory, not one batch's.

A rank's memory in an MoE layer follows two counts: the assignments it sends out (its own tokens' kept
``(token, expert)`` pairs) and the rows its experts receive from every expert-parallel rank. Both depend on
the router's choice, i.e. on the batch. For target expert-parallel rank ``j`` (owning the ``L`` experts
``[j L, (j+1) L)``) the routing here makes every rank's tokens choose as follows:

- dropless (``capacity_factor`` None): every token picks ``j``'s first ``m = min(top_k, L)`` experts (the
  rest of its ``top_k``, if any, the first other experts). ``j`` receives ``ep * T * m`` rows, the most any
  routing can send it (a token picks distinct experts), and each of those experts the most rows one expert
  can get (``T`` per sending rank), which the padded ``bmm`` fallback of the grouped matmul pays for. A rank
  always sends ``T * top_k`` rows without a capacity, whatever the routing.
- with a capacity ``c`` per expert (``MoELayer.capacity(T)``): the assignments fill ``j``'s experts first, in
  round robin, until each holds ``min(T, c)``; every later assignment goes round robin to the other experts.
  ``j`` receives ``ep * min(T * m, L * min(T, c))`` kept rows, the bound (capacity x local experts x sending
  ranks, or all the tokens a rank can send there), and each of its experts ``min(T, c)`` per sending rank;
  the assignments that do not fit there go where they are kept, so the sending side keeps as many as the
  other experts' capacity allows.

The estimate traces one step per target rank ``j`` (every rank of the expert-parallel group takes the same
``j`` in turn, so the collectives match) and charges each rank the largest of its peaks. At ``ep = 1`` a
dropless layer sends ``T * top_k`` rows through the same grouped matmul whatever the routing, so nothing is
forced there; a capacity makes the kept rows depend on routing at any ``ep``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from picotron_lightning.moe.layer import MoELayer
    from picotron_lightning.moe.router import Router

__all__ = ["ROUTING_ASSUMPTIONS", "forced_routing", "routing_targets", "worst_case_choice"]

ROUTING_ASSUMPTIONS = ("worst_case", "measured")
"""``memory.moe_routing``: charge the worst-case routing (a bound), or the routing of the batch traced."""


@functools.lru_cache(maxsize=64)
def worst_case_choice(tokens: int, top_k: int, num_experts: int, first_local: int, num_local: int,
                      capacity: int | None) -> torch.Tensor:
    """``(tokens, top_k)`` expert indices that send the most kept rows to experts
    ``[first_local, first_local + num_local)`` (see the module docstring); each row holds distinct experts."""
    local = list(range(first_local, first_local + num_local))
    others = [e for e in range(num_experts) if e not in local]
    m = min(top_k, num_local)
    if capacity is None:
        row = local[:m] + others[: top_k - m]
        return torch.tensor([row] * tokens, dtype=torch.long).reshape(tokens, top_k)
    full = min(tokens, capacity)  # the most kept rows one expert can hold from one sending rank
    counts = dict.fromkeys(range(num_experts), 0)
    next_local = next_other = 0
    choice: list[list[int]] = []
    for _ in range(tokens):
        picks: list[int] = []
        for _ in range(num_local):  # round robin over the target's experts that still have room
            if len(picks) == m:
                break
            e = local[next_local % num_local]
            next_local += 1
            if counts[e] < full:
                picks.append(e)
        for _ in range(min(top_k - len(picks), len(others))):  # then round robin over the other experts
            picks.append(others[next_other % len(others)])
            next_other += 1
        picks += [e for e in local if e not in picks][: top_k - len(picks)]  # top_k > other experts: dropped
        for e in picks:
            counts[e] += 1
        choice.append(picks)
    return torch.tensor(choice, dtype=torch.long).reshape(tokens, top_k)


def _moe_layers(module: nn.Module) -> list[MoELayer]:
    from picotron_lightning.moe.layer import MoELayer

    return [m for m in module.modules() if isinstance(m, MoELayer)]


def routing_targets(module: nn.Module) -> int:
    """How many target ranks the worst case needs traced: the expert-parallel size if an MoE layer's memory
    depends on its routing (expert parallelism, or a capacity), else 0 (no MoE layer, or dropless at ep=1)."""
    sizes = [layer.communication.ep_size if layer.communication is not None else 1 for layer in _moe_layers(module)
             if layer.communication is not None or layer.capacity_factor is not None]
    return max(sizes, default=0)


@contextlib.contextmanager
def forced_routing(module: nn.Module, target: int) -> Iterator[None]:
    """Route every MoE layer of ``module`` (a parallelized model) to expert-parallel rank ``target``'s experts
    in the worst case while the context is open. The estimate's own copy of the model only."""
    routers: list[Router] = []
    for layer in _moe_layers(module):
        ep = layer.communication.ep_size if layer.communication is not None else 1
        num_local = layer.num_experts // ep

        def choose(tokens: int, layer: MoELayer = layer, num_local: int = num_local) -> torch.Tensor:
            return worst_case_choice(tokens, layer.top_k, layer.num_experts, target * num_local, num_local,
                                     layer.capacity(tokens)).clone()

        layer.router.forced_choice = choose
        routers.append(layer.router)
    try:
        yield
    finally:
        for router in routers:
            router.forced_choice = None
