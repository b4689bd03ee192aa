"""Splitting a model into pipeline stages by tracing it (``pipeline_split="trace"``).

The inner model (the child of the LightningModule that holds the block stack) is traced with
``torch.export`` through :func:`torch.distributed.pipelining.pipeline`, with a
``SplitPoint.BEGINNING`` at the first block of every stage after the first. The block ranges are
the ones the structural splitter's balancer chose, so both splitters cut at the same places.

The traced stage modules hold the model's own ``nn.Parameter`` objects under their original names
(relative to the inner model), so the optimizer, gradient clipping and checkpoints see the same
parameters as with the structural split: the LightningModule is pruned exactly as there.

Tracing needs example inputs, so it happens at the first step of each input shape, from the
captured arguments of the step's first microbatch (a traced graph is specialised to its shapes).
To trace the whole model again for a new shape, each rank keeps the modules of the other stages
outside the LightningModule (not registered: not in its ``state_dict`` or optimizer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from picotron_lightning.parallel.pipeline_parallel.split import PIPELINE_STAGES_HOOK, PipelineSplitError
from picotron_lightning.parallel.pipeline_parallel.step_state import StepState

if TYPE_CHECKING:
    from torch.distributed.pipelining import Pipe


def tensor_inputs(call: tuple[tuple, dict]) -> list[torch.Tensor]:
    """The tensors of a captured call in the order ``torch.export`` flattens them (args, then kwargs)."""
    return [x for x in tree_flatten(call)[0] if isinstance(x, torch.Tensor)]


def _untraceable(model: nn.Module, why: str) -> PipelineSplitError:
    return PipelineSplitError(
        f"pipeline_split='trace' could not split {type(model).__name__}: {why}. Use pipeline_split=\"structural\" "
        f"(the default), or declare the stages with `{PIPELINE_STAGES_HOOK}()` on the LightningModule together with "
        "pipeline_split=\"structural\"."
    )


def trace_pipe(inner: nn.Module, split_points: list[str], call: tuple[tuple, dict], num_stages: int) -> Pipe:
    """``torch.distributed.pipelining.pipeline`` of ``inner`` split before each of ``split_points``."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    marked = [inner.get_submodule(name) for name in split_points]
    saved = [(m, m.__dict__.get("forward")) for m in marked]
    args, kwargs = call
    try:
        with torch.enable_grad():
            pipe = pipeline(inner, tuple(args), dict(kwargs) or None,
                            split_spec={name: SplitPoint.BEGINNING for name in split_points})
    except PipelineSplitError:
        raise
    except Exception as err:  # torch.export raises many kinds (UserError, Unsupported, TypeError, ...)
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise _untraceable(inner, f"torch.export failed ({type(err).__name__}: {first_line[:500]})") from err
    finally:
        # pipeline() marks split points by replacing the blocks' forward on the instance: undo that.
        for module, forward in saved:
            module.__dict__.pop("_orig_forward", None)
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
    if pipe.num_stages != num_stages:
        raise _untraceable(inner, f"the traced program has {pipe.num_stages} stages instead of {num_stages} (the "
                                  "block boundaries are not all on the traced data path)")
    return pipe


class TracedStage(nn.Module):
    """One traced stage as the schedule runs it: the first gets the captured inputs, the last packs its output."""

    _state: StepState

    def __init__(self, state: StepState, index: int, num_stages: int, graph: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_state", state)  # not a child: shared with the runtime and other stages
        self.index, self.num_stages = index, num_stages
        self.graph = graph

    def forward(self, *activations: torch.Tensor, mb_index: torch.Tensor) -> Any:
        index = int(mb_index.reshape(-1)[0])
        inputs = tensor_inputs(self._state.calls[index]) if self.index == 0 else list(activations)
        out = self.graph(*inputs)
        if self.index == self.num_stages - 1:
            return self._state.pack_output(out, index)
        return out
