"""The ordered steps that turn a plain model into a parallel one; shared by Trainer and Fabric.

The order is fixed and visible here, one function per concern:

    pipeline split -> tensor parallel -> expert parallel -> memory policies -> compile -> data parallel

Each later step works on what the earlier one produced: tensor parallelism shards the blocks a
pipeline stage kept, expert parallelism runs after TP so expert weights are not TP-sharded by
accident, compilation sees the blocks as they will run (sharded, checkpointed), and data
parallelism comes last because FSDP2 shards whatever parameters (plain or DTensor) the model
holds by then. A step whose size is 1 (or an option that is off) leaves the model untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from picotron_lightning.memory import apply_activation_checkpointing
from picotron_lightning.parallel.compile import apply_compile, check_compilable
from picotron_lightning.parallel.data import (
    DataParallelOptions,
    apply_ddp,
    apply_fsdp,
    check_ddp_with_tensor_parallel,
    resolve_mode,
)
from picotron_lightning.parallel.expert import convert_moe_layers, find_moe_layers, validate_expert_parallel
from picotron_lightning.parallel.pipeline_parallel import PipelineRuntime, split_into_stages
from picotron_lightning.parallel.tensor_parallel import TensorParallelPlan, apply_plan, make_tensor_plan
from picotron_lightning.parallel.tensor_parallel.traced import traced_plan
from picotron_lightning.structure import find_block_stacks
from picotron_lightning.topology import LayoutError, ParallelLayout

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from picotron_lightning.options import Picotron3DOptions


@dataclass(frozen=True, kw_only=True)
class ParallelModel:
    """What the steps produced; the options that asked for it are never written to."""

    module: nn.Module
    """What the strategy runs: the root itself, or a DDP wrapper around it."""

    data_parallel_mode: str
    """The data-parallel mode applied (``"auto"`` resolved; ``"none"`` at dp=1)."""

    data_parallel: DataParallelOptions
    """The data-parallel options applied (with the precision plugin's dtypes filled in)."""

    tensor_plan: TensorParallelPlan | None = None
    """The tensor-parallel plan applied (None at tp=1)."""

    pipeline: PipelineRuntime | None = None
    """This rank's pipeline stages and their schedules (None at pp=1)."""

    expert_mesh: DeviceMesh | None = None
    """The ``(pp, ep_replicate, ep, tp)`` mesh of MoE models (None without MoE layers)."""


def apply_pipeline_split(
    root: nn.Module, mesh: DeviceMesh, layout: ParallelLayout, options: Picotron3DOptions
) -> PipelineRuntime | None:
    """Keep only this rank's pipeline stages of ``root``; the runtime that runs them (None when pp == 1)."""
    if layout.pp == 1:
        return None
    return split_into_stages(root, mesh, layout, options.pipeline)


def plan_tensor_parallel(
    root: nn.Module, layout: ParallelLayout, options: Picotron3DOptions
) -> TensorParallelPlan | None:
    """The tensor-parallel plan for the whole model, validated; None when tp == 1.

    Made before the pipeline split so that every plan source sees every block; each stage then
    applies the entries for the blocks it holds. Changes nothing, communicates nothing.
    """
    if layout.tp == 1:
        return None
    tp_options = options.tensor_parallel
    if find_moe_layers(root):
        # Under sequence parallelism each tp rank would route only its slice of the sequence, and
        # nothing reduces the MoE gradients and routing statistics over tp: keep sequences whole.
        if tp_options.sequence_parallel is True:
            raise LayoutError(
                "sequence_parallel=True is not supported for models with MoE layers; use sequence_parallel=False "
                "or 'auto' (which turns it off for them)."
            )
        tp_options = dataclasses.replace(tp_options, sequence_parallel=False)
    traced = layout.pp > 1 and options.pipeline.split == "trace"
    if traced:  # the traced stages keep whole sequences (check_traceable_layout refused sequence_parallel=True)
        tp_options = dataclasses.replace(tp_options, sequence_parallel=False)
    plan = make_tensor_plan(root, layout.tp, tp_options)
    # The traced split shards the blocks' linears only (tensor_parallel/traced.py).
    return traced_plan(root, plan) if traced else plan


def apply_tensor_parallel(
    root: nn.Module, mesh: DeviceMesh, options: Picotron3DOptions, plan: TensorParallelPlan | None,
    pipeline: PipelineRuntime | None = None,
) -> None:
    """Shard the blocks this rank holds Megatron-style over the ``tp`` mesh dimension (identity without a plan)."""
    if plan is None:
        return
    # Compiled blocks must not see DTensors between the sharded linears (parallel/compile.py).
    stage_blocks = [sm.block_keys for sm in pipeline.stage_modules] if pipeline is not None else None
    apply_plan(root, mesh["tp"], plan, loss_parallel=options.tensor_parallel.loss_parallel,
               local_norm_output=options.compile.enabled, stage_blocks=stage_blocks)
    if pipeline is not None and pipeline.options.split == "trace":
        pipeline.trace_tensor_parallel(plan, mesh["tp"])  # traced with local twins of the sharded linears


def apply_expert_parallel(root: nn.Module, layout: ParallelLayout, device: torch.device) -> DeviceMesh | None:
    """Spread the experts of MoE layers over the ``ep`` ranks; returns the expert mesh, or None.

    Runs whenever the model has MoE layers, also at ep == 1: routing statistics (auxiliary-loss
    fractions, balancing counts) must be reduced over the data-parallel ranks to equal those of
    one process on the global batch.
    """
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


def apply_memory_policies(root: nn.Module, options: Picotron3DOptions, block_classes: tuple[type, ...] = ()) -> None:
    """Activation checkpointing (full or selective, every n-th block) when asked for (identity by default).

    ``block_classes`` are the whole model's block classes (found before the pipeline split), so a stage
    holding a single block is checkpointed too. Activation offload is a per-step context
    (``Picotron3DCore._step_context``); FSDP2's CPU offload is applied with data parallelism.
    """
    memory = options.memory
    if memory.activation_checkpointing != "none":
        apply_activation_checkpointing(root, every=memory.checkpoint_every, mode=memory.activation_checkpointing,
                                       block_classes=block_classes)


def apply_data_parallel(
    root: nn.Module,
    mesh: DeviceMesh,
    layout: ParallelLayout,
    dp_config: DataParallelOptions,
    device: torch.device,
    local_processes: int,
    pipeline: PipelineRuntime | None = None,
) -> tuple[nn.Module, str]:
    """FSDP2, DDP or HSDP over the ``dp`` ranks; returns the module to run and the mode used."""
    if pipeline is not None:  # one FSDP root (or DDP wrapper) per pipeline stage
        if layout.dp > 1 and pipeline.options.split != "trace":
            check_ddp_with_tensor_parallel(dp_config.mode, layout.tp > 1)
        return pipeline.apply_data_parallel(mesh, layout, dp_config, device, local_processes)
    mode = resolve_mode(dp_config.mode, root, device, local_processes, tensor_parallel=layout.tp > 1)
    if layout.dp == 1:
        return root, "none"
    if mode == "ddp":
        check_ddp_with_tensor_parallel(mode, layout.tp > 1)
        return apply_ddp(root, mesh["dp"].get_group(), device), mode
    if mode == "hsdp":
        return apply_fsdp(root, mesh["dp_replicate", "dp_shard"], dp_config), mode
    return apply_fsdp(root, mesh["dp"], dp_config), mode


def parallelize(
    root: nn.Module,
    mesh: DeviceMesh,
    layout: ParallelLayout,
    options: Picotron3DOptions,
    device: torch.device,
    local_processes: int = 1,
) -> ParallelModel:
    """Apply every step, in the order of this module's docstring, to ``root`` in place."""
    check_compilable(root, options.compile, moe=bool(find_moe_layers(root)),
                     traced_pipeline=layout.pp > 1 and options.pipeline.split == "trace")
    tensor_plan = plan_tensor_parallel(root, layout, options)  # on the whole model: every block visible
    block_classes = tuple({stack.block_class for stack in find_block_stacks(root)})  # before the split, too
    pipeline = apply_pipeline_split(root, mesh, layout, options)
    apply_tensor_parallel(root, mesh, options, tensor_plan, pipeline)
    expert_mesh = apply_expert_parallel(root, layout, device)
    apply_memory_policies(root, options, block_classes)
    apply_compile(root, options.compile, pipeline)
    dp_options = dataclasses.replace(options.data_parallel, cpu_offload=options.memory.cpu_offload)
    module, mode = apply_data_parallel(root, mesh, layout, dp_options, device, local_processes, pipeline=pipeline)
    if options.memory.cpu_offload and mode not in ("fsdp", "hsdp"):
        raise LayoutError(
            f"`memory.cpu_offload=True` is FSDP2's CPUOffloadPolicy, but data parallelism here is {mode!r}; use "
            "data_parallel_mode='fsdp' or 'hsdp' with more than one data-parallel rank, or cpu_offload=False."
        )
    return ParallelModel(module=module, data_parallel_mode=mode, data_parallel=dp_options,
                         tensor_plan=tensor_plan, pipeline=pipeline, expert_mesh=expert_mesh)
