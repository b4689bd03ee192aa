"""Small helpers several parts of the package share (a leaf module: imports nothing from the package or torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending (the sizes that would work, for error messages)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def join_name(*parts: str) -> str:
    """A qualified module name from its parts, skipping empty ones (``""`` is the root)."""
    return ".".join(p for p in parts if p)


def num_params(module: nn.Module) -> int:
    """Number of parameter elements in ``module`` and its children."""
    return sum(p.numel() for p in module.parameters())
