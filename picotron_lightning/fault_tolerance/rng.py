"""Every rank's random number generator states, saved in a checkpoint and restored on resume."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist


def rng_state() -> dict[str, Any]:
    """This process's RNG states: Python, torch (CPU), CUDA (when present), NumPy (when installed)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, by global rank (a collective: every rank calls it)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def restore_rng_states(states: list[dict[str, Any]], rank: int) -> bool:
    """Restore this rank's saved states; False (nothing changed) when the world size changed since the save."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if len(states) != world:
        return False  # another layout: a rank's random stream has no counterpart
    set_rng_state(states[rank])
    return True
