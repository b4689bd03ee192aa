"""Memory management: per-rank estimate, activation checkpointing, garbage collection, allocator control.

See docs/memory.md. ``python -m picotron_lightning.memory.estimate --help`` estimates before launch.
"""

from picotron_lightning.memory.checkpointing import CHECKPOINTING_MODES, apply_activation_checkpointing
from picotron_lightning.memory.options import MemoryOptions

__all__ = ["CHECKPOINTING_MODES", "MemoryOptions", "apply_activation_checkpointing"]
