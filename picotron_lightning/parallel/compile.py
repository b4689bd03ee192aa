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

from torch import nn

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


def check_compilable(root: nn.Module, options: CompileOptions, *, moe: bool, traced_pipeline: bool,
                     tensor_parallel_size: int = 1) -> None:
    """Refuse what per-block compilation cannot handle, before anything is changed."""
    if not options.enabled:
        return
    if tensor_parallel_size > 1:
        # Measured on torch 2.13 (tests/test_compile.py docs, docs/compile.md): a compiled block between
        # DTensor redistributions gets its gradients wrong (with sequence parallelism the embedding gets no
        # gradient; without it the backward of a redistribution receives a plain tensor and fails).
        raise LayoutError(
            f"compile=... is not supported with tensor_parallel_size={tensor_parallel_size} in this version: "
            "torch.compile of a tensor-parallel (DTensor) block gives wrong gradients on torch 2.13. Use compile "
            "with data and pipeline parallelism (tensor_parallel_size=1), or compile=False."
        )
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


def apply_compile(root: nn.Module, options: CompileOptions, pipeline: PipelineRuntime | None = None) -> int:
    """Compile each block of ``root`` (this rank's stage blocks under pp) in place; return how many."""
    if not options.enabled:
        return 0
    blocks = _blocks_to_compile(root, pipeline)
    for block in blocks:
        block.compile(**options.arguments)
    return len(blocks)


def compiled_blocks(root: nn.Module) -> int:
    """How many modules under ``root`` have a compiled call (for tests and logs)."""
    return sum(1 for m in root.modules() if getattr(m, "_compiled_call_impl", None) is not None)


__all__ = ["COMPILE_ARGUMENTS", "CompileOptions", "apply_compile", "check_compilable", "compiled_blocks"]
