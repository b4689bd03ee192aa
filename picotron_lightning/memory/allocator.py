"""The CUDA caching allocator: ``expandable_segments`` before CUDA starts, ``empty_cache`` when fragmented.

The decisions are pure functions of numbers and strings (tested on CPU); the callback applies them.
Fragmentation is ``(reserved - allocated) / reserved``: memory the allocator holds that no tensor
uses. Releasing it (``torch.cuda.empty_cache``) synchronises the device, so it happens only at a step
boundary, on every rank at the same step (the ranks agree with one all-reduce of a flag).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import MutableMapping

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE = "expandable_segments"


def with_expandable_segments(conf: str | None) -> str:
    """``conf`` (the allocator setting string) with ``expandable_segments:True``; other options kept.

    An explicit ``expandable_segments:False`` is the user's choice and is kept.
    """
    options = [part.strip() for part in (conf or "").split(",") if part.strip()]
    if any(part.split(":", 1)[0].strip() == EXPANDABLE for part in options):
        return ",".join(options)
    return ",".join([*options, f"{EXPANDABLE}:True"])


def expandable_segments_action(conf: str | None, cuda_initialized: bool) -> tuple[str | None, str | None]:
    """What to do: ``(new setting or None, warning or None)``.

    Before CUDA initialises the setting can still be changed; afterwards the allocator has read it,
    and a warning says the option has no effect in this process.
    """
    wanted = with_expandable_segments(conf)
    if wanted == (conf or ""):
        return None, None
    if cuda_initialized:
        return None, (
            f"memory.expandable_segments=True has no effect: CUDA was initialised before the strategy was created. "
            f"Set {ALLOC_CONF}={wanted} in the environment before starting Python, or create the strategy earlier."
        )
    return wanted, None


def configure_expandable_segments(enabled: bool, env: MutableMapping[str, str] | None = None) -> bool:
    """Set ``expandable_segments`` in the environment if CUDA is present and not yet initialised; True if set."""
    import torch

    if not enabled or not torch.cuda.is_available():
        return False
    env = os.environ if env is None else env
    new, warning = expandable_segments_action(env.get(ALLOC_CONF), torch.cuda.is_initialized())
    if warning:
        warnings.warn(warning, stacklevel=3)
    if new is None:
        return False
    env[ALLOC_CONF] = new
    return True


def fragmentation(reserved: int, allocated: int) -> float:
    """Share of reserved bytes no tensor uses (0 when nothing is reserved)."""
    return (reserved - allocated) / reserved if reserved > 0 else 0.0


def should_empty_cache(reserved: int, allocated: int, threshold: float, min_bytes: int) -> bool:
    """Whether this rank's allocator is fragmented enough to release its cache."""
    return threshold < 1.0 and reserved - allocated >= min_bytes and fragmentation(reserved, allocated) > threshold


def is_check_step(step: int, every_n_steps: int) -> bool:
    """Whether the ranks compare fragmentation after ``step`` (>= 1)."""
    return step > 0 and step % every_n_steps == 0
