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

What composes with it (checked before any process group by :func:`check_traceable_layout`):

* data parallelism, ``data_parallel_mode="auto"``/``"ddp"`` as replicas: every ``dp`` rank of a stage holds
  the stage's parameters whole and the step's gradients are averaged over ``dp`` after the schedule
  (:class:`ReplicatedGradients`). ``"fsdp"``/``"hsdp"``: FSDP2 shards the stages at setup as with the
  structural split and the graphs are traced over its gathered parameters (``traced_sharding.py``), so the
  parameters the optimizer holds are never swapped, whichever input shape is traced later.
* tensor parallelism: the parameters are DTensor-sharded as with the structural split, and the model
  is traced with its sharded linears swapped for local twins between Megatron's two operators as
  custom ops (``tensor_parallel/traced.py``), so the sizes the graph hard-codes are the local ones.
  The gradients of the twins' parameters become the DTensors' gradients after the schedule. Sequence
  and loss parallelism are refused; the embedding and head stay whole on every tp rank.
* MoE layers (``MoELayer``) and expert parallelism: each layer is traced as one opaque custom op whose
  backward recomputes the layer (``traced_moe.py``); expert parameters are left out of the replicas'
  averaging (they differ across ``ep`` ranks; the strategy averages them over ``ep_replicate``).
  Other MoE blocks (Hugging Face style) are refused: their routing has data-dependent shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten

from picotron_lightning.moe.layer import MoELayer
from picotron_lightning.parallel.collectives import mean_all_reduce_
from picotron_lightning.parallel.expert import find_moe_layers, is_expert_parameter
from picotron_lightning.parallel.pipeline_parallel.split import (
    PIPELINE_STAGES_HOOK,
    PipelineSplitError,
    replace_submodule,
)
from picotron_lightning.parallel.pipeline_parallel.step_state import StepState, microbatch_index
from picotron_lightning.parallel.tensor_parallel.traced import LocalShardLinear, local_twin

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.pipelining import Pipe

    from picotron_lightning.parallel.tensor_parallel import TensorParallelPlan
    from picotron_lightning.parallel.tensor_parallel.options import TensorParallelOptions
    from picotron_lightning.topology import ParallelLayout

REPLICATED_MODES = ("auto", "ddp")
"""``data_parallel_mode`` values the traced split runs as replicas with averaged gradients ("fsdp" and "hsdp"
shard with FSDP2, ``traced_sharding.py``)."""


def check_traceable_layout(root: nn.Module, layout: ParallelLayout,
                           tensor_parallel: TensorParallelOptions | None = None) -> None:
    """Refuse what the traced stages cannot run, naming the reason; no collective involved.

    Called by the strategy before any process group exists, and again by the split. Every
    data-parallel mode composes with the traced split (replicas, or FSDP2); what FSDP2 does not compose
    with is ``traced_sharding.check_traced_sharding``'s to refuse.
    """
    structural = ('Use pipeline_split="structural" (the default), which composes with FSDP2, tensor and expert '
                  "parallelism")
    if layout.tp > 1 and tensor_parallel is not None:
        # The traced graph runs local shards between plain-tensor Megatron operators
        # (tensor_parallel/traced.py): nothing keeps a sequence-sharded or vocabulary-sharded DTensor there.
        if tensor_parallel.sequence_parallel is True:
            raise PipelineSplitError(
                f"pipeline_split='trace' with tensor_parallel_size={layout.tp} does not support sequence_parallel=True "
                "(the traced stages keep whole sequences on every tp rank). Use sequence_parallel=False or 'auto' "
                f"(off with the traced split). {structural}, sequence parallelism included."
            )
        if tensor_parallel.loss_parallel:
            raise PipelineSplitError(
                f"pipeline_split='trace' with tensor_parallel_size={layout.tp} does not support loss_parallel=True "
                "(the output head stays whole on every tp rank with the traced split). Use loss_parallel=False. "
                f"{structural}, loss parallelism included."
            )
    other_moe = [name for name, m in find_moe_layers(root) if not isinstance(m, MoELayer)]
    if other_moe:
        # Only picotron's MoELayer is traced as one opaque op (traced_moe.py); other blocks' routing
        # (data-dependent sizes) would reach torch.export.
        raise PipelineSplitError(
            f"pipeline_split='trace' supports MoE layers of the class picotron_lightning.moe.MoELayer only; "
            f"{other_moe[0]!r} is a {type(root.get_submodule(other_moe[0])).__name__} (torch.export cannot trace "
            "its routing: the tokens per expert are data-dependent sizes). Use picotron_lightning.moe.MoELayer, "
            f"or {structural[0].lower()}{structural[1:]}."
        )


class ReplicatedGradients:
    """Average a stage's gradients over its data-parallel replicas (the traced split's data parallelism).

    The replicas start from the parameters of data-parallel rank 0 (as DDP does) and every step's
    gradients are averaged over ``dp`` before they reach ``.grad``, so every replica takes the step one
    process takes on the global batch. One flat all-reduce per step. Expert parameters are left out of
    both: under expert parallelism each ``ep`` rank holds other experts (``parallel/expert.py`` averages
    their gradients over ``ep_replicate``; at ``ep == 1`` no parameter is marked as an expert's).
    """

    def __init__(self, group: dist.ProcessGroup, params: list[nn.Parameter]) -> None:
        self.group = group
        source = dist.get_global_rank(group, 0)
        with torch.no_grad():
            for p in params:  # a DTensor parameter: its local shard, the same one on every dp rank of a tp rank
                if is_expert_parameter(p):
                    continue
                dist.broadcast(p.to_local() if isinstance(p, DTensor) else p.data, src=source, group=group)

    def average(self, pending: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``pending`` (parameter, this replica's gradient) pairs with the gradients averaged over ``dp``, in place
        (they are the schedule's own gradients, not yet in any ``.grad``)."""
        mean_all_reduce_([g for p, g in pending if not is_expert_parameter(p)], self.group)
        return pending


class TracedTensorParallel:
    """The traced split's tensor parallelism: the model is traced with its sharded linears swapped for
    local twins (``tensor_parallel/traced.py``); their gradients become the DTensor parameters' gradients.

    The twins are made once (their parameters share the DTensors' local storage, so optimizer steps and
    in-place loads are seen) and swapped in for each trace, so a new input shape traces the same ones.
    Under FSDP2 they are made while the units are gathered (from FSDP2's unsharded tp DTensors, whose
    storage FSDP2 refills at every gather), and each twin gradient goes, as it is accumulated, into the
    unsharded parameter's ``.grad``, where FSDP2's reduce-scatter at the end of the schedule finds it.
    """

    def __init__(self, root: nn.Module, plan: TensorParallelPlan, tp_mesh: DeviceMesh) -> None:
        self.root, self.entries = root, dict(plan.styles)
        self.tp, self.rank = tp_mesh.size(), tp_mesh.get_local_rank()
        self.group_name = tp_mesh.get_group().group_name
        self._twins: dict[str, LocalShardLinear] = {}
        self._sources: list[tuple[nn.Parameter, torch.Tensor]] = []  # (twin's parameter, DTensor parameter)
        self.gradients_into_parameters = False  # set under FSDP2 (before the first trace)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The twins in place of the sharded linears (every stage's: call inside ``PipelineRuntime.full_model``)."""
        if not self._twins:
            for name, kind in self.entries.items():
                linear = cast(nn.Linear, self.root.get_submodule(name))
                twin = local_twin(linear, kind, self.tp, self.rank, self.group_name)
                self._twins[name] = twin
                if isinstance(linear.weight, DTensor):  # held by this rank (sharded by apply_plan)
                    pairs: list[tuple[nn.Parameter, torch.Tensor]] = [(twin.weight, linear.weight)]
                    if linear.bias is not None and twin.bias is not None:
                        pairs += [(twin.bias, linear.bias)]
                    if self.gradients_into_parameters:
                        for twin_param, param in pairs:
                            twin_param.register_post_accumulate_grad_hook(_gradient_into(param))
                    else:
                        self._sources += pairs
        saved = [(name, replace_submodule(self.root, name, twin)) for name, twin in self._twins.items()]
        try:
            yield
        finally:
            for name, module in saved:
                replace_submodule(self.root, name, module)

    def take_gradients(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(DTensor parameter, local gradient) for every twin parameter the schedule gave a gradient; clears them."""
        out = []
        for twin, param in self._sources:
            if twin.grad is not None:
                out.append((param, twin.grad))
                twin.grad = None
        return out


def _gradient_into(param: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A hook moving a twin parameter's accumulated gradient into ``param.grad`` (as a DTensor of its placements)."""

    def move(twin_param: torch.Tensor) -> None:
        grad = as_parameter_gradients([(param, cast(torch.Tensor, twin_param.grad))])[0][1]
        param.grad = grad if param.grad is None else param.grad + grad
        twin_param.grad = None

    return move


def as_parameter_gradients(pending: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Local gradients of DTensor parameters wrapped as DTensors of the parameter's placements."""
    out = []
    for p, grad in pending:
        if isinstance(p, DTensor) and not isinstance(grad, DTensor):
            grad = DTensor.from_local(grad, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
        out.append((p, grad))
    return out


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
    _gather: Callable[[], None] | None

    def __init__(self, state: StepState, index: int, num_stages: int, graph: nn.Module,
                 gather: Callable[[], None] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_state", state)  # not a child: shared with the runtime and other stages
        object.__setattr__(self, "_gather", gather)
        self.index, self.num_stages = index, num_stages
        self.graph = graph

    def forward(self, *activations: torch.Tensor, mb_index: torch.Tensor) -> Any:
        if self._gather is not None:  # FSDP2: the graph reads the unsharded parameters (traced_sharding.py)
            self._gather()
        index = microbatch_index(mb_index)
        inputs = tensor_inputs(self._state.calls[index]) if self.index == 0 else list(activations)
        out = self.graph(*inputs)
        if self.index == self.num_stages - 1:
            return self._state.pack_output(out, index)
        return out
