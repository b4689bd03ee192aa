"""Read routing statistics from MoE layers, whoever wrote them.

Any module with a ``moe_metrics()`` method returning a dict counts as an MoE layer (duck typing,
so a user's own MoE block works if it offers the method). Expected keys, all optional:
``tokens_per_expert`` (E,), and scalars such as ``load_imbalance``, ``load_cv``,
``dropped_fraction``, ``router_entropy``, ``aux_loss``, ``z_loss``.
"""

from __future__ import annotations

import torch
from torch import nn


def moe_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every module under ``module`` with a callable ``moe_metrics``."""
    return [(name, m) for name, m in module.named_modules() if callable(getattr(m, "moe_metrics", None))]


def collect_moe(module: nn.Module, prefix: str = "moe") -> tuple[dict[str, float], torch.Tensor | None]:
    """Scalars per layer (``moe/layer{i}/{key}``) and their mean over layers (``moe/{key}``),
    plus the (layers, experts) token-count matrix when every layer reports the same expert count.
    """
    scalars: dict[str, float] = {}
    sums: dict[str, list[float]] = {}
    counts: list[torch.Tensor] = []
    for i, (_, layer) in enumerate(moe_layers(module)):
        metrics = layer.moe_metrics() or {}  # type: ignore[operator]  # duck-typed; torch types attrs as Tensor | Module
        for key, value in metrics.items():
            if key == "tokens_per_expert":
                counts.append(torch.as_tensor(value).detach().float().reshape(-1).cpu())
                continue
            t = torch.as_tensor(value)
            if t.numel() != 1:
                continue
            v = float(t)
            scalars[f"{prefix}/layer{i}/{key}"] = v
            sums.setdefault(key, []).append(v)
    for key, values in sums.items():
        scalars[f"{prefix}/{key}"] = sum(values) / len(values)
    matrix = torch.stack(counts) if counts and len({c.numel() for c in counts}) == 1 else None
    return scalars, matrix
