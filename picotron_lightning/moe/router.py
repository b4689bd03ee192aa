"""Router: which experts each token goes to, and with what weight.

Scores are computed in fp32 whatever the model dtype: the softmax over experts and the z-loss
(``logsumexp(logits)^2``) lose the small differences that decide a top-k choice in bf16, and a
flipped choice is a discrete change that no later precision recovers.

Bias balancing (the auxiliary-loss-free method) adds a per-expert bias to the scores *only when
choosing* the top-k experts; the gate weights come from the unbiased scores, so the bias steers
load without distorting what the model outputs. The bias is a buffer updated by the
:class:`~picotron_lightning.moe.balancing.LoadBalancer`, never by the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Router", "RouterOutput"]

ScoreFunc = Literal["softmax", "sigmoid"]


class RouterOutput(NamedTuple):
    """What one routing step produced, for ``tokens`` flattened rows.

    logits: ``(tokens, experts)`` fp32 raw router outputs.
    scores: ``(tokens, experts)`` fp32 softmax or sigmoid of the logits.
    probs: ``(tokens, experts)`` fp32 scores normalised to sum to one per token (equal to
        ``scores`` for softmax); the balancing loss and the entropy use these.
    indices: ``(tokens, top_k)`` chosen experts.
    weights: ``(tokens, top_k)`` fp32 gate weights for the chosen experts.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor


class Router(nn.Module):
    """Top-k token-choice router.

    Args:
        hidden_size: width of the incoming tokens.
        num_experts: number of routed experts.
        top_k: experts per token.
        score_func: ``"softmax"`` over experts or an independent ``"sigmoid"`` per expert.
        renormalize: rescale the top-k gate weights to sum to one; ``None`` means yes for sigmoid
            (its scores do not sum to one) and for softmax with ``top_k > 1``.
        route_scale: constant factor on the gate weights (DeepSeek-V3 style).
        jitter_eps: training-time multiplicative noise ``U(1 - eps, 1 + eps)`` on the router input.
        init_std: standard deviation of the initial router weight.

    The weight is a plain ``(num_experts, hidden_size)`` parameter rather than an ``nn.Linear``:
    tensor-parallel planners that look for linears must leave the router whole.
    """

    expert_bias: torch.Tensor  # a registered buffer (declared for type checkers)

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, score_func: ScoreFunc = "softmax",
                 renormalize: bool | None = None, route_scale: float = 1.0, jitter_eps: float = 0.0,
                 init_std: float = 0.02) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"`top_k={top_k}` must be between 1 and num_experts={num_experts}.")
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"`score_func` must be 'softmax' or 'sigmoid', got {score_func!r}.")
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.renormalize = (score_func == "sigmoid" or top_k > 1) if renormalize is None else renormalize
        self.route_scale = route_scale
        self.jitter_eps = jitter_eps
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # Aux-loss-free balancing offsets; state (saved in checkpoints), not a trained parameter.
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        # Set only by the memory estimate's worst-case routing (memory/routing.py), on its own copy of the
        # model: ``tokens -> (tokens, top_k)`` expert indices that replace the top-k choice. None in training.
        self.forced_choice: Callable[[int], torch.Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)
        self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route ``x`` of shape ``(tokens, hidden)``."""
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x = x * noise
        logits = F.linear(x.float(), self.weight.float())
        if self.score_func == "softmax":
            scores = torch.softmax(logits, dim=-1)
            probs = scores
        else:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        with torch.no_grad():
            # The bias changes the choice only; the choice itself carries no gradient.
            if self.forced_choice is None:
                indices = torch.topk(scores + self.expert_bias, self.top_k, dim=-1, sorted=True).indices
            else:
                indices = self.forced_choice(scores.shape[0]).to(scores.device)
        weights = scores.gather(-1, indices)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.route_scale != 1.0:
            weights = weights * self.route_scale
        return RouterOutput(logits, scores, probs, indices, weights)

    def extra_repr(self) -> str:
        return (f"hidden={self.weight.shape[1]}, experts={self.num_experts}, top_k={self.top_k}, "
                f"score_func={self.score_func}, renormalize={self.renormalize}")
