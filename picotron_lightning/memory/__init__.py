"""Memory management: per-rank estimate, activation checkpointing, OOM recovery, micro-batch finder, GC, allocator.

See docs/memory.md. ``python -m picotron_lightning.memory.estimate --help`` estimates before launch.
"""

from picotron_lightning.memory.checkpointing import CHECKPOINTING_MODES, apply_activation_checkpointing
from picotron_lightning.memory.oom import OOMRecoveryExhausted
from picotron_lightning.memory.options import MemoryOptions

# MicroBatchFinder: `from picotron_lightning.memory.finder import MicroBatchFinder` (it uses the estimate,
# which uses `parallelize`, which imports this package: exporting it here would make a cycle).
__all__ = ["CHECKPOINTING_MODES", "MemoryOptions", "OOMRecoveryExhausted", "apply_activation_checkpointing"]
