"""The pipeline stage every schedule of the runtime is built from: its shape inference counts nothing.

Before a schedule's first step, torch's ``PipelineStage`` infers the activation and gradient shapes
it exchanges by running each stage once: a forward, and (torch 2.13) on every stage whose inputs
need gradients, a backward of it, on real tensors in training mode. To the layers that keep state
across microbatches this looks like one more microbatch: an MoE layer records its bias-balancing
counts and all-reduces its routing statistics there (measured: pp=2 x dp=2, traced split, the last
stage's layers counted 9 microbatches' tokens in the first step instead of 8, and the losses drifted
5e-5 from one process from the second step on). A :class:`ShapeInferringStage` runs that inference
under :func:`~picotron_lightning.memory.replay.inferring_shapes`, where such layers return an output
of the right shape that still depends on their input and record nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from typing_extensions import override

from picotron_lightning.memory.replay import inferring_shapes


class ShapeInferringStage(PipelineStage):
    """A ``PipelineStage`` whose shape inference runs its layers shape-only (module doc)."""

    @override
    def _compute_outputs(self, *args: torch.Tensor, module: nn.Module, **kwargs: Any) -> Any:
        with inferring_shapes():
            return super()._compute_outputs(*args, module=module, **kwargs)

    @override
    def _compute_input_grads(self, outputs: list[torch.Tensor], all_fwd_inputs: list[torch.Tensor],
                             grad_outputs: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor | None, ...]:
        with inferring_shapes():
            return super()._compute_input_grads(outputs, all_fwd_inputs, grad_outputs)
