"""ExpertLayer: many small MLPs stored as stacked weights and run as grouped matrix products.

Every parameter of an ExpertLayer has the expert index as its leading dimension. That one rule is
what expert parallelism relies on: keeping experts ``[a, b)`` on a rank is a slice of dim 0 of
every parameter, whatever the expert's architecture.

The default expert is SwiGLU, ``down(silu(gate(x)) * up(x))``, with gate and up fused into one
``(experts, hidden, 2 * ffn)`` weight so a token's first product is a single grouped matmul.
Custom experts: pass ``expert_factory``, a callable returning one ``nn.Module`` (same structure
for every expert); the layer stacks their parameters and runs them all at once with
``torch.func.vmap`` over a padded ``(experts, max_tokens, hidden)`` buffer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from picotron_lightning.moe.grouped import grouped_matmul, pad_by_group, unpad_by_group

__all__ = ["ExpertLayer", "SharedExperts"]


class ExpertLayer(nn.Module):
    """``num_experts`` experts applied to tokens sorted by expert.

    Args:
        hidden_size: token width in and out.
        ffn_hidden_size: inner width of each SwiGLU expert.
        num_experts: number of experts held by this module (the local ones under expert parallelism).
        expert_factory: optional callable building one custom expert module ``(n, hidden) -> (n, hidden)``.
        init_std: standard deviation of the initial SwiGLU weights.
        use_grouped_mm: force (True) or forbid (False) ``torch._grouped_mm``; ``None`` probes.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int,
                 expert_factory: Callable[[], nn.Module] | None = None, init_std: float = 0.02,
                 use_grouped_mm: bool | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.num_experts = num_experts
        self.init_std = init_std
        self.use_grouped_mm = use_grouped_mm
        self._template: nn.Module | None = None
        self._custom_names: list[str] = []
        if expert_factory is None:
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * ffn_hidden_size))
            self.down_proj = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
            self.reset_parameters()
        else:
            self._init_custom(expert_factory)

    # ------------------------------------------------------------------ construction
    def _init_custom(self, factory: Callable[[], nn.Module]) -> None:
        modules = [factory() for _ in range(self.num_experts)]
        params, buffers = torch.func.stack_module_state(modules)
        if buffers:
            raise ValueError("Custom experts with buffers are not supported: the stacked form holds"
                             " parameters only.")
        # A stateless copy on the meta device describes the computation for functional_call.
        template = copy.deepcopy(modules[0]).to("meta")
        object.__setattr__(self, "_template", template)  # not a submodule: it owns no real tensors
        for name, value in params.items():
            safe = "custom__" + name.replace(".", "__")
            self._custom_names.append(name)
            self.register_parameter(safe, nn.Parameter(value.detach().clone()))

    def reset_parameters(self) -> None:
        if self._template is None:
            nn.init.normal_(self.gate_up_proj, std=self.init_std)
            nn.init.normal_(self.down_proj, std=self.init_std)

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply expert ``e`` to its ``counts[e]`` rows of ``x`` (rows sorted by expert)."""
        if self._template is not None:
            return self._forward_custom(x, counts)
        w1 = self.gate_up_proj.to(x.dtype)
        w2 = self.down_proj.to(x.dtype)
        h = grouped_matmul(x, w1, counts, self.use_grouped_mm)
        gate, up = h.chunk(2, dim=-1)
        return grouped_matmul(F.silu(gate) * up, w2, counts, self.use_grouped_mm)

    def _forward_custom(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        params = {name: getattr(self, "custom__" + name.replace(".", "__")) for name in self._custom_names}
        template = cast(nn.Module, self._template)  # only called from forward when a template is set

        def one_expert(p: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(template, p, (rows,))

        padded = pad_by_group(x, counts)
        out = torch.vmap(one_expert)(params, padded)
        return unpad_by_group(out, counts)

    def extra_repr(self) -> str:
        kind = type(self._template).__name__ if self._template is not None else "SwiGLU"
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, ffn={self.ffn_hidden_size},"
                f" expert={kind}")


class SharedExperts(nn.Module):
    """``num_shared`` always-on SwiGLU experts, fused into one MLP of width ``num_shared * ffn``.

    Plain parameters instead of ``nn.Linear`` for the same reason as the router: a tensor-parallel
    planner must not split them behind the MoE layer's back.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_shared: int,
                 init_std: float = 0.02) -> None:
        super().__init__()
        width = ffn_hidden_size * num_shared
        self.init_std = init_std
        self.gate_up_proj = nn.Parameter(torch.empty(hidden_size, 2 * width))
        self.down_proj = nn.Parameter(torch.empty(width, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=self.init_std)
        nn.init.normal_(self.down_proj, std=self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up_proj.to(x.dtype)).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down_proj.to(x.dtype)
