"""Finding the shape of a model: its stack of repeated transformer blocks.

Tensor parallelism, pipeline splitting, FSDP wrapping and activation checkpointing all act per
block, so they share this one search. A block stack is an ``nn.ModuleList`` (or ``Sequential``)
of at least two children of the same class that together hold most of the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from picotron_lightning._util import num_params


@dataclass(frozen=True)
class BlockStack:
    """A repeated-block container found inside a model."""

    name: str  # qualified name inside the searched module, e.g. "model.layers"
    container: nn.ModuleList | nn.Sequential
    block_class: type

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.container)

    @property
    def keys(self) -> list[str]:
        """The blocks' keys in the container: ``"0"``... for a whole model, the original ones in a pipeline stage."""
        return list(self.container._modules)

    def block_name(self, position: int) -> str:
        """Qualified name of the block at ``position`` (counted among the blocks held)."""
        return f"{self.name}.{self.keys[position]}"

    def __len__(self) -> int:
        return len(self.container)


def find_block_stacks(
    module: nn.Module, min_blocks: int = 2, block_classes: tuple[type, ...] = ()
) -> list[BlockStack]:
    """All containers of >= ``min_blocks`` same-class children that hold parameters, outermost first.

    ``block_classes``: classes already known to be blocks (found on the whole model before a pipeline
    split); a container of them counts from one child on, so a stage that kept one block still has a stack.
    """
    stacks: list[BlockStack] = []
    claimed: list[str] = []
    for name, child in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in claimed):
            continue  # inside a stack already found: its inner repeats are not separate stacks
        if not isinstance(child, (nn.ModuleList, nn.Sequential)) or len(child) == 0:
            continue
        classes = {type(c) for c in child}
        known = len(classes) == 1 and next(iter(classes)) in block_classes
        if (len(child) < min_blocks and not known) or len(classes) != 1 or num_params(child) == 0:
            continue
        stacks.append(BlockStack(name, child, classes.pop()))
        claimed.append(name)
    return stacks


def find_main_block_stack(module: nn.Module, min_share: float = 0.3) -> BlockStack | None:
    """The block stack holding the most parameters, if it holds at least ``min_share`` of the model."""
    stacks = find_block_stacks(module)
    if not stacks:
        return None
    total = num_params(module) or 1
    best = max(stacks, key=lambda s: num_params(s.container))
    return best if num_params(best.container) / total >= min_share else None
