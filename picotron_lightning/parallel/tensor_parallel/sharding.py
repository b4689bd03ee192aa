"""Tensor parallelism on DTensor: Megatron-style sharding of an unchanged model over the ``tp`` mesh.

Given a plan (``plans.py``: where it comes from; ``validate.py``: checked before any collective),
each style becomes a ``torch.distributed.tensor.parallel`` style:

* ``colwise``  -> ``ColwiseParallel``: weight rows split; input replicated, output local per rank.
  Transposed linears (HF ``Conv1D``) and fused projections -> ``styles.LocalLinearParallel``.
* ``rowwise``  -> ``styles.UnevenRowwiseParallel``: weight columns split; output all-reduced (or, with
  sequence parallelism, reduce-scattered along the sequence). Transposed -> ``LocalLinearParallel``.
* ``embedding``-> ``RowwiseParallel`` on ``nn.Embedding``: the vocabulary is split, lookups summed.
* ``head``     -> ``ColwiseParallel`` with gathered logits (``Replicate``), or logits that stay a
  DTensor sharded on the vocabulary for loss parallelism.
* ``norm``     -> with sequence parallelism ``SequenceParallel`` (the norm runs on this rank's
  slice of the sequence) followed by one all-gather of its output; without, its output is only
  marked replicated. Either way its consumers (the column-wise linears) share that one DTensor,
  so the backward pass reduces their input gradients once per sub-layer, not once per linear.

Sequence parallel region: the residual stream is split along the sequence from the first block's
input to the last block's output (two hooks). Code outside the blocks (masks, rotary tables, the
final norm, the head) sees full sequences, so models whose top level depends on the sequence
length (Hugging Face) work unchanged.

Sizes tp does not divide (a vocabulary of 50257, an MLP of 129 features) shard unevenly, DTensor's
``Shard`` rule (``linears.local_range``); the parameters keep the model's own shapes, so state dicts
and DCP checkpoints are those of the unsharded model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from picotron_lightning.parallel.tensor_parallel.linears import is_transposed_linear, localize_attention, out_features
from picotron_lightning.parallel.tensor_parallel.options import TensorParallelOptions
from picotron_lightning.parallel.tensor_parallel.plan_types import TensorParallelPlan
from picotron_lightning.parallel.tensor_parallel.plans import resolve_plan
from picotron_lightning.parallel.tensor_parallel.validate import validate_plan
from picotron_lightning.topology import LayoutError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

SEQUENCE_DIM = 1
log = logging.getLogger(__name__)


def _replicate_output(mesh: DeviceMesh, sequence_sharded: bool, local: bool = False):  # noqa: ANN202
    """Forward hook: the norm's output as one replicated DTensor (gathered along the sequence if sharded).

    With ``local`` the output is that DTensor's local tensor: each column-wise linear then makes its own
    replicated input (and reduces its own input gradient), so no DTensor crosses into code around the
    linears; compiled blocks need that (``parallel/compile.py``).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def hook(module: nn.Module, args: tuple, out: Any) -> Any:
        if sequence_sharded:
            if not isinstance(out, DTensor):
                out = DTensor.from_local(out, mesh, [Shard(SEQUENCE_DIM)], run_check=False)
            out = out.redistribute(mesh, [Replicate()])
            return out.to_local() if local else out
        return out if local else DTensor.from_local(out, mesh, [Replicate()], run_check=False)

    return hook


def _check_sequence(x: torch.Tensor, tp: int) -> None:
    if x.shape[SEQUENCE_DIM] % tp:
        raise ValueError(
            f"sequence_parallel=True needs the sequence length to be divisible by tensor_parallel_size={tp}, "
            f"got a hidden state of shape {tuple(x.shape)}. Pad the batch to a multiple of {tp} or pass "
            "sequence_parallel=False."
        )


def _redistribute_first_tensor(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:  # noqa: ANN001
    if "hidden_states" in kwargs and isinstance(kwargs["hidden_states"], torch.Tensor):
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    if args and isinstance(args[0], torch.Tensor):
        return (fn(args[0]), *args[1:]), kwargs
    raise LayoutError("sequence parallelism: the first block was called without a hidden-state tensor.")


def _install_sequence_region(first: nn.Module, last: nn.Module, mesh: DeviceMesh) -> None:
    """Split the residual stream along the sequence entering ``first``; gather it leaving ``last``."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    tp = mesh.size()

    def split(x: torch.Tensor) -> torch.Tensor:
        _check_sequence(x, tp)
        # Replicate -> Shard is a local slice forward; its backward all-gathers the gradient.
        return DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(
            mesh, [Shard(SEQUENCE_DIM)]).to_local()

    def gather(x: torch.Tensor) -> torch.Tensor:
        return DTensor.from_local(x, mesh, [Shard(SEQUENCE_DIM)], run_check=False).redistribute(
            mesh, [Replicate()]).to_local()

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _redistribute_first_tensor(args, kwargs, split)

    def post(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            return gather(out)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (gather(out[0]), *out[1:])
        raise LayoutError(f"sequence parallelism: {type(last).__name__} returned {type(out).__name__}, "
                          "expected a hidden-state tensor (or a tuple starting with one).")

    first.register_forward_pre_hook(pre, with_kwargs=True)
    last.register_forward_hook(post, with_kwargs=True)


def resolve_sequence_parallel(plan: TensorParallelPlan, requested: bool | str) -> bool:
    """``"auto"``: on when every block's column-wise linears read a norm the plan marks (pre-norm blocks)."""
    norms = plan.modules_with("norm")
    if requested == "auto":
        return bool(norms) and plan.block_stack is not None
    if requested and (not norms or plan.block_stack is None):
        raise LayoutError(
            "sequence_parallel=True needs pre-norm blocks (a norm feeding the column-wise linears of each "
            f"block); the {plan.source} plan marks none. Use sequence_parallel=False or mark them 'norm' in tp_plan=."
        )
    return bool(requested)


def _style(kind: Any, module: nn.Module, sequence_parallel: bool, loss_parallel: bool, groups: int = 1):  # noqa: ANN202
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

    from picotron_lightning.parallel.tensor_parallel.styles import LocalLinearParallel, UnevenRowwiseParallel

    if isinstance(kind, ParallelStyle):
        return kind
    if kind in ("colwise", "rowwise") and (groups > 1 or is_transposed_linear(module)):
        return LocalLinearParallel(kind, groups, sequence_parallel=sequence_parallel and kind == "rowwise")
    if kind == "colwise":
        return ColwiseParallel()
    if kind == "rowwise":
        return UnevenRowwiseParallel(output_layouts=Shard(SEQUENCE_DIM) if sequence_parallel else Replicate())
    if kind == "embedding":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if kind == "head":
        if is_transposed_linear(module):
            raise LayoutError(f"a transposed linear ({type(module).__name__}) as the output head is not supported; "
                              "leave it out of tp_plan= (it then stays whole).")
        if loss_parallel:
            return ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
        return ColwiseParallel(output_layouts=Replicate())
    raise LayoutError(f"unknown tensor-parallel style {kind!r}")


def _untie(root: nn.Module, plan: TensorParallelPlan) -> None:
    """A head tied to the embedding stays replicated (sharding one parameter two ways is impossible)."""
    modules = dict(root.named_modules())
    heads = [n for n in plan.modules_with("head") if isinstance(modules[n], nn.Linear)]
    embeds = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
    for h in heads:
        if any(modules[e].weight is modules[h].weight for e in embeds):
            log.info("tensor parallelism: the output head %r shares its weight with the token embedding, so both "
                     "stay whole on every rank (one parameter cannot be sharded two ways).", h)
            del plan.styles[h]
            for e in embeds:
                plan.styles.pop(e, None)


def apply_plan(root: nn.Module, mesh: DeviceMesh, plan: TensorParallelPlan, loss_parallel: bool = False,
               local_norm_output: bool = False, stage_blocks: list[list[str]] | None = None) -> None:
    """Shard ``root`` in place according to ``plan`` (from :func:`make_tensor_plan`) over the 1-D ``mesh``.

    ``root`` may hold only this rank's pipeline stages of the model the plan was made for: entries naming
    modules it does not hold are skipped. ``stage_blocks`` (the block keys of each of those stages, in the
    block container) gives each stage its own sequence-parallel region, so what crosses a stage boundary is
    the whole sequence; without it the region spans all the blocks ``root`` holds (one stage, or no pipeline).
    """
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    sequence_parallel = plan.sequence_parallel
    modules = dict(root.named_modules())
    for name, kind in plan.styles.items():
        module = modules.get(name)
        if module is None:  # held by another pipeline stage
            continue
        if kind == "norm":
            if sequence_parallel:
                parallelize_module(module, mesh, SequenceParallel(sequence_dim=SEQUENCE_DIM))
            module.register_forward_hook(_replicate_output(mesh, sequence_parallel, local_norm_output))
            continue
        groups = plan.fused.get(name, 1)
        if groups > 1:  # the attention around a fused q|k|v reads its width from attributes: make them local
            width = out_features(module) // groups
            parent = modules.get(name.rpartition(".")[0])
            if parent is not None:
                localize_attention(parent, mesh.size(), mesh.get_local_rank(), width,
                                   plan.head_counts.get("num_attention_heads"))
        parallelize_module(module, mesh, _style(kind, module, sequence_parallel, loss_parallel, groups))
    if sequence_parallel:
        assert plan.block_stack is not None  # resolve_sequence_parallel turns SP off without one
        container = root.get_submodule(plan.block_stack)
        # A rank with several stages (interleaved schedules) holds blocks that do not follow each other:
        # one region across them would leave the sequence split at the end of its first stage.
        if stage_blocks is None:
            regions = [list(container.children())]
        else:
            regions = [[container.get_submodule(key) for key in keys] for keys in stage_blocks]
        for blocks in regions:
            if blocks:
                _install_sequence_region(blocks[0], blocks[-1], mesh)


def make_tensor_plan(root: nn.Module, tp: int, options: TensorParallelOptions) -> TensorParallelPlan:
    """Find and validate the plan for the whole ``root`` at ``tp``; changes nothing and communicates nothing.

    Runs before the pipeline split, on the whole model, so every plan source (``tp_plan=``, the module
    hook, Hugging Face, the reference model, the detector) sees every block; each stage then applies
    the entries it holds (:func:`apply_plan`). Raises identically on every rank.
    """
    plan = resolve_plan(root, options.plan)
    _untie(root, plan)
    if options.loss_parallel and not plan.modules_with("head"):
        raise LayoutError(f"loss_parallel=True needs a vocabulary-parallel output head; the {plan.source} plan "
                          "has none. Mark it 'head' in tp_plan= or use loss_parallel=False.")
    validate_plan(root, plan, tp)
    plan.sequence_parallel = resolve_sequence_parallel(plan, options.sequence_parallel)
    return plan


def shard_tensor_parallel(root: nn.Module, mesh: DeviceMesh, options: TensorParallelOptions) -> TensorParallelPlan:
    """Plan and shard a whole model over the ``tp`` ``mesh`` in one call; returns the plan used."""
    plan = make_tensor_plan(root, mesh.size(), options)
    apply_plan(root, mesh, plan, options.loss_parallel)
    return plan


class _LocalLoss(TorchFunctionMode):
    """Returns the (replicated) DTensor loss of ``cross_entropy`` / ``nll_loss`` as a plain tensor.

    So the rest of the user's step (``self.log``, returning the loss to Lightning) sees an ordinary
    tensor; its backward still flows into the vocabulary-sharded logits.
    """

    _LOSSES = (F.cross_entropy, F.nll_loss)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        from torch.distributed.tensor import DTensor

        out = func(*args, **(kwargs or {}))
        if func in self._LOSSES and isinstance(out, DTensor) and all(p.is_replicate() for p in out.placements):
            return out.to_local()
        return out


@contextlib.contextmanager
def loss_parallel_context() -> Iterator[None]:
    """``torch``'s ``loss_parallel()`` plus plain-tensor losses; wrap both the loss and its backward."""
    from torch.distributed.tensor.parallel import loss_parallel

    with loss_parallel(), _LocalLoss():
        yield
