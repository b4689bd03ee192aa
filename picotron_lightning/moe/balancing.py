"""LoadBalancer: auxiliary losses, bias balancing and the statistics behind both.

**What is computed.** For ``T`` tokens, ``E`` experts and top-``k`` routing:

- load fractions ``f_e = count_e / (T k)`` (no gradient), mean router probabilities
  ``P_e = mean_t p_te``; Switch/GShard auxiliary loss ``aux = E * sum_e f_e P_e`` (1 when balanced);
- router z-loss ``z = mean_t logsumexp(logits_t)^2``;
- bias balancing: after each optimizer step, ``bias_e += rate * sign(mean(count) - count_e)``
  using the counts of every forward whose backward ran since the previous step.

**Global statistics.** With data (or expert) parallelism each rank routes only its share of the
global batch. ``count`` and the sums behind ``P``, the entropy and the z-loss are all-reduced over
the data-parallel ranks (one all-reduce of ``2E + 4`` numbers per MoE layer and training forward),
so the bias update and the logged values are those of one process on the global batch. The
auxiliary *gradient* each rank injects uses the global ``f`` with its local ``P``:
``E * sum_e f_e^global P_e^local``. Data-parallel gradient averaging over ``dp`` ranks then gives
exactly ``d(E * sum f^global P^global)``, the gradient of the one-process loss on the whole batch.

**Injection.** The losses reach the router without the user adding them to their loss: the MoE
output passes through :class:`AuxLossInjector`, an identity whose backward also returns
``scale`` as the gradient of ``aux_coeff * aux + z_coeff * z``. ``scale`` (default 1) must follow
whatever the user's loss is multiplied by before ``backward``: ``1/accumulate_grad_batches`` under
gradient accumulation, the loss scale under fp16 loss scaling
(:func:`picotron_lightning.parallel.expert.set_aux_loss_scale`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from picotron_lightning.moe.router import Router, RouterOutput

__all__ = ["AuxLossInjector", "BalanceStats", "LoadBalancer", "update_expert_biases"]


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp; spelled out because ``torch.logsumexp`` is several times slower on CPU."""
    peak = logits.detach().amax(dim=-1, keepdim=True)
    return (logits - peak).exp().sum(dim=-1).log() + peak.squeeze(-1)


class BalanceStats:
    """Global (all-reduced) routing statistics of one forward, plus the differentiable local losses."""

    def __init__(self, counts: torch.Tensor, prob_mean: torch.Tensor, entropy: torch.Tensor,
                 z_loss: torch.Tensor, dropped_fraction: torch.Tensor, aux_loss: torch.Tensor,
                 local_aux: torch.Tensor | None, local_z: torch.Tensor | None) -> None:
        self.counts = counts  # (E,) float, assignments per expert over the global batch
        self.prob_mean = prob_mean  # (E,) global mean router probability
        self.entropy = entropy  # global mean per-token router entropy
        self.z_loss = z_loss  # global z-loss value
        self.dropped_fraction = dropped_fraction  # global share of assignments dropped by capacity
        self.aux_loss = aux_loss  # global auxiliary loss value
        self.local_aux = local_aux  # differentiable: E * sum f_global * P_local
        self.local_z = local_z  # differentiable: local z-loss


class AuxLossInjector(torch.autograd.Function):
    """Identity on ``output``; its backward adds ``scale`` as the gradient of ``aux``.

    The balancer's ``on_backward`` runs once per backward of this forward, which is where routing
    counts become "used for training" (a forward under ``no_grad`` never reaches it).
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor, scale: float, balancer: LoadBalancer,
                counts: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        ctx.balancer = balancer
        ctx.counts = counts
        ctx.aux_dtype = aux.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        if ctx.counts is not None:
            ctx.balancer._record_counts(ctx.counts)
        grad_aux = torch.full((), ctx.scale, dtype=ctx.aux_dtype, device=grad_output.device)
        return grad_output, grad_aux, None, None, None


# Balancers with counts waiting for the next optimizer step. One global optimizer hook serves
# them all, so bias balancing works with any training loop (plain torch, Lightning, Fabric).
_PENDING: weakref.WeakSet[LoadBalancer] = weakref.WeakSet()
_HOOK_HANDLE = None


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    for balancer in list(_PENDING):
        balancer.update_bias()


def _ensure_optimizer_hook() -> None:
    global _HOOK_HANDLE
    if _HOOK_HANDLE is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK_HANDLE = register_optimizer_step_post_hook(_after_optimizer_step)


class LoadBalancer(nn.Module):
    """Balancing losses and bias updates for one router.

    Args:
        num_experts: routed experts.
        top_k: experts per token.
        aux_loss_coeff: weight of the Switch/GShard auxiliary loss (0 disables it).
        z_loss_coeff: weight of the router z-loss (0 disables it).
        bias_update_rate: step of the aux-loss-free bias update (0 disables it).
    """

    def __init__(self, num_experts: int, top_k: int, aux_loss_coeff: float = 1e-2, z_loss_coeff: float = 1e-3,
                 bias_update_rate: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_coeff = aux_loss_coeff
        self.z_loss_coeff = z_loss_coeff
        self.bias_update_rate = bias_update_rate
        self.aux_loss_scale = 1.0
        # Process groups whose ranks together hold the data-parallel replicas (set by
        # convert_moe_layers); statistics are summed over each in turn.
        self.stat_groups: Sequence[dist.ProcessGroup] = ()
        self._pending_counts: torch.Tensor | None = None
        self._router: weakref.ref[Router] | None = None
        self.last: BalanceStats | None = None

    def bind(self, router: Router) -> None:
        """Attach the router whose ``expert_bias`` this balancer updates."""
        self._router = weakref.ref(router)

    @property
    def needs_global_stats(self) -> bool:
        return bool(self.aux_loss_coeff or self.z_loss_coeff or self.bias_update_rate)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        for group in self.stat_groups:
            if dist.get_world_size(group) > 1:
                dist.all_reduce(t, group=group)
        return t

    # ------------------------------------------------------------------ forward
    def compute(self, route: RouterOutput, counts: torch.Tensor, dropped: torch.Tensor) -> BalanceStats:
        """Statistics of this forward and the differentiable losses to inject.

        ``counts`` are the local assignments per expert before capacity dropping; ``dropped`` the
        local number of dropped assignments. All-reduces only in training with gradients enabled.
        """
        tokens = route.probs.shape[0]
        probs = route.probs
        training = self.training and torch.is_grad_enabled()  # before no_grad below switches it off
        want_z_grad = training and bool(self.z_loss_coeff)
        with torch.set_grad_enabled(want_z_grad):
            z_per_token = _logsumexp(route.logits).pow(2)
        with torch.no_grad():
            entropy_sum = -(probs * torch.log(probs.clamp_min(1e-20))).sum()
            packed = torch.cat([
                counts.float(), probs.sum(0),
                torch.stack([entropy_sum, z_per_token.detach().sum(), dropped.float(),
                             torch.tensor(float(tokens), device=probs.device)]),
            ])
            if training and self.stat_groups:
                self._all_reduce(packed)
            e = self.num_experts
            g_counts, g_prob_sum = packed[:e], packed[e:2 * e]
            g_entropy, g_z, g_dropped, g_tokens = packed[2 * e:].unbind()
            g_tokens = g_tokens.clamp_min(1.0)
            f = g_counts / (g_tokens * self.top_k)
            g_prob_mean = g_prob_sum / g_tokens
            aux_value = e * (f * g_prob_mean).sum()
        local_aux = local_z = None
        if training and self.aux_loss_coeff:
            local_aux = e * (f * probs.mean(0)).sum()
        if training and self.z_loss_coeff:
            local_z = z_per_token.mean()
        stats = BalanceStats(g_counts, g_prob_mean, g_entropy / g_tokens, g_z / g_tokens,
                             g_dropped / (g_tokens * self.top_k), aux_value, local_aux, local_z)
        self.last = stats
        return stats

    def attach(self, output: torch.Tensor, stats: BalanceStats) -> torch.Tensor:
        """Route the auxiliary gradients (and the bias-count bookkeeping) through ``output``'s backward."""
        if not (self.training and torch.is_grad_enabled() and output.requires_grad):
            return output
        terms = []
        if stats.local_aux is not None:
            terms.append(self.aux_loss_coeff * stats.local_aux)
        if stats.local_z is not None:
            terms.append(self.z_loss_coeff * stats.local_z)
        counts = stats.counts if self.bias_update_rate else None
        if not terms and counts is None:
            return output
        aux = torch.stack(terms).sum() if terms else output.new_zeros((), dtype=torch.float32)
        return AuxLossInjector.apply(output, aux, self.aux_loss_scale, self, counts)

    # ------------------------------------------------------------------ bias balancing
    def _record_counts(self, counts: torch.Tensor) -> None:
        pending = self._pending_counts
        self._pending_counts = counts.clone() if pending is None else pending + counts
        _ensure_optimizer_hook()  # the rate may have been switched on after construction
        _PENDING.add(self)

    def discard_pending(self) -> None:
        """Forget the counts recorded since the last optimizer step (a step attempt that is redone, OOM recovery)."""
        self._pending_counts = None
        _PENDING.discard(self)

    def pending_counts(self) -> torch.Tensor | None:
        """The counts recorded since the last optimizer step (never changed in place: a later record adds a new one)."""
        return self._pending_counts

    def restore_pending(self, counts: torch.Tensor | None) -> None:
        """Go back to ``counts`` (from :meth:`pending_counts`): an accumulated batch that is redone (OOM recovery)
        drops its own counts and keeps the earlier batches' of the same optimizer step."""
        if counts is None:
            self.discard_pending()
            return
        self._pending_counts = counts
        _PENDING.add(self)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Apply the pending bias update now (normally called by the optimizer-step hook)."""
        _PENDING.discard(self)
        counts, self._pending_counts = self._pending_counts, None
        router = self._router() if self._router is not None else None
        if counts is None or router is None or not self.bias_update_rate:
            return
        # sign() is scale-free: the same step whatever the batch size, so a skewed router is
        # pulled back at a steady, bounded rate.
        delta = torch.sign(counts.mean() - counts) * self.bias_update_rate
        router.expert_bias.add_(delta.to(router.expert_bias))


def update_expert_biases(module: nn.Module) -> None:
    """Apply pending bias updates of every balancer inside ``module`` now.

    The optimizer-step hook already does this after each ``optimizer.step()``; call it for loops
    that update parameters without a torch optimizer.
    """
    for m in module.modules():
        if isinstance(m, LoadBalancer):
            m.update_bias()
