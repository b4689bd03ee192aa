"""Memory policies the strategy applies before data parallelism (activation checkpointing)."""

from picotron_lightning.memory.checkpointing import apply_activation_checkpointing

__all__ = ["apply_activation_checkpointing"]
