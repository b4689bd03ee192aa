"""``torch.compile`` per transformer block, applied after tensor parallelism and checkpointing.

Compiling each block rather than the whole model keeps graphs small (one compilation serves every
block of a stack: same code, same shapes), keeps the collectives of data and pipeline parallelism
outside the compiled regions (FSDP2's and DDP's hooks sit on the blocks and the root, the schedule
between stages), and leaves parameter names untouched: ``nn.Module.compile`` compiles the module's
call in place instead of wrapping it, so checkpoints keep the model's own keys.

The step runs after activation checkpointing (the checkpoint wrapper is compiled with its block, so
recomputation is compiled too) and before data parallelism (FSDP2 shards the compiled blocks as
units, as torchtitan does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from picotron_lightning.structure import find_block_stacks
from picotron_lightning.topology import LayoutError

if TYPE_CHECKING:
    from picotron_lightning.parallel.pipeline_parallel import PipelineRuntime

# torch.compile's keyword arguments (``model`` is the module itself).
COMPILE_ARGUMENTS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")


@dataclass(frozen=True, kw_only=True)
class CompileOptions:
    """The strategy's ``compile=`` argument: ``False`` (default), ``True``, or a dict of ``torch.compile`` arguments."""

    enabled: bool = field(default=False, metadata={"flat": None})
    """Compile each block of the model's block stacks (``compile=True`` or a dict turns it on)."""

    arguments: dict[str, Any] = field(default_factory=dict, metadata={"flat": None})
    """Keyword arguments of ``torch.compile`` (``backend``, ``mode``, ``fullgraph``, ``dynamic``, ``options``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"`compile` must be True, False or a dict of torch.compile arguments: {self.enabled!r}")
        unknown = sorted(set(self.arguments) - set(COMPILE_ARGUMENTS))
        if unknown:
            raise ValueError(
                f"`compile` has arguments torch.compile does not take: {unknown}; it takes {list(COMPILE_ARGUMENTS)}."
            )

    @classmethod
    def from_arg(cls, value: CompileOptions | bool | dict[str, Any] | None) -> CompileOptions:
        """The strategy's ``compile=`` argument as options."""
        if value is None or value is False:
            return cls()
        if value is True:
            return cls(enabled=True)
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(enabled=True, arguments=dict(value))
        raise ValueError(
            f"`compile` must be True, False or a dict of torch.compile arguments, got {type(value).__name__}."
        )


def check_compilable(root: nn.Module, options: CompileOptions, *, moe: bool, traced_pipeline: bool) -> None:
    """Refuse what per-block compilation cannot handle, before anything is changed."""
    if not options.enabled:
        return
    if moe:
        raise LayoutError(
            "compile=... is not supported for models with MoE layers: routing sends a different number of tokens "
            "to each expert every step (data-dependent shapes), which breaks the graph or recompiles it per step. "
            "Use compile=False for this model."
        )
    if traced_pipeline:
        raise LayoutError(
            "compile=... is not supported with pipeline_split='trace' (the traced stages are graphs already); use "
            "pipeline_split='structural' (the default) or compile=False."
        )
    if not _blocks_to_compile(root, None):
        raise LayoutError(
            f"compile=... compiles each transformer block, but {type(root).__name__} has no stack of repeated blocks "
            "(an nn.ModuleList or nn.Sequential of same-class modules with parameters). Compile the model yourself "
            "or use compile=False."
        )


def _blocks_to_compile(root: nn.Module, pipeline: PipelineRuntime | None) -> list[nn.Module]:
    if pipeline is not None:  # this stage's blocks (a stage may hold a single block: no "stack" to find)
        return list(pipeline.parts.container._modules.values())  # type: ignore[arg-type]
    return [block for stack in find_block_stacks(root) for block in stack.blocks]


def _holds_dtensors(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters(recurse=False))


def _plain(value: Any) -> Any:
    """``value`` with every pending collective result made a plain tensor (waited for, then copied).

    A redistribution's local result is an ``AsyncCollectiveTensor``; a compiled graph that takes one as
    input returns outputs that do not require grad on torch 2.13 (measured: every block parameter got no
    gradient under ``aot_eager`` and inductor). A copy is the only way out of the wrapper that keeps the
    autograd edge (its ``wait`` returns the inner tensor, detached from the graph).
    """
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return tree_map_only(AsyncCollectiveTensor, lambda t: t.clone(), value)


def _run_eagerly(module: nn.Module) -> None:
    call = module._call_impl

    @torch.compiler.disable
    def eager_call(*args: Any, **kwargs: Any) -> Any:
        return _plain(call(*args, **kwargs))

    module._call_impl = eager_call  # type: ignore[method-assign]


def _keep_distributed_parts_eager(block: nn.Module) -> int:
    """Run the block's tensor-parallel modules (and their redistribution hooks) outside the compiled graphs.

    Compiled graphs that take or return DTensors, or trace the hooks that convert between DTensors and
    local tensors, give wrong gradients on torch 2.13 (measured before this: with sequence parallelism the
    embedding got none; without it a redistribution's backward received a plain tensor). Every module
    holding a DTensor parameter (the sharded linears, sequence-parallel norms) runs its whole call, hooks
    included, eagerly, and hands plain tensors on; the compiled graphs hold what lies between them
    (norms, attention, activations, residual adds). Returns how many modules run eagerly.
    """
    eager = [m for m in block.modules() if m is not block and _holds_dtensors(m)]
    for module in eager:
        _run_eagerly(module)
    return len(eager)


def _compile_forward(block: nn.Module, arguments: dict[str, Any]) -> None:
    """Compile ``block.forward`` only: its hooks (the sequence-parallel region's entry and exit, FSDP2's)
    stay eager. Assigned on the instance, so names and state dicts are unchanged."""
    compiled = torch.compile(block.forward, **arguments)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return compiled(*_plain(args), **_plain(kwargs))

    block.forward = forward  # type: ignore[method-assign]
    block._compiled_forward = True  # type: ignore[assignment]


def apply_compile(root: nn.Module, options: CompileOptions, pipeline: PipelineRuntime | None = None) -> int:
    """Compile each block of ``root`` (this rank's stage blocks under pp) in place; return how many.

    Without tensor parallelism the whole block call is compiled (``nn.Module.compile``); with it, the
    block's forward, around its sharded linears run eagerly (:func:`_keep_distributed_parts_eager`).
    """
    if not options.enabled:
        return 0
    blocks = _blocks_to_compile(root, pipeline)
    for block in blocks:
        if _keep_distributed_parts_eager(block):
            _compile_forward(block, options.arguments)
        else:
            block.compile(**options.arguments)
    return len(blocks)


def compiled_blocks(root: nn.Module) -> int:
    """How many modules under ``root`` have a compiled call (for tests and logs)."""
    return sum(1 for m in root.modules()
               if getattr(m, "_compiled_call_impl", None) is not None or getattr(m, "_compiled_forward", False))


__all__ = ["COMPILE_ARGUMENTS", "CompileOptions", "apply_compile", "check_compilable", "compiled_blocks"]
