"""The ordered steps that turn a plain model into a parallel one; shared by Trainer and Fabric.

The order is fixed and visible here, one function per concern:

    pipeline split -> tensor parallel -> expert parallel -> memory policies -> data parallel

Each later step works on what the earlier one produced: tensor parallelism shards the blocks a
pipeline stage kept, expert parallelism runs after TP so expert weights are not TP-sharded by
accident, and data parallelism comes last because FSDP2 shards whatever parameters (plain or
DTensor) the model holds by then. A step whose size is 1 leaves the model untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from picotron_lightning.parallel.data import DataParallelConfig, apply_ddp, apply_fsdp, resolve_mode
from picotron_lightning.topology import LayoutError, ParallelLayout

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from picotron_lightning.parallel.pipeline import PipelineRuntime


@dataclass
class ParallelConfig:
    """Everything the steps need besides the layout; built from the strategy's arguments."""

    data_parallel: DataParallelConfig = field(default_factory=DataParallelConfig)
    tensor_parallel: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelModel:
    """What the steps produced."""

    module: nn.Module  # what the strategy runs: the root itself, or a DDP wrapper around it
    data_parallel_mode: str
    expert_mesh: DeviceMesh | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def apply_pipeline_split(
    root: nn.Module, mesh: DeviceMesh, layout: ParallelLayout, config: ParallelConfig
) -> PipelineRuntime | None:
    """Keep only this rank's pipeline stages of ``root``; the runtime that runs them (None when pp == 1)."""
    if layout.pp == 1:
        return None
    from picotron_lightning.parallel.pipeline import apply_pipeline_split as split_into_stages
    from picotron_lightning.parallel.pp_schedule import PipelineOptions

    return split_into_stages(root, mesh, layout, PipelineOptions(**config.pipeline))


def apply_tensor_parallel(root: nn.Module, mesh: DeviceMesh, layout: ParallelLayout, config: ParallelConfig) -> None:
    """Shard the blocks Megatron-style over the ``tp`` mesh dimension (identity when tp == 1)."""
    if layout.tp == 1:
        return
    from picotron_lightning.parallel.expert import find_moe_layers
    from picotron_lightning.parallel.tensor import apply_tensor_parallel as shard_tensor_parallel

    options = dict(config.tensor_parallel)
    if find_moe_layers(root):
        # Under sequence parallelism each tp rank would route only its slice of the sequence, and
        # nothing reduces the MoE gradients and routing statistics over tp: keep sequences whole.
        if options.get("sequence_parallel") is True:
            raise LayoutError(
                "sequence_parallel=True is not supported for models with MoE layers; use sequence_parallel=False "
                "or 'auto' (which turns it off for them)."
            )
        options["sequence_parallel"] = False
    # Options: plan (user plan), sequence_parallel, loss_parallel; see parallel/tensor.py.
    config.tensor_parallel["applied_plan"] = shard_tensor_parallel(root, mesh["tp"], options)


def apply_expert_parallel(
    root: nn.Module, layout: ParallelLayout, config: ParallelConfig, device: torch.device
) -> DeviceMesh | None:
    """Spread the experts of MoE layers over the ``ep`` ranks; returns the expert mesh, or None.

    Runs whenever the model has MoE layers, also at ep == 1: routing statistics (auxiliary-loss
    fractions, balancing counts) must be reduced over the data-parallel ranks to equal those of
    one process on the global batch.
    """
    from picotron_lightning.parallel.expert import apply_expert_parallel as convert_moe_layers
    from picotron_lightning.parallel.expert import find_moe_layers, validate_expert_parallel

    if not find_moe_layers(root):
        if layout.ep > 1:
            raise LayoutError(
                f"expert_parallel_size={layout.ep}, but the model has no MoE layers (picotron_lightning.moe.MoELayer"
                " or a router + experts block); use expert_parallel_size=1."
            )
        return None
    validate_expert_parallel(root, layout.ep)  # the same on every rank: all fail together, none waits
    expert_mesh = layout.build_expert_mesh(device.type)
    convert_moe_layers(root, expert_mesh, layout)
    return expert_mesh


def apply_memory_policies(root: nn.Module, config: ParallelConfig) -> None:
    """Activation checkpointing per block when asked for (identity by default)."""
    # memory: mode "none" / "selective" / "full" (True means "full"), every n-th block (picotron_lightning.memory)
    mode = config.memory.get("activation_checkpointing", "none")
    mode = {True: "full", False: "none"}.get(mode, mode)
    if mode != "none":
        from picotron_lightning.memory import apply_activation_checkpointing

        apply_activation_checkpointing(root, every=config.memory.get("checkpoint_every", 1), mode=mode)


def apply_data_parallel(
    root: nn.Module,
    mesh: DeviceMesh,
    layout: ParallelLayout,
    config: ParallelConfig,
    device: torch.device,
    local_processes: int,
    pipeline: PipelineRuntime | None = None,
) -> tuple[nn.Module, str]:
    """FSDP2, DDP or HSDP over the ``dp`` ranks; returns the module to run and the mode used."""
    dp_config = config.data_parallel
    if pipeline is not None:  # one FSDP root (or DDP wrapper) per pipeline stage
        if layout.tp > 1 and dp_config.mode == "ddp" and layout.dp > 1:
            raise LayoutError(
                "data_parallel_mode='ddp' cannot reduce tensor-parallel (DTensor) parameters; "
                "use data_parallel_mode='fsdp' or 'hsdp' with tensor_parallel_size > 1."
            )
        return pipeline.apply_data_parallel(mesh, layout, dp_config, device, local_processes)
    mode = resolve_mode(dp_config.mode, root, device, local_processes, tensor_parallel=layout.tp > 1)
    if layout.dp == 1:
        return root, "none"
    if mode == "ddp":
        if layout.tp > 1:
            raise LayoutError(
                "data_parallel_mode='ddp' cannot reduce tensor-parallel (DTensor) parameters; "
                "use data_parallel_mode='fsdp' or 'hsdp' with tensor_parallel_size > 1."
            )
        return apply_ddp(root, mesh["dp"].get_group(), device), mode
    if mode == "hsdp":
        return apply_fsdp(root, mesh["dp_replicate", "dp_shard"], dp_config), mode
    return apply_fsdp(root, mesh["dp"], dp_config), mode


def parallelize(
    root: nn.Module,
    mesh: DeviceMesh,
    layout: ParallelLayout,
    config: ParallelConfig,
    device: torch.device,
    local_processes: int = 1,
) -> ParallelModel:
    """Apply every step, in the order of this module's docstring, to ``root`` in place."""
    pipeline = apply_pipeline_split(root, mesh, layout, config)
    apply_tensor_parallel(root, mesh, layout, config)
    expert_mesh = apply_expert_parallel(root, layout, config, device)
    apply_memory_policies(root, config)
    module, mode = apply_data_parallel(root, mesh, layout, config, device, local_processes, pipeline=pipeline)
    extras = {"pipeline": pipeline} if pipeline is not None else {}
    return ParallelModel(module=module, data_parallel_mode=mode, expert_mesh=expert_mesh, extras=extras)
