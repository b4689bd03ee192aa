"""Data parallelism: FSDP2 ``fully_shard``, DDP, or HSDP over the ``dp`` ranks of the mesh.

FSDP2 units follow the model's structure: one per repeated block (so only one block's full
weights exist at a time), one per other top-level child that holds parameters, and the root
(the LightningModule or the Fabric module) last. The root holds no parameters of its own in
the usual case; it exists so that one pre-forward hook starts every step and one post-backward
callback finishes the gradient reduction.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from picotron_lightning.structure import find_block_stacks

DataParallelMode = Literal["auto", "fsdp", "ddp", "hsdp"]
DATA_PARALLEL_MODES = ("auto", "fsdp", "ddp", "hsdp")

# "auto" replicates while parameters + gradients + two Adam moments take less than this share
# of one device's memory; above it, sharding pays for its extra all-gathers.
REPLICATE_MEMORY_SHARE = 0.25


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "16": torch.float16,
}


def as_dtype(name: str, value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"fp32"``... or a ``torch.dtype`` -> ``torch.dtype``; an error naming ``name`` otherwise."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"`{name}={value!r}` is not a dtype; use one of {sorted(_DTYPES)} or a torch.dtype.")
    return _DTYPES[value]


@dataclass(frozen=True, kw_only=True)
class DataParallelOptions:
    """Options of the data-parallel step (the strategy's arguments of the same names)."""

    mode: DataParallelMode = field(default="auto", metadata={"flat": "data_parallel_mode"})
    """``"fsdp"`` (FSDP2 ``fully_shard``), ``"ddp"``, ``"hsdp"`` (replicate across groups of ``hsdp_shard_size``
    ranks that shard), or ``"auto"``: replicate while parameters, gradients and optimizer state fit comfortably
    in one device's memory (and nothing is a DTensor), shard otherwise."""

    hsdp_shard_size: int | Literal["auto"] = "auto"
    """Ranks that shard within one HSDP replica; ``"auto"``: the data-parallel ranks of one node."""

    reshard_after_forward: bool = True
    """FSDP frees gathered weights after forward: less memory, one more all-gather in backward."""

    reduce_dtype: torch.dtype | None = None
    """Dtype of gradient reduction (``"fp32"`` reduces bf16 gradients in fp32); a string is converted."""

    param_dtype: torch.dtype | None = None
    """Dtype FSDP gathers parameters in for compute; ``None`` keeps the stored dtype."""

    cpu_offload: bool = field(default=False, metadata={"flat": None})
    """FSDP2 ``CPUOffloadPolicy`` on every unit; set by ``parallelize`` from the strategy's ``memory.cpu_offload``."""

    def __post_init__(self) -> None:
        if self.mode not in DATA_PARALLEL_MODES:
            raise ValueError(
                f"`data_parallel_mode={self.mode!r}` is not supported; use one of {DATA_PARALLEL_MODES}."
            )
        shard = self.hsdp_shard_size
        if shard != "auto" and (isinstance(shard, bool) or not isinstance(shard, int) or shard < 1):
            raise ValueError(f"`hsdp_shard_size` must be a positive integer or 'auto', got {shard!r}.")
        # Strings from the command line become dtypes once, here.
        object.__setattr__(self, "reduce_dtype", as_dtype("reduce_dtype", self.reduce_dtype))
        object.__setattr__(self, "param_dtype", as_dtype("param_dtype", self.param_dtype))


def device_memory_bytes(device: torch.device, local_processes: int = 1) -> int:
    """Memory one process may plan with: the GPU's total, or host RAM split among local processes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return total // max(1, local_processes)


def training_state_bytes(module: nn.Module) -> int:
    """Parameters, gradients and two Adam moments of this rank's (unsharded) parameters."""
    return sum(p.numel() * p.element_size() * 4 for p in module.parameters() if p.requires_grad)


def check_ddp_with_tensor_parallel(mode: str, tensor_parallel: bool) -> None:
    """Raise `LayoutError` for DDP over tensor-parallel (DTensor) parameters, which it cannot reduce."""
    from picotron_lightning.topology import LayoutError

    if mode == "ddp" and tensor_parallel:
        raise LayoutError("data_parallel_mode='ddp' cannot reduce tensor-parallel (DTensor) parameters; "
                          "use data_parallel_mode='fsdp' or 'hsdp' with tensor_parallel_size > 1.")


def resolve_mode(
    mode: DataParallelMode, module: nn.Module, device: torch.device, local_processes: int, tensor_parallel: bool
) -> Literal["fsdp", "ddp", "hsdp"]:
    """Turn ``"auto"`` into a concrete mode: replicate if the training state fits comfortably, else shard."""
    if mode != "auto":
        return mode
    if tensor_parallel:
        return "fsdp"  # DTensor parameters need FSDP2; DDP cannot reduce them
    budget = device_memory_bytes(device, local_processes) * REPLICATE_MEMORY_SHARE
    return "ddp" if training_state_bytes(module) <= budget else "fsdp"


def _mp_policy(config: DataParallelOptions):  # noqa: ANN202 - torch type imported lazily
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=config.param_dtype, reduce_dtype=config.reduce_dtype)


def fully_shard_units(root: nn.Module, units: Iterable[nn.Module], dp_mesh, config: DataParallelOptions) -> nn.Module:  # noqa: ANN001
    """Make each of ``units`` an FSDP2 unit, then ``root`` the root unit, over ``dp_mesh``, in place.

    ``dp_mesh`` is 1-D for FSDP or 2-D (replicate x shard) for HSDP. Expert-parallel weights are
    left out: they differ across ranks and are reduced over ``ep_replicate`` instead.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": dp_mesh, "mp_policy": _mp_policy(config)}
    if config.cpu_offload:
        from picotron_lightning.memory.offload import fsdp_offload_policy

        kwargs["offload_policy"] = fsdp_offload_policy(torch.device(dp_mesh.device_type))
    ignored_params = set(_expert_parameters(root))
    if ignored_params:
        kwargs["ignored_params"] = ignored_params
    outside_fake_mode = unset_fake_temporarily if _has_fake_parameters(root) else contextlib.nullcontext
    for unit in units:
        _expect_tensor_parallel_view_output(unit)
        with outside_fake_mode():
            fully_shard(unit, reshard_after_forward=config.reshard_after_forward, **kwargs)
    # The root's parameters are needed again at the start of backward: keep them gathered.
    _expect_tensor_parallel_view_output(root)
    with outside_fake_mode():
        fully_shard(root, reshard_after_forward=False, **kwargs)
    return root


def _has_fake_parameters(root: nn.Module) -> bool:
    """Whether ``root`` is the memory estimate's trace (fake parameters), where ``fully_shard`` runs outside the
    fake-tensor mode.

    Over tensor-parallel parameters FSDP2 makes a (dp, tp) DeviceMesh, whose constructor finds this rank's
    coordinates with ``nonzero``, which fake tensors cannot answer (data-dependent). Outside the mode the
    mesh's small index tensors are real; the parameters stay fake, and so does everything made from them
    (the estimate of a 1B-parameter model at dp=2 x tp=2 stayed under 0.5 GB of host memory).
    """
    from torch._subclasses.fake_tensor import is_fake

    return any(is_fake(p) for p in root.parameters())


def _expect_tensor_parallel_view_output(unit: nn.Module) -> None:
    """Silence FSDP2's "returned a view tensor" warning for ``unit`` alone, if it holds tensor-parallel weights.

    Such a unit's output comes out of a tensor-parallel output hook through ``DTensor.to_local()``,
    which always returns a view (an autograd function cannot hand back its input unchanged), so FSDP2
    warns for every block, stage, head and root of a tp x dp layout on every rank. The warning is about
    in-place ops on the output dropping FSDP's pre-backward hook; the tp x dp and 3D parity tests (the
    reference Llama, Hugging Face Llama and a plain GPT, gradients equal to one process at 1e-4) show
    the gradients are right. Other units, and every other warning, are left as they are.
    """
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in unit.parameters()):
        return
    # fully_shard gives the unit the class "FSDP<original name>"; the warning names it.
    name = re.escape(f"FSDP{type(unit).__name__}")
    warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \({name}\) returned a view tensor",
                            category=UserWarning)


def apply_fsdp(root: nn.Module, dp_mesh, config: DataParallelOptions) -> nn.Module:  # noqa: ANN001
    """Shard ``root``: one unit per repeated block, one per other top-level child with parameters."""
    units: list[nn.Module] = []
    covered: set[int] = set()
    for stack in find_block_stacks(root):
        units.extend(stack.blocks)
        covered.update(id(p) for block in stack.blocks for p in block.parameters())
    for child in root.children():
        # One unit for the rest of each top-level child (embedding, final norm, head...).
        if any(id(p) not in covered for p in child.parameters()):
            units.append(child)
            covered.update(id(p) for p in child.parameters())
    return fully_shard_units(root, units, dp_mesh, config)


def apply_ddp(root: nn.Module, dp_group, device: torch.device) -> nn.Module:  # noqa: ANN001
    """Wrap ``root`` in ``DistributedDataParallel`` over the data-parallel process group."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    from picotron_lightning.parallel.expert import expert_parameter_names

    expert_names = expert_parameter_names(root)
    if expert_names:  # expert-parallel weights are reduced over ep_replicate, not by DDP
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(root, expert_names)
    # Gradients as bucket views skip one copy per step; buckets are the DDP default size.
    return DistributedDataParallel(root, process_group=dp_group, device_ids=device_ids, gradient_as_bucket_view=True)


def _expert_parameters(root: nn.Module) -> list[nn.Parameter]:
    from picotron_lightning.parallel.expert import expert_parameters

    return expert_parameters(root)


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Turn FSDP2 gradient reduction on or off for every unit under ``module``."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_requires_gradient_sync(enabled, recurse=False)
