"""Activation checkpointing per transformer block: full, selective (op-level), or every n-th block.

Applied from outside, between expert parallelism and data parallelism: each chosen block of the
main repeated-block stack is wrapped, so FSDP2 still finds one unit per block and the state dict
keeps its original names (DCP drops the wrapper's ``_checkpoint_wrapped_module`` segment).

*Selective* keeps the outputs of the matrix multiplications (the expensive ops) and recomputes
everything else in backward (norms, activations, rotary embeddings, softmax, elementwise ops):
most of the activation bytes for a small share of the forward FLOPs.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import torch
from torch import nn

from picotron_lightning.structure import find_block_stacks

CHECKPOINTING_MODES = ("none", "selective", "full")

_aten = torch.ops.aten
# Ops whose outputs selective checkpointing keeps: the matmuls (and fused attention, whose
# recompute would cost as much as the matmuls around it).
SAVED_OPS = frozenset({
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.linear.default,
    _aten._scaled_dot_product_efficient_attention.default, _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
})


def _keep_matmul_outputs(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_context() -> Any:
    """The ``context_fn`` of ``torch.utils.checkpoint`` that keeps matmul outputs and recomputes the rest."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_matmul_outputs)


def apply_activation_checkpointing(
    root: nn.Module, every: int = 1, mode: str = "full", block_classes: tuple[type, ...] = ()
) -> int:
    """Wrap every ``every``-th block of each block stack under ``root``; return how many were wrapped.

    ``mode`` is ``"full"`` (recompute the whole block) or ``"selective"`` (keep matmul outputs);
    ``"none"`` wraps nothing. ``block_classes``: the block classes of the whole model, when ``root`` is a
    pipeline stage that may hold a single block (see :func:`~picotron_lightning.structure.find_block_stacks`).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    if not isinstance(every, int) or every < 1:
        raise ValueError(f"`activation_checkpointing` every={every!r} must be an integer >= 1.")
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"`activation_checkpointing` mode={mode!r} is not one of {CHECKPOINTING_MODES}.")
    if mode == "none":
        return 0
    extra: dict[str, Any] = {}
    if mode == "selective":
        extra["context_fn"] = partial(selective_checkpoint_context)
    wrapped = 0
    for stack in find_block_stacks(root, block_classes=block_classes):
        for index, block in enumerate(stack.blocks):
            if index % every == 0:
                # Non-reentrant: works with keyword arguments, DTensor and FSDP2's hooks.
                stack.container[index] = checkpoint_wrapper(
                    block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **extra
                )
                wrapped += 1
    if wrapped:
        train_without_key_value_cache(root)
    return wrapped


def train_without_key_value_cache(root: nn.Module) -> int:
    """Make the Hugging Face models under ``root`` run their training forwards with ``use_cache=False``; return
    how many were found.

    A Hugging Face model whose config has ``use_cache=True`` (GPT-2's default) creates a key/value cache in every
    forward, training included, and each attention layer appends its keys and values to it. A checkpointed block
    recomputed in backward then finds its own earlier entries in that cache and runs other ops than in forward:
    selective checkpointing stops ("aten.slice.Tensor encountered during backward but not found in storage",
    measured on GPT-2). Hugging Face's own gradient checkpointing turns the cache off for the same reason, for
    the call, not in the config; so does this, with a forward pre-hook on each outermost such model, in
    training mode only (``generate`` and evaluation keep the config's setting).
    """
    hooked: list[str] = []
    for name, module in root.named_modules():
        if any(h == "" or name == h or name.startswith(h + ".") for h in hooked):
            continue  # an outer model passes use_cache down
        config = getattr(module, "config", None)
        if not getattr(config, "use_cache", False):
            continue
        try:
            accepts = "use_cache" in inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            accepts = False
        if accepts:
            module.register_forward_pre_hook(_no_cache_in_training, with_kwargs=True)
            hooked.append(name)
    return len(hooked)


def _no_cache_in_training(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    if module.training:
        kwargs["use_cache"] = False
    return args, kwargs
