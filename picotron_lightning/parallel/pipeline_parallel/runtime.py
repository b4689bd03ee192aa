"""Pipeline parallelism: split the model into stages, run steps through a pipeline schedule.

``split_into_stages`` is the first step of ``parallel/parallelize.py``. It keeps this rank's
stages of the model in place (``split.py``: original parameter names, stubs for what other
ranks hold) and returns a :class:`PipelineRuntime`, which

* wraps each of this rank's stages in a ``StageModule`` (``stage.py``) that runs the model's *own* forward
  with only that stage's blocks visible, the previous stage's activation fed into its first
  block, and the forward stopped after its last block (later stages are on other ranks);
* applies data parallelism per stage (FSDP2 ``fully_shard`` with the stage module as root, or DDP);
* runs each Lightning step through a ``torch.distributed.pipelining`` schedule (``schedule.py``)
  reusing the user's step for the loss (``user_step.py``). What a step captured for the stages
  (the inner model's calls, the output structures) is a ``StepState`` (``step_state.py``) the
  runtime fills and the stages read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from picotron_lightning.parallel.data import DataParallelOptions, fully_shard_units
from picotron_lightning.parallel.expert import set_aux_loss_scale
from picotron_lightning.parallel.pipeline_parallel import user_step
from picotron_lightning.parallel.pipeline_parallel.inferring_stage import ShapeInferringStage
from picotron_lightning.parallel.pipeline_parallel.options import PipelineOptions
from picotron_lightning.parallel.pipeline_parallel.recovery import (
    RecoverableStage,
    StepFailure,
    fake_mode_of,
    is_out_of_memory,
    recoverable_step,
    stage_compute,
)
from picotron_lightning.parallel.pipeline_parallel.schedule import (
    TARGET_MICROBATCHES_PER_STAGE,
    BubbleMeter,
    choose_microbatches,
    schedule_class,
    stage_ids,
    valid_microbatches,
)
from picotron_lightning.parallel.pipeline_parallel.sharded_recovery import ShardedStageUnits
from picotron_lightning.parallel.pipeline_parallel.split import (
    PIPELINE_STAGES_HOOK,
    AbsentStub,
    PipelineParts,
    PipelineSplitError,
    balance_stages,
    check_stage_count,
    find_pipeline_parts,
    keep_blocks,
    replace_submodule,
    stage_costs,
    stub_for,
)
from picotron_lightning.parallel.pipeline_parallel.stage import SplitModel, StageModule
from picotron_lightning.parallel.pipeline_parallel.step_state import StepState, microbatch_index
from picotron_lightning.parallel.pipeline_parallel.tied import (
    TiedWeights,
    check_tied_supported,
    find_tied_across_stages,
)
from picotron_lightning.parallel.pipeline_parallel.trace import (
    REPLICATED_MODES,
    ReplicatedGradients,
    TracedStage,
    TracedTensorParallel,
    as_parameter_gradients,
    check_traceable_layout,
    trace_pipe,
)
from picotron_lightning.parallel.pipeline_parallel.traced_moe import opaque_moe_layers
from picotron_lightning.parallel.pipeline_parallel.traced_sharding import TracedFullyShard, check_traced_sharding

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from picotron_lightning.parallel.tensor_parallel import TensorParallelPlan
    from picotron_lightning.topology import ParallelLayout


@dataclass
class _StepContext:
    kind: str
    step: Any
    microbatches: list[Any]
    rest: tuple
    kwargs: dict
    scale: float
    logs: user_step.LogRecorder = field(default_factory=user_step.LogRecorder)
    results: dict[int, Any] = field(default_factory=dict)


class PipelineRuntime:
    """This rank's stages of a split model and everything needed to run steps through a schedule."""

    def __init__(self, root: nn.Module, parts: PipelineParts, options: PipelineOptions, mesh: DeviceMesh,
                 assignment: list[range], my_stages: list[int]) -> None:
        self.root, self.parts, self.options, self.mesh = root, parts, options, mesh
        self.assignment = assignment
        self.inner = root.get_submodule(parts.inner_name) if parts.inner_name else root
        self.pp_group = mesh["pp"].get_group()
        self.num_stages = len(assignment)
        self.state = StepState()
        first_stubs = {n: stub_for(root.get_submodule(n)) for n in parts.first} if 0 in my_stages else {}
        model = SplitModel(root=root, inner=self.inner, parts=parts, first_stubs=first_stubs)
        self.stage_modules = [
            StageModule(model, self.state, s, self.num_stages, [str(b) for b in assignment[s]]) for s in my_stages
        ]
        self.run_modules: list[nn.Module] = list(self.stage_modules)  # what PipelineStage runs (DDP wraps)
        pp = mesh["pp"].size()
        # The rank holding the last stage: pp-1 with loop placement, 0 with the V placement of zbv.
        self.last_stage_rank = next(r for r in range(pp) if self.num_stages - 1 in stage_ids(r, pp, options))
        self._ctx: _StepContext | None = None
        self._schedules: dict[tuple, Any] = {}
        self._warned = False
        self.meter = BubbleMeter()
        self.device = torch.device("cpu")
        self._pending_grads: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        held = set(my_stages)
        # Weights tied across the first and last stage: one copy per end, kept identical (tied.py).
        self.tied = TiedWeights(find_tied_across_stages(root, parts), mesh, self.last_stage_rank,
                                holds_first=0 in held, holds_last=self.num_stages - 1 in held)
        # pipeline_split="trace": the unpruned model's modules (to trace again per input shape) and the
        # traced stages per input signature.
        self._full_blocks: OrderedDict[str, nn.Module] | None = None
        self._full_class: type = type(parts.container)
        self._full_parts: dict[str, nn.Module] = {}
        self._traced: dict[tuple, list[nn.Module]] = {}
        self._replicas: ReplicatedGradients | None = None  # the traced split's data parallelism (trace.py)
        self._tensor_twins: TracedTensorParallel | None = None  # the traced split's tensor parallelism (trace.py)
        self._sharded: TracedFullyShard | None = None  # the traced split under FSDP2 (traced_sharding.py)
        self._sharded_units: ShardedStageUnits | None = None  # FSDP2 stages, either split (for OOM recovery)
        # memory.oom_recovery: this rank's failure in the current attempt of a step (recovery.py), else None.
        self.failure: StepFailure | None = None
        self._loss_communicates = False  # (enable_oom_recovery)

    # ------------------------------------------------------------------ stage forward support
    @property
    def holds_last_stage(self) -> bool:
        return any(sm.is_last for sm in self.stage_modules)

    # ------------------------------------------------------------------ data parallelism per stage
    def _drop_other_stages_modules(self) -> None:
        """Replace the first/last-stage modules this rank does not run by parameter-free stubs.

        Done here, after tensor parallelism, rather than at the split: a tensor-parallel plan names
        modules (``embed_tokens``: embedding, ``output``: head) and expects to find them.
        """
        held = {sm.index for sm in self.stage_modules}
        tracing = self._full_blocks is not None
        if 0 not in held:
            for name in self.parts.first:
                old = replace_submodule(self.root, name, stub_for(self.root.get_submodule(name)))
                if tracing:
                    self._full_parts[name] = old
        if self.num_stages - 1 not in held:
            for name in self.parts.last:
                old = replace_submodule(self.root, name, AbsentStub(name))
                if tracing:
                    self._full_parts[name] = old

    # ------------------------------------------------------------------ pipeline_split="trace"
    @contextmanager
    def full_model(self) -> Iterator[None]:
        """Put the other stages' modules back into the model for the duration of a trace."""
        assert self._full_blocks is not None
        container = self.parts.container
        saved_modules, saved_class = container._modules, container.__class__
        container._modules = OrderedDict(self._full_blocks)
        container.__class__ = self._full_class
        swapped = [(n, replace_submodule(self.root, n, m)) for n, m in self._full_parts.items()]
        try:
            yield
        finally:
            container._modules, container.__class__ = saved_modules, saved_class
            for name, module in swapped:
                replace_submodule(self.root, name, module)

    def trace_tensor_parallel(self, plan: TensorParallelPlan, tp_mesh: DeviceMesh) -> None:
        """Trace with local twins of ``plan``'s (DTensor-sharded) linears over ``tp_mesh`` (trace.py)."""
        self._tensor_twins = TracedTensorParallel(self.root, plan, tp_mesh)

    def _local_linears(self) -> AbstractContextManager[None]:
        return self._tensor_twins.swapped() if self._tensor_twins is not None else nullcontext()

    def traced_modules(self, signature: tuple) -> list[nn.Module]:
        """This rank's stages traced by ``torch.distributed.pipelining.pipeline`` for this input signature."""
        if signature not in self._traced:
            keys = list(self._full_blocks or {})
            prefix = self.parts.blocks_name[len(self.parts.inner_name) + 1:] if self.parts.inner_name \
                else self.parts.blocks_name
            points = [f"{prefix}.{keys[r.start]}" for r in self.assignment[1:]]
            sharded = self._sharded
            # Gathered first: under FSDP2 the tensor-parallel twins are made from the gathered parameters.
            with self.full_model(), sharded.for_trace() if sharded else nullcontext(), self._local_linears(), \
                    opaque_moe_layers(self.inner):
                pipe = trace_pipe(self.inner, points, self.state.calls[0], self.num_stages)
            gather = sharded.gather if sharded else None
            self._traced[signature] = [
                TracedStage(self.state, sm.index, self.num_stages, pipe.get_stage_module(sm.index), gather)
                for sm in self.stage_modules
            ]
        return self._traced[signature]

    def apply_data_parallel(self, mesh: DeviceMesh, layout: ParallelLayout, config: DataParallelOptions,
                            device: torch.device, local_processes: int) -> tuple[nn.Module, str]:
        """FSDP2 (stage module as root) over ``dp`` for each stage, or replicas for the traced split; root and mode."""
        self.device = device
        self._drop_other_stages_modules()
        for sm in self.stage_modules:
            sm.attach()
        traced = self.options.split == "trace"
        if traced:
            check_traced_sharding(layout, config.mode, self.options.schedule)
            if layout.dp == 1:
                return self.root, "none"
            if config.mode in REPLICATED_MODES:
                # "auto" and "ddp": replicas whose gradients are averaged after the schedule (trace.py).
                self._replicas = ReplicatedGradients(mesh["dp"].get_group(), list(self.root.parameters()))
                return self.root, "ddp"
        # "auto" shards: DDP cannot follow a schedule's microbatches (refused in the strategy's arguments).
        mode = "fsdp" if config.mode == "auto" else config.mode
        if layout.dp > 1:
            dp_mesh = mesh["dp_replicate", "dp_shard"] if mode == "hsdp" else mesh["dp"]
            all_units: list[nn.Module] = []
            for sm in self.stage_modules:
                units = [*sm.blocks.values(), *sm.first.values(), *sm.last.values()]
                fully_shard_units(sm, units, dp_mesh, config)
                all_units += units
            # (fully_shard_units shards each stage module as the root, without resharding after forward)
            self._sharded_units = ShardedStageUnits(all_units, list(self.stage_modules), config.reshard_after_forward)
            if traced:  # the traced graphs run inside the stage modules, over the gathered units
                self._sharded = TracedFullyShard(all_units)
                if self._tensor_twins is not None:
                    self._tensor_twins.gradients_into_parameters = True
        self.tied.attach(self.root)  # after FSDP: the parameters it registered are the ones to tie
        return self.root, mode if layout.dp > 1 else "none"

    # ------------------------------------------------------------------ OOM recovery (recovery.py)
    def enable_oom_recovery(self, loss_communicates: bool = False, experts_communicate: bool = False,
                            experts_exchange: bool = False) -> None:
        """Build training schedules from :class:`RecoverableStage` (before the first one is built): a rank that
        runs out of memory finishes the step hollow and reports it through :meth:`take_failure`.

        ``loss_communicates``: the user's loss runs collectives (loss parallelism), which a failed last stage
        replays; only then is the user's step traced on fake tensors (it may read values otherwise).
        ``experts_communicate``: the stages' MoE layers all-reduce routing statistics over data-parallel replicas.
        ``experts_exchange``: they exchange tokens over ``ep`` (ep > 1), replayed per chunk (exchange_replay.py).
        """
        if any(key[0] for key in self._schedules):
            raise RuntimeError("enable_oom_recovery must be called before the first training step")
        # Tensor parallelism and MoE statistics communicate inside a stage's compute: a failed stage replays them.
        self.failure = StepFailure(replays_collectives=self.mesh["tp"].size() > 1 or experts_communicate
                                   or experts_exchange, exchanges_tokens=experts_exchange)
        self._loss_communicates = loss_communicates

    def take_failure(self) -> str | None:
        """Why this rank's latest attempt failed (its first out-of-memory error), or None; cleared for the next,
        with the gradients a hollow schedule left for ``finish_backward``."""
        if self.failure is None:
            return None
        message = self.failure.take()
        if message is not None:
            self._pending_grads = None
        return message

    def record_failure(self, error: BaseException) -> None:
        """An out-of-memory error of this rank's attempt outside a schedule (the strategy caught it): the attempt's
        later schedules run hollow, so that the other stages still find every send and receive."""
        assert self.failure is not None, "enable_oom_recovery() first"
        self.failure.record(error)
        self._pending_grads = None

    def smallest_piece(self) -> int:
        """Samples the smallest batch this schedule can run has (1F1B and ZBV need a microbatch per stage)."""
        return self.mesh["pp"].size() if self.options.schedule in ("1f1b", "zbv") else 1

    def _capture(self, step: Callable[..., Any], microbatch: Any, rest: tuple, kwargs: dict,
                 kind: str) -> tuple[tuple, dict]:
        """The inner model's call for one microbatch; under OOM recovery a failure there makes the step hollow
        (the call is then captured on fake tensors: the stages only need its shapes)."""
        failure = self.failure if kind == "training_step" else None
        if failure is not None and not failure.failed:
            try:
                with stage_compute():
                    return user_step.capture_inputs(self.root, self.inner, step, microbatch, rest, kwargs, kind,
                                                    self.parts.inner_name)
            except RuntimeError as error:
                if not is_out_of_memory(error):
                    raise
                failure.record(error)
        if failure is not None:
            with failure.fake_mode():
                return user_step.capture_inputs(self.root, self.inner, step, microbatch, rest, kwargs, kind,
                                                self.parts.inner_name)
        return user_step.capture_inputs(self.root, self.inner, step, microbatch, rest, kwargs, kind,
                                        self.parts.inner_name)

    # ------------------------------------------------------------------ schedules
    def _schedule(self, training: bool, microbatches: int, signature: tuple) -> tuple[Any, bool]:
        """A schedule for this input shape (built on first use: stages fix their buffer shapes)."""
        key = (training, microbatches, signature)
        if key in self._schedules:
            return self._schedules[key], False
        modules = self.run_modules
        if self.options.split == "trace" and self._sharded is None:  # under FSDP2 the stage modules run the graphs
            modules = self.traced_modules(signature)
        failure = self.failure if training else None
        stages = [
            RecoverableStage(m, sm.index, self.num_stages, self.device, group=self.pp_group, failure=failure)
            if failure is not None else ShapeInferringStage(m, sm.index, self.num_stages, self.device,
                                                            group=self.pp_group)
            for m, sm in zip(modules, self.stage_modules, strict=True)
        ]
        for stage in stages:
            self.meter.instrument(stage)
        last = next((s for s in stages if s.is_last and isinstance(s, RecoverableStage)), None)
        if last is not None and self._loss_communicates:
            last.loss_fn = self._user_loss
        cls = schedule_class(self.options.schedule, training)
        loss_fn = self.meter.timed(partial(self._loss_fn, last))
        target = stages if self.options.is_multi else stages[0]
        schedule = cls(target, microbatches, loss_fn=loss_fn, scale_grads=False)
        self._schedules[key] = schedule
        return schedule, True

    def _loss_fn(self, last_stage: RecoverableStage | None, output: Any, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss of one microbatch; under OOM recovery (``last_stage``: this schedule's last stage, a
        recoverable one) a loss that runs out of memory, or follows a failure, is a hollow zero."""
        if last_stage is None or self._ctx is None or self._ctx.kind != "training_step":
            return self._user_loss(output, target)
        fake = fake_mode_of(output)
        if fake is not None:  # a recoverable stage's shape inference: the user's step on fake tensors
            with fake:
                return self._user_loss(output, target)
        loss = last_stage.compute_loss(partial(self._user_loss, output, target), target)
        return torch.zeros((), device=self.device) if loss is None else loss  # a hollow loss: its backward is too

    def _user_loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        ctx = self._ctx
        assert ctx is not None
        index = microbatch_index(target)
        result = user_step.run_with_output(
            self.root, self.inner, ctx.step, ctx.microbatches[index], ctx.rest, ctx.kwargs,
            self.state.unpack_output(output, index), ctx.logs.recorder(index),
        )
        ctx.results[index] = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, result)
        if ctx.kind == "training_step":
            # Mean over microbatches and accumulation steps, as one process's loss.backward() would see.
            return user_step.loss_of(result, ctx.kind) / ctx.scale
        loss = result.get("loss") if isinstance(result, dict) else result
        return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else torch.zeros((), device=self.device)

    def _microbatches(self, local_batch: int, training: bool) -> int:
        pp = self.mesh["pp"].size()
        if training:
            warn, self._warned = not self._warned, True
            explicit = self.options.num_microbatches
            if self.failure is not None and explicit is not None and local_batch % explicit:
                # A piece of a step that OOM recovery split: as many microbatches as the piece allows.
                return choose_microbatches(local_batch, pp, replace(self.options, num_microbatches=None), warn=False)
            return choose_microbatches(local_batch, pp, self.options, warn=warn)
        # Evaluation: at most the training count, dividing the batch (the last batch may be short).
        wanted = self.options.num_microbatches or TARGET_MICROBATCHES_PER_STAGE * pp
        name = self.options.schedule if self.options.is_multi else "gpipe"
        return next(d for d in range(min(wanted, local_batch), 0, -1)
                    if local_batch % d == 0 and valid_microbatches(name, d, pp))

    # ------------------------------------------------------------------ one Lightning step
    def run_step(self, pl_module: nn.Module, kind: str, args: tuple, kwargs: dict) -> Any:
        """Run ``pl_module.<kind>`` for one batch through the pipeline; return its (replica-mean) output."""
        training = kind == "training_step"
        if training and not getattr(pl_module, "automatic_optimization", True):
            raise RuntimeError(
                "Pipeline parallelism drives backward itself, so manual optimization (calling "
                "`self.manual_backward` in `training_step`) is not supported with pipeline_parallel_size > 1."
            )
        accumulate = getattr(getattr(pl_module, "_trainer", None), "accumulate_grad_batches", 1) or 1
        out, logs = self._run(getattr(pl_module, kind), kind, args[0], args[1:], kwargs, accumulate)
        for name, value, log_args, log_kwargs in logs:
            pl_module.log(name, value, *log_args, **log_kwargs)  # type: ignore[operator]  # a LightningModule
        return out

    def run_function(self, step: Callable[[Any], torch.Tensor], batch: Any, training: bool) -> torch.Tensor:
        """Run ``step(microbatch) -> loss`` over ``batch`` through the schedule (Fabric's loop).

        Training adds the batch's gradients (microbatch losses averaged, as one ``loss.backward()`` on
        the whole batch would) to ``.grad``. Returns the batch's mean loss on every pipeline rank.
        """
        kind = "training_step" if training else "validation_step"
        out, _ = self._run(step, kind, batch, (), {}, accumulate=1)
        if training:
            self.finish_backward()
        return out

    def _run(self, step: Callable[..., Any], kind: str, batch: Any, rest: tuple, kwargs: dict,
             accumulate: int) -> tuple[Any, list]:
        """One batch of ``step`` through the schedule; returns the replica-mean output and the averaged logs."""
        recovering = kind == "training_step" and self.failure is not None
        with recoverable_step() if recovering else nullcontext():
            return self._run_schedule(step, kind, batch, rest, kwargs, accumulate)

    def _run_schedule(self, step: Callable[..., Any], kind: str, batch: Any, rest: tuple, kwargs: dict,
                      accumulate: int) -> tuple[Any, list]:
        training = kind == "training_step"
        m = self._microbatches(user_step.batch_size_of(batch), training)
        microbatches = user_step.split_batch(batch, m)
        self.state.calls = [self._capture(step, mb, rest, kwargs, kind) for mb in microbatches]
        self._ctx = _StepContext(kind, step, microbatches, rest, kwargs, scale=float(m * accumulate))
        if training:
            # MoE auxiliary gradients are injected per microbatch: scale them as the loss is scaled.
            set_aux_loss_scale(self.root, 1.0 / (m * accumulate))
        signature = _signature(self.state.calls[0], microbatches[0])
        schedule, fresh = self._schedule(training, m, signature)
        if self._sharded is not None:  # the FSDP2 roots (stage modules) run this shape's traced graphs
            for sm, graph in zip(self.stage_modules, self.traced_modules(signature), strict=True):
                sm.run_traced(graph)
        index = torch.arange(m, device=self.device)
        try:
            if training:
                held = self._hold_gradients()  # (before any gathering: it reads the sharded parameters)
                # The first step of a schedule also infers shapes (an extra pass); not a bubble sample.
                with self._units_gathered_for_recovery():
                    self.meter.run(lambda: schedule.step(index, mb_index=index, target=index, return_outputs=False),
                                   record=not fresh)
                self._pending_grads = self._release_gradients(held)
            else:
                schedule.eval(index, mb_index=index, target=index, return_outputs=False)
                if self._sharded is not None:  # no backward reshards the units gathered by the traced graphs
                    self._sharded.reshard()
            payload: tuple[Any, list] | None = None
            if self.holds_last_stage and training and self.failure is not None and self.failure.failed:
                payload = (torch.zeros((), device=self.device), [])  # a hollow step: the strategy redoes it
            elif self.holds_last_stage:
                results = [self._ctx.results[i] for i in range(m)]
                merged = user_step.merge_outputs(results) if kind == "predict_step" else user_step.mean_outputs(results)
                payload = (merged, self._ctx.logs.averaged())
            out, logs = user_step.broadcast_from_last(payload, self.pp_group, self.last_stage_rank, self.device)
        finally:
            self._ctx = None
            self.state.end_step()
            if self.failure is not None:
                self.failure.end_step()
        return out, logs

    @contextmanager
    def _units_gathered_for_recovery(self) -> Iterator[None]:
        """OOM recovery with FSDP2 stages: their units gathered before the schedule, not inside a compute that may
        fail, and the stages told their unsharded parameters (sharded_recovery.py); otherwise nothing."""
        if self.failure is None or self._sharded_units is None:
            yield
            return
        with self._sharded_units.gathered_for_step() as unsharded:
            self.failure.unsharded = unsharded
            try:
                yield
            finally:
                self.failure.unsharded = None

    # Lightning zeroes gradients between a step's forward (``training_step``) and its ``backward``. The
    # schedule computes both inside ``training_step``, so the step's gradients are set aside there and
    # added in the strategy's ``backward`` (:meth:`finish_backward`), as if backward had run then.
    def _hold_gradients(self) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
        held = [(p, p.grad) for p in self.root.parameters()]
        for p, _ in held:
            p.grad = None
        return held

    def _release_gradients(self, held: list[tuple[nn.Parameter, torch.Tensor | None]]) -> list:
        new: list[tuple[torch.Tensor, torch.Tensor]] = [(p, p.grad) for p, _ in held if p.grad is not None]
        for p, grad in held:
            p.grad = grad
        if self._tensor_twins is not None:  # the traced graph's local shards' gradients, for the DTensors
            new += self._tensor_twins.take_gradients()
        return new

    def finish_backward(self, weight: float | None = None) -> None:
        """Add the gradients of the latest training step's schedule (called by the strategy's ``backward``).

        ``weight``: the step's share of the samples when OOM recovery split the batch (None: the whole batch).
        Under OOM recovery the gradients stay on this rank: the tied copies' sum and the replicas' average wait
        for :meth:`reduce_gradients`, which the strategy calls once every rank agreed the step succeeded, so a
        rank that fails after its schedule leaves no peer waiting in a reduction.
        """
        pending, self._pending_grads = self._pending_grads or [], None
        if self.failure is None:
            pending = self._reduce(pending)
        else:
            if self._tensor_twins is not None:  # local shards as the DTensor gradients they are (no communication)
                pending = as_parameter_gradients(pending)
            if weight is not None:
                for _, grad in pending:
                    grad.mul_(weight)
        for p, grad in pending:
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)

    def reduce_gradients(self) -> None:
        """OOM recovery: the reductions :meth:`finish_backward` left out, once for the agreed step (on every rank,
        in the same order: the strategy's agreement point)."""
        pending: list[tuple[torch.Tensor, torch.Tensor]] = [
            (p, p.grad) for p in self.root.parameters() if p.grad is not None]
        for p, grad in self._reduce(pending):
            p.grad = grad

    def _reduce(self, pending: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The tied copies' gradients summed over their pair of ranks, the replicas' averaged (traced split)."""
        pending = self.tied.reduce(pending)
        if self._replicas is not None:
            pending = self._replicas.average(pending)
        if self._tensor_twins is not None:
            pending = as_parameter_gradients(pending)
        return pending

    @property
    def bubble(self) -> float | None:
        """Idle fraction of this rank in the latest measured training step (None before one)."""
        return self.meter.last


def _signature(call: tuple[tuple, dict], microbatch: Any) -> tuple:
    leaves = tree_flatten((call, microbatch))[0]
    return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves)


def plan_pipeline(root: nn.Module, pp: int, options: PipelineOptions) -> tuple[PipelineParts, list[range]]:
    """Find the parts and balance the stages; raises before anything is changed or communicated."""
    parts = find_pipeline_parts(root)
    check_stage_count(parts, pp, options.stages_per_rank)
    check_tied_supported(find_tied_across_stages(root, parts), options)
    blocks, first, last = stage_costs(root, parts)
    return parts, balance_stages(blocks, pp * options.stages_per_rank, first, last)


def split_into_stages(root: nn.Module, mesh: DeviceMesh, layout: ParallelLayout,
                         options: PipelineOptions) -> PipelineRuntime:
    """Keep this rank's stages of ``root`` in place and return the runtime that runs them."""
    parts, assignment = plan_pipeline(root, layout.pp, options)
    mine = stage_ids(mesh["pp"].get_local_rank(), layout.pp, options)
    runtime = PipelineRuntime(root, parts, options, mesh, assignment, mine)
    if options.split == "trace":
        check_traceable_layout(root, layout)
        runtime._full_blocks = OrderedDict(parts.container._modules)
    keep_blocks(parts.container, {b for s in mine for b in assignment[s]})
    return runtime


def check_pipeline_model(root: nn.Module, pp: int, options: PipelineOptions) -> None:
    """Early check, before any process group: too many stages for the blocks, or tied weights it cannot keep.

    A model whose blocks are not there yet (built later in ``configure_model``) passes here; the
    split in ``setup`` checks it again.
    """
    try:
        parts = find_pipeline_parts(root)
    except PipelineSplitError:
        builds_later = callable(getattr(root, "configure_model", None))
        if getattr(root, PIPELINE_STAGES_HOOK, None) is None and builds_later:
            return
        raise
    check_stage_count(parts, pp, options.stages_per_rank)
    check_tied_supported(find_tied_across_stages(root, parts), options)
