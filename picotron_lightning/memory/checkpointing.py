"""Activation checkpointing per transformer block: recompute a block's activations in backward.

Applied from outside, between expert parallelism and data parallelism: each block of the main
repeated-block stack is wrapped, so FSDP2 still finds one unit per block and the state dict keeps
its original names (DCP drops the wrapper's ``_checkpoint_wrapped_module`` segment).
"""

from __future__ import annotations

from torch import nn

from picotron_lightning.structure import find_block_stacks


def apply_activation_checkpointing(root: nn.Module, every: int = 1) -> int:
    """Wrap every ``every``-th block of each block stack under ``root``; return how many were wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    if every < 1:
        raise ValueError(f"`activation_checkpointing` every={every} must be >= 1.")
    wrapped = 0
    for stack in find_block_stacks(root):
        for index, block in enumerate(stack.blocks):
            if index % every == 0:
                # Non-reentrant: works with keyword arguments, DTensor and FSDP2's hooks.
                stack.container[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                wrapped += 1
    return wrapped
