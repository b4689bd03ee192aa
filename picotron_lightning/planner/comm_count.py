"""Counting what one training step really communicates, per mesh dimension, on real ranks.

:class:`CommCounter` is a ``TorchDispatchMode`` (the mechanism ``CommDebugMode`` uses) that sees every
c10d and functional collective a step issues: DTensor redistributions, FSDP2's all-gathers and
reduce-scatters, DDP's bucket all-reduces, pipeline sends and expert all-to-alls. Each call's bytes
(the whole buffer, as :mod:`~picotron_lightning.planner.comm_model` defines them) are attributed to
the mesh dimension whose ranks form the call's group. The planner's tests compare the prediction
with this count; ``benchmarks/planner.py`` uses it too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# op name -> (kind, which argument's bytes are "the buffer")
_KINDS: dict[str, tuple[str, str]] = {
    "allreduce_": ("all_reduce", "input"),
    "all_reduce": ("all_reduce", "input"),
    "_allgather_base_": ("all_gather", "output"),
    "allgather_": ("all_gather", "output"),
    "allgather_into_tensor_coalesced_": ("all_gather", "output"),
    "all_gather_into_tensor": ("all_gather", "output"),
    "all_gather_into_tensor_coalesced": ("all_gather", "output"),
    "_reduce_scatter_base_": ("reduce_scatter", "input"),
    "reduce_scatter_": ("reduce_scatter", "input"),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "input"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", "input"),
    "alltoall_base_": ("all_to_all", "input"),
    "all_to_all_single": ("all_to_all", "input"),
    "send": ("send", "input"),
    "broadcast_": ("broadcast", "input"),
}


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _group_ranks(args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    from torch.distributed.distributed_c10d import _resolve_process_group

    for value in (*args, *kwargs.values()):
        if isinstance(value, str):
            try:
                return tuple(dist.get_process_group_ranks(_resolve_process_group(value)))  # type: ignore[arg-type]
            except (ValueError, RuntimeError):
                continue
        if isinstance(value, torch.ScriptObject):
            try:
                group = dist.ProcessGroup.unbox(value)
            except (RuntimeError, TypeError):
                continue
            return tuple(dist.get_process_group_ranks(group))
    return None


def _pick_dim(dims: list[str]) -> str | None:
    """The dimension a group belongs to; dimensions over the very same ranks (dp and ep when ep == dp) are
    one group on the wire and are reported together, as ``"dp+ep"``."""
    return "+".join(sorted(dims)) if dims else None


class CommCounter(TorchDispatchMode):
    """Sum bytes per (mesh dimension, collective kind) while active; ``groups`` maps dim -> ranks of its group."""

    def __init__(self, groups: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.groups: dict[tuple[int, ...], list[str]] = {}
        for dim, ranks in groups.items():
            self.groups.setdefault(tuple(sorted(ranks)), []).append(dim)
        self.bytes: dict[str, dict[str, int]] = {}
        self.calls: dict[str, dict[str, int]] = {}
        self.sizes: dict[str, list[int]] = {}
        self.unknown: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        namespace = func.namespace
        name = func._schema.name.split("::")[-1]
        if namespace in ("c10d", "_c10d_functional") and name in _KINDS:
            kind, which = _KINDS[name]
            if name == "all_gather_into_tensor" or name == "all_gather_into_tensor_coalesced":
                nbytes = _nbytes(out)
            elif which == "output" and namespace == "c10d":
                nbytes = _nbytes(args[0])  # c10d gathers take the output buffer(s) first
            elif namespace == "c10d" and name in ("alltoall_base_", "_reduce_scatter_base_", "reduce_scatter_",
                                                  "reduce_scatter_tensor_coalesced_"):
                nbytes = _nbytes(args[1])  # (output, input, ...): the input is the buffer
            else:
                nbytes = _nbytes(args[0])
            ranks = _group_ranks(args, kwargs)
            dims = self.groups.get(tuple(sorted(ranks)), []) if ranks is not None else []
            dim = _pick_dim(dims)
            if dim is None:
                self.unknown.append(f"{namespace}::{name} over {ranks}")
                dim = "other"
            self.bytes.setdefault(dim, {}).setdefault(kind, 0)
            self.bytes[dim][kind] += nbytes
            self.calls.setdefault(dim, {}).setdefault(kind, 0)
            self.calls[dim][kind] += 1
            self.sizes.setdefault(f"{dim}.{kind}", []).append(nbytes)
        return out


def mesh_groups(mesh: Any, layout: Any) -> dict[str, tuple[int, ...]]:
    """This rank's group ranks for every mesh dimension of size > 1 (ep from the expert mesh's view)."""
    groups = {d: tuple(dist.get_process_group_ranks(mesh[d].get_group())) for d in ("pp", "dp", "tp")
              if mesh[d].size() > 1}
    if layout.ep > 1:
        expert_mesh = layout.build_expert_mesh("cpu")
        groups["ep"] = tuple(dist.get_process_group_ranks(expert_mesh["ep"].get_group()))
        if layout.dp // layout.ep > 1:
            groups["ep_replicate"] = tuple(dist.get_process_group_ranks(expert_mesh["ep_replicate"].get_group()))
    return groups


def count_step_worker(rank: int, world_size: int, build_module: Any, layout: Any, options: Any,
                      batch: torch.Tensor) -> dict[str, Any]:
    """On a real rank (``run_ranks``): parallelize, run one step, then count the second one's bytes and FLOPs."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from picotron_lightning.memory.trace import _optimizer, _step_runner
    from picotron_lightning.parallel.parallelize import parallelize

    warnings.simplefilter("ignore")
    mesh = layout.build_device_mesh("cpu")
    module = build_module()
    parallel = parallelize(module, mesh, layout, options, torch.device("cpu"), world_size)
    run = _step_runner(parallel, module, _optimizer(module, None), None)
    with sdpa_kernel(SDPBackend.MATH):  # the attention path whose FLOPs the counter has a formula for
        run(batch.clone())
        run(batch.clone())  # DDP rebuilds its buckets (a broadcast) in the second step only
        counter = CommCounter(mesh_groups(mesh, layout))
        flops = FlopCounterMode(display=False)
        with flops, counter:
            run(batch.clone())
    dist.barrier()
    return {"bytes": counter.bytes, "calls": counter.calls, "sizes": counter.sizes, "unknown": counter.unknown,
            "flops": flops.get_total_flops(), "coordinates": layout.coordinates(rank)._asdict()}
