"""MoELayer: router + experts + balancing, a drop-in replacement for an MLP.

Data flow for ``T`` tokens and top-``k`` routing:

1. the router picks ``k`` experts and gate weights per token (fp32);
2. the ``T*k`` assignments are sorted by expert (stable, so within an expert by token order);
3. with ``capacity_factor`` set, each expert keeps its first ``ceil(cf * T * k / E)`` assignments
   and the rest are dropped (they add nothing; the block's residual carries the token on);
4. the kept rows go through the experts as grouped matmuls -- locally, or, under expert
   parallelism, through :class:`~picotron_lightning.moe.communication.ExpertCommunication` to the
   ranks that own them and back;
5. outputs are scaled by the gate weights and summed back per token; shared experts are added.

Capacity is counted per rank over that rank's tokens (as in Switch Transformer), so with token
dropping a data-parallel run differs from one process on the global batch; dropless (the
default) has no such difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from picotron_lightning.memory.replay import shapes_only, tracing_collectives
from picotron_lightning.moe.balancing import LoadBalancer
from picotron_lightning.moe.communication import ExpertCommunication
from picotron_lightning.moe.experts import ExpertLayer, SharedExperts
from picotron_lightning.moe.router import Router, ScoreFunc

__all__ = ["MoELayer", "moe_metrics", "sort_by_expert"]


def sort_by_expert(indices: torch.Tensor, num_experts: int, capacity: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the ``(tokens, k)`` assignments by expert, dropping those past ``capacity``.

    Returns ``(order, counts_kept, counts_all, dropped)``: ``order`` indexes the flattened
    assignments (``token = order // k``) of the kept rows sorted by expert; ``counts_kept`` and
    ``counts_all`` are per-expert numbers after and before dropping; ``dropped`` a 0-d count.
    """
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts_all = torch.bincount(flat, minlength=num_experts)
    if capacity is None:
        return order, counts_all, counts_all, torch.zeros((), dtype=torch.long, device=flat.device)
    starts = torch.cumsum(counts_all, 0) - counts_all
    sorted_experts = flat[order]
    position = torch.arange(flat.numel(), device=flat.device) - starts[sorted_experts]
    keep = position < capacity
    counts_kept = counts_all.clamp(max=capacity)
    return order[keep], counts_kept, counts_all, (~keep).sum()


class MoELayer(nn.Module):
    """Mixture-of-experts MLP: ``(batch, seq, hidden) -> (batch, seq, hidden)``.

    Args:
        hidden_size: token width.
        ffn_hidden_size: inner width of each expert.
        num_experts: routed experts.
        top_k: experts per token.
        capacity_factor: ``None`` for dropless; otherwise each expert takes at most
            ``ceil(capacity_factor * tokens * top_k / num_experts)`` assignments per forward.
        score_func: ``"softmax"`` or ``"sigmoid"`` router scores.
        aux_loss_coeff: Switch/GShard load-balancing loss weight.
        z_loss_coeff: router z-loss weight.
        bias_update_rate: aux-loss-free bias balancing step (0: off).
        num_shared_experts: always-active SwiGLU experts of width ``ffn_hidden_size`` each.
        renormalize, route_scale, jitter_eps: see :class:`Router`.
        expert_factory: custom expert module builder, see :class:`ExpertLayer`.
        init_std: initial weight standard deviation.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int = 2, *,
                 capacity_factor: float | None = None, score_func: ScoreFunc = "softmax",
                 aux_loss_coeff: float = 1e-2, z_loss_coeff: float = 1e-3, bias_update_rate: float = 0.0,
                 num_shared_experts: int = 0, renormalize: bool | None = None, route_scale: float = 1.0,
                 jitter_eps: float = 0.0, expert_factory: Callable[[], nn.Module] | None = None,
                 init_std: float = 0.02) -> None:
        super().__init__()
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"`capacity_factor` must be positive or None (dropless), got {capacity_factor}.")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.router = Router(hidden_size, num_experts, top_k, score_func, renormalize, route_scale,
                             jitter_eps, init_std)
        self.experts = ExpertLayer(hidden_size, ffn_hidden_size, num_experts, expert_factory, init_std)
        self.shared_experts = (SharedExperts(hidden_size, ffn_hidden_size, num_shared_experts, init_std)
                               if num_shared_experts else None)
        self.balancer = LoadBalancer(num_experts, top_k, aux_loss_coeff, z_loss_coeff, bias_update_rate)
        self.balancer.bind(self.router)
        # Set by convert_moe_layers; None means all experts are local.
        self.communication: ExpertCommunication | None = None

    def capacity(self, tokens: int) -> int | None:
        """Assignments each expert accepts for ``tokens`` local tokens (None: unlimited)."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:
            # Shape-only dry runs (planners validating a layout on the meta device): routing is
            # data-dependent (bincount, split sizes), the output shape is not.
            return torch.empty_like(x)
        if tracing_collectives():
            return self._traced_forward(x)
        if shapes_only():
            # A recoverable pipeline stage infers its output shapes on fake tensors, where routing cannot run;
            # still a function of x, so the stage's gradient shapes follow too.
            return x * 0
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        route = self.router(tokens)
        with torch.no_grad():
            order, counts_kept, counts_all, dropped = sort_by_expert(
                route.indices, self.num_experts, self.capacity(tokens.shape[0]))
        token_of = order // self.top_k
        rows = tokens.index_select(0, token_of)
        if self.communication is None:
            expert_out = self.experts(rows, counts_kept)
        else:
            local_rows, local_counts, handle = self.communication.dispatch(rows, counts_kept)
            expert_out = self.communication.combine(self.experts(local_rows, local_counts), handle)
        gate = route.weights.reshape(-1).index_select(0, order)
        weighted = expert_out * gate.unsqueeze(-1).to(expert_out.dtype)
        out = torch.zeros_like(tokens).index_add(0, token_of, weighted.to(tokens.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        stats = self.balancer.compute(route, counts_all, dropped)
        out = self.balancer.attach(out, stats)
        return out.view(shape)

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward on fake tensors while OOM recovery traces a failed attempt (``memory/replay.py``).

        Routing cannot run there (``bincount`` and the split sizes need values), and only the collectives
        matter: the token exchange's five (forward and backward) as protocol calls, then the statistics'
        all-reduce, in the real forward's order. The output is zeros of the right shape; the statistics of
        the last real forward are kept for the metrics, and nothing reaches the bias balancing.
        """
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        route = self.router(tokens)
        out = (self.communication.traced_exchange(tokens) if self.communication is not None
               else torch.zeros_like(tokens))
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        # Every parameter gets a gradient (zero) as in the real backward: FSDP2 reduce-scatters only those that do.
        touched = [p.sum() for p in self.parameters() if p.requires_grad]
        if touched:
            out = out + (torch.stack(touched).sum() * 0).to(out.dtype)
        last = self.balancer.last
        no_counts = torch.zeros(self.num_experts, dtype=torch.long, device=tokens.device)
        self.balancer.compute(route, no_counts, no_counts.sum())
        self.balancer.last = last
        return out.view(shape)

    def moe_metrics(self) -> dict[str, torch.Tensor]:
        """Routing statistics of the last forward (global over data-parallel ranks in training).

        Keys: ``tokens_per_expert`` (E,), ``load_imbalance`` (max/mean), ``load_cv`` (std/mean),
        ``dropped_fraction``, ``router_entropy``, ``aux_loss``, ``z_loss`` (unweighted values).
        Empty before the first forward.
        """
        stats = self.balancer.last
        if stats is None:
            return {}
        counts = stats.counts
        mean = counts.mean().clamp_min(1e-9)
        return {
            "tokens_per_expert": counts.detach(),
            "load_imbalance": (counts.max() / mean).detach(),
            "load_cv": (counts.std(unbiased=False) / mean).detach(),
            "dropped_fraction": stats.dropped_fraction.detach(),
            "router_entropy": stats.entropy.detach(),
            "aux_loss": stats.aux_loss.detach(),
            "z_loss": stats.z_loss.detach(),
        }

    def extra_repr(self) -> str:
        ep = self.communication.ep_size if self.communication is not None else 1
        return f"capacity_factor={self.capacity_factor}, expert_parallel={ep}"


def moe_metrics(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{qualified layer name: layer.moe_metrics()}`` for every MoE layer inside ``module``."""
    return {name: m.moe_metrics() for name, m in module.named_modules() if isinstance(m, MoELayer)}
