"""Options of the memory step (activation checkpointing), one section of the strategy's options."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class MemoryOptions:
    """How the strategy trades compute for memory."""

    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward: activation memory of one block
    instead of all, for about one more forward pass of compute."""

    def __post_init__(self) -> None:
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(
                f"`activation_checkpointing` must be True or False, got {self.activation_checkpointing!r}."
            )
