"""Memory management: per-rank estimate, activation checkpointing, OOM recovery, micro-batch finder, GC, allocator.

See docs/memory.md. ``python -m picotron_lightning.memory.estimate --help`` estimates before launch.
"""

from picotron_lightning.memory.checkpointing import CHECKPOINTING_MODES, apply_activation_checkpointing
from picotron_lightning.memory.finder import MicroBatchFinder
from picotron_lightning.memory.oom import OOMRecoveryExhausted
from picotron_lightning.memory.options import MemoryOptions

__all__ = ["CHECKPOINTING_MODES", "MemoryOptions", "MicroBatchFinder", "OOMRecoveryExhausted",
           "apply_activation_checkpointing"]
