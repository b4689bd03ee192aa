"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), safe against bad input.

A checkpoint is a directory: DCP shards of the model and optimizer states written by every rank,
plus ``meta.pt`` with everything else (loop state, callbacks, hyper-parameters) from rank 0.
Because DCP stores global tensor shapes, a checkpoint loads into any other layout of the same
model (a different data-parallel, tensor-parallel or pipeline size).

Two promises about bad input:

* **Saving never destroys the previous checkpoint.** Shards go to ``<path>.partial`` first; only
  when every rank has finished is the completeness marker written and the old directory swapped out
  (``picotron_lightning.fault_tolerance``: a directory without the marker is never loaded).
* **Loading a wrong checkpoint changes nothing.** Keys and shapes are compared with the live
  model before any tensor is read, and tensors are read into scratch copies that replace the live
  state only once the whole read succeeded.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.optim import Optimizer

from picotron_lightning.fault_tolerance.completeness import MARKER_FILE, is_complete
from picotron_lightning.fault_tolerance.writer import CheckpointWriter

METADATA_FILE = "meta.pt"
DCP_METADATA_FILE = ".metadata"
MODEL_KEY = "model"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this model; nothing was changed."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save_sharded`."""
    p = Path(path)
    return p.is_dir() and (p / DCP_METADATA_FILE).is_file()


def _model_state(module: nn.Module) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module)


def _optimizer_state(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # Flattened: hyper-parameters keyed per parameter name. A nested `param_groups` list is one object
    # that DCP keeps from a single rank, which loses the groups of the other pipeline stages' parameters.
    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))


def collect_state(
    module: nn.Module, optimizers: Sequence[Optimizer] = (), optimizer_keys: Sequence[str] | None = None
) -> dict[str, Any]:
    """Sharded state dicts of ``module`` and ``optimizers`` keyed for :func:`save_sharded`."""
    keys = list(optimizer_keys or [f"optimizer_{i}" for i in range(len(optimizers))])
    state: dict[str, Any] = {MODEL_KEY: _model_state(module)}
    for key, optimizer in zip(keys, optimizers, strict=True):
        state[key] = _optimizer_state(module, optimizer)
    return state


def save_sharded(
    path: str | Path, state: dict[str, Any], metadata: dict[str, Any] | None = None, writer: Any = None
) -> Path:
    """Write ``state`` (see :func:`collect_state`) as a sharded checkpoint in the directory ``path``.

    Every rank must call this. ``metadata`` (any picklable object) is written by rank 0. ``writer`` (a
    :class:`~picotron_lightning.fault_tolerance.writer.CheckpointWriter`) chooses asynchronous saving and
    retention; by default the save is synchronous. The checkpoint counts as complete only once its marker
    is written, last (see ``picotron_lightning/fault_tolerance/completeness.py``).
    """
    path = Path(path)
    if _rank() == 0 and path.exists() and not path.is_dir():
        raise CheckpointError(f"Checkpoint path {path} exists and is a file; sharded checkpoints are directories. "
                              "Choose another path or remove the file.")
    return (writer or CheckpointWriter()).save(path, state, metadata)


def _tensor_shapes(state: Any, prefix: str = "") -> dict[str, torch.Size]:
    """Flattened ``key -> global shape`` of every tensor in a nested state dict, DCP-style keys."""
    out: dict[str, torch.Size] = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_tensor_shapes(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_tensor_shapes(v, f"{prefix}.{i}"))
    elif isinstance(state, torch.Tensor):
        out[prefix] = state.shape
    return out


def _scratch_copy(state: Any) -> Any:
    """Same structure and sharding, fresh storage: DCP reads into this, not into the live model."""
    if isinstance(state, dict):
        return {k: _scratch_copy(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_scratch_copy(v) for v in state]
    if isinstance(state, torch.Tensor):
        return torch.empty_like(state)
    return state


def _check_compatible(path: Path, expected: dict[str, Any]) -> None:
    reader = dcp.FileSystemReader(str(path))
    try:
        saved = reader.read_metadata().state_dict_metadata
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - any failure here means an unreadable checkpoint
        raise CheckpointError(f"Checkpoint {path} is corrupt: its DCP metadata cannot be read ({err}).") from err
    wanted = _tensor_shapes(expected)
    missing = sorted(k for k in wanted if k not in saved)
    if missing:
        raise CheckpointError(
            f"Checkpoint {path} does not match this model: {len(missing)} tensor(s) are missing, e.g. "
            f"{missing[:3]}. Was it saved from a different model or optimizer? Nothing was loaded."
        )
    wrong = []
    for k, shape in wanted.items():
        meta = saved[k]
        if isinstance(meta, TensorStorageMetadata) and tuple(meta.size) != tuple(shape):
            wrong.append((k, tuple(meta.size), tuple(shape)))
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(
            f"Checkpoint {path} does not match this model: {k} has shape {got} in the checkpoint but "
            f"{want} here ({len(wrong)} mismatched tensor(s)). Nothing was loaded."
        )


def load_sharded(
    path: str | Path,
    module: nn.Module,
    optimizers: Sequence[Optimizer] = (),
    optimizer_keys: Sequence[str] | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_sharded` in place; return its metadata.

    Raises `CheckpointError` (and leaves ``module`` and ``optimizers`` untouched) when ``path`` is
    not a checkpoint, is corrupt, or holds a different model.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if not is_sharded_checkpoint(path):
        raise CheckpointError(
            f"{path} is not a sharded picotron-lightning checkpoint (a directory with {DCP_METADATA_FILE} and "
            f"{METADATA_FILE}). Pass the directory that `save_checkpoint` wrote."
        )
    if not (path / METADATA_FILE).is_file():
        raise CheckpointError(f"Checkpoint {path} is incomplete: {METADATA_FILE} is missing. Nothing was loaded.")
    # Fault tolerance: only a checkpoint whose completeness marker was written (last) is loaded.
    if not is_complete(path):
        raise CheckpointError(f"Checkpoint {path} is incomplete: its marker {MARKER_FILE} (written after every "
                              "rank's part) is missing, so a rank died while writing it. Nothing was loaded; "
                              "use an earlier checkpoint.")
    keys = list(optimizer_keys or [f"optimizer_{i}" for i in range(len(optimizers))])
    live = collect_state(module, optimizers, keys)
    expected = live if strict else {MODEL_KEY: live[MODEL_KEY]}
    _check_compatible(path, expected)
    scratch = _scratch_copy(live)
    try:
        dcp.load(scratch, checkpoint_id=str(path))
        # Our own file, written by save_sharded; it holds arbitrary Python objects (loop state).
        metadata = torch.load(path / METADATA_FILE, map_location="cpu", weights_only=False)
    # DCP's CheckpointException derives from BaseException, not Exception.
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - re-raised with the path
        cause = (str(err).strip().splitlines() or [type(err).__name__])[-1]  # DCP wraps a traceback per rank
        raise CheckpointError(f"Checkpoint {path} could not be read ({cause}). "
                              "The model and optimizer were left unchanged.") from err
    options = StateDictOptions(strict=strict)
    set_model_state_dict(module, scratch[MODEL_KEY], options=options)
    optim_options = StateDictOptions(strict=strict, flatten_optimizer_state_dict=True)  # as saved
    for key, optimizer in zip(keys, optimizers, strict=True):
        set_optimizer_state_dict(module, optimizer, scratch[key], options=optim_options)
    return metadata


def remove_checkpoint(path: str | Path) -> None:
    """Remove a sharded checkpoint directory (rank 0 only does the work)."""
    if _rank() == 0:
        shutil.rmtree(Path(path), ignore_errors=True)


def optimizer_list(optimizers: Iterable[Any]) -> list[Optimizer]:
    """Unwrap Lightning's optimizer wrappers."""
    return [getattr(o, "_optimizer", o) for o in optimizers]
