"""A pipeline stage that keeps its schedule going after running out of memory (``memory.oom_recovery``).

Pipeline stages talk to each other with point-to-point sends and receives that the schedule posts
around every forward and backward. A rank that raises ``torch.OutOfMemoryError`` half-way through a
step and leaves the schedule would leave its neighbours blocked in a receive it never answers.
With OOM recovery on, the runtime builds its stages as :class:`RecoverableStage`, which instead:

1. catches the error where a stage computes (a microbatch's forward or backward, the last stage's
   loss, the capture of the step's inputs), drops the autograd graphs it held, and writes the
   failure into the rank's :class:`StepFailure`;
2. runs the rest of the step *hollow*: each later forward returns zeros of the stage's output shape,
   each later backward hands the previous stage zero gradients (torch's stage sends zeros for a
   missing input gradient), the loss is a constant. Every send and receive of the schedule still
   happens, in its order, so every rank reaches the end of the step;
3. the strategy reads the failure (:meth:`StepFailure.take`) at its agreement point and every rank
   redoes the step in smaller pieces (``strategies/oom_step.py``); the hollow step's values are
   thrown away there. An error after a schedule (Lightning's closure, a piece's weighting) is caught
   by the strategy, which records it here so that the attempt's later pieces run hollow too, and the
   runtime keeps gradients on the rank until the agreement (the tied and replica reductions run
   there, once), so no failure leaves a peer waiting in a reduction.

Each schedule's first step infers the stages' activation shapes by running a stage once. A
recoverable stage runs that inference on fake tensors (no memory, so it cannot fail half-way
through the metadata exchange with its neighbours), shape-only as every stage of the runtime does
(:class:`~picotron_lightning.parallel.pipeline_parallel.inferring_stage.ShapeInferringStage`): layers that
need values to run (MoE routing) return an output of the right shape instead.

Tensor parallelism inside a stage (``StepFailure(replays_collectives=True)``): a stage's forward and
backward (and, with loss parallelism, the last stage's loss) also run collectives over its ``tp``
group, which a hollow stage would skip, leaving its tp peers (which go on computing) waiting. So a
failed stage issues them anyway, as the strategy does without pipeline parallelism
(:mod:`picotron_lightning.memory.replay`): each compute of a hollow stage, and the rest of the one that
failed, is run again on fake tensors to learn its collectives in order, and those not issued yet are
issued with zeros. The sequence numbers of the groups before the compute and at the failure tell how
many were issued. The computes are a chunk's forward, the last stage's loss of it (the runtime calls
:meth:`RecoverableStage.compute_loss`), its backward, or a zero-bubble schedule's two backward halves.

What this relies on, and what the strategy refuses where it does not hold
(:func:`picotron_lightning.memory.oom.check_recovery_layout`): a stage communicates only with its
neighbours and, under tensor parallelism, over its tp group in collectives whose shapes do not depend
on values (a zero-bubble schedule's backward halves are traced apart: the input half is the gradients
of the stage's inputs, the weight half the rest of the whole backward); FSDP2 inside a stage only as
:mod:`~picotron_lightning.parallel.pipeline_parallel.sharded_recovery` runs it (units gathered before the schedule,
so nothing of FSDP2 communicates inside a compute; a hollow stage reduce-scatters zeros). MoE layers at ep = 1
run one collective, the routing statistics' all-reduce over the stage's data-parallel replicas (dp > 1), of a
fixed shape, in each forward (the traced split: in the backward's recompute), which a hollow stage replays like a
tp collective. At ep > 1 (structural split) their token exchange spans a chunk's forward and backward (under a
zero-bubble schedule its input half: the weight half's gradients start from what the input half left at the
experts, past the exchange) with sizes taken from values: the stage's traces are then made per chunk and
linked to what the chunk exchanged, each exchange of the weight half matched to the input half's by layer and step
(the weight half is the whole backward less the input half)
(:mod:`~picotron_lightning.parallel.pipeline_parallel.exchange_replay`, ``StepFailure(exchanges_tokens=True)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten
from typing_extensions import override

from picotron_lightning.memory.replay import (
    CollectiveCall,
    ProtocolCall,
    issued_collectives,
    issued_since,
    replay_remaining,
    trace_collectives,
)
from picotron_lightning.parallel.pipeline_parallel.exchange_replay import ChunkExchanges
from picotron_lightning.parallel.pipeline_parallel.inferring_stage import ShapeInferringStage
from picotron_lightning.parallel.pipeline_parallel.sharded_recovery import fsdp_hooks_set_aside, zero_missing_gradients
from picotron_lightning.parallel.pipeline_parallel.step_state import microbatch_index

_step_running = False  # a training step of a recoverable pipeline runs on this process
_computing = 0  # how deep this process is in a stage's compute (forward, loss, backward, input capture)


@contextmanager
def recoverable_step() -> Iterator[None]:
    """Marks a training step of a recoverable pipeline (the runtime enters it around the schedule)."""
    global _step_running
    _step_running = True
    try:
        yield
    finally:
        _step_running = False


@contextmanager
def stage_compute() -> Iterator[None]:
    """Marks the part of such a step whose out-of-memory errors the stage recovers from."""
    global _computing
    _computing += 1
    try:
        yield
    finally:
        _computing -= 1


def outside_stage_compute() -> bool:
    """Whether a recoverable pipeline step runs its schedule's own bookkeeping now (handshakes of a few bytes,
    the microbatch loop), not a stage's compute: the test tooling injects no OOM there (it is not covered)."""
    return _step_running and not _computing


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is, or was raised from, a ``torch.OutOfMemoryError`` (torch's stage wraps what a
    forward or backward raises in a ``RuntimeError``)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, torch.OutOfMemoryError):
            return True
        seen = seen.__cause__
    return False


def _first_line(error: BaseException) -> str:
    cause = error
    while cause.__cause__ is not None and not isinstance(cause, torch.OutOfMemoryError):
        cause = cause.__cause__
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


class StepFailure:
    """Whether this rank ran out of memory in the current attempt of a step (one per pipeline rank).

    Set by the stages and the runtime, read and cleared by the strategy once per attempt. Also holds the
    attempt's fake-tensor mode, so everything traced in one step (captured inputs, shape inference) is
    fake in the same mode.

    Args:
        replays_collectives: the stages run collectives inside their compute (tensor parallelism, MoE layers'
            statistics at dp > 1), which a failed stage replays (module doc).
        exchanges_tokens: the stages' MoE layers exchange tokens over ``ep`` (ep > 1), whose sizes follow each chunk's
            routing: a failed stage replays them per chunk (:class:`ChunkExchanges`); implies ``replays_collectives``.
    """

    def __init__(self, replays_collectives: bool = False, exchanges_tokens: bool = False) -> None:
        self.message: str | None = None
        self.exchanges_tokens = exchanges_tokens
        self.stages: list[RecoverableStage] = []  # every stage of this rank (all schedules), to free on a failure
        self.replays_collectives = replays_collectives
        self.replayed = 0  # collectives a failed stage of this rank issued with zeros, over the run (tests, logs)
        # FSDP2 stages: each stage module's unsharded parameters (by id) while the step keeps its units gathered
        # (sharded_recovery.py), else None
        self.unsharded: dict[int, list[nn.Parameter]] | None = None
        self._fake_mode: Any = None

    @property
    def failed(self) -> bool:
        return self.message is not None

    def record(self, error: BaseException) -> None:
        """Keep the first failure's message (later ones in a hollow step cannot happen: it allocates nothing)."""
        if self.message is None:
            self.message = _first_line(error)

    def take(self) -> str | None:
        """The attempt's failure message (None: it ran to the end), and forget it for the next attempt."""
        message, self.message = self.message, None
        return message

    def fake_mode(self) -> Any:
        """The fake-tensor mode of the current step (made on first use, dropped by :meth:`end_step`)."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        if self._fake_mode is None:
            self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        return self._fake_mode

    def end_step(self) -> None:
        self._fake_mode = None
        for stage in self.stages:
            stage.end_schedule()

    def drop_graphs(self) -> None:
        """Free what this rank's stages hold for the chunks forwarded before the failure (see
        :meth:`RecoverableStage.drop_graphs`)."""
        for stage in self.stages:
            stage.drop_graphs()


def fake_mode_of(value: Any) -> Any:
    """The fake-tensor mode of the first fake tensor in ``value`` (a tensor or tuple of them), or None."""
    from torch._subclasses.fake_tensor import FakeTensor

    for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, FakeTensor):
            return item.fake_mode
    return None


class RecoverableStage(ShapeInferringStage):
    """A ``PipelineStage`` whose compute may run out of memory without stopping its schedule (see module doc)."""

    def __init__(self, submodule: nn.Module, stage_index: int, num_stages: int, device: torch.device, *,
                 group: Any, failure: StepFailure) -> None:
        super().__init__(submodule, stage_index, num_stages, device, group=group)
        self.failure = failure
        failure.stages.append(self)
        # Under tensor parallelism: each chunk's call (what a trace of its compute runs again), and the
        # collectives of a forward and of a backward, traced once (every chunk of a schedule has the same shapes).
        self._chunk_calls: dict[int, tuple[tuple, dict]] = {}
        self._traced: dict[str, list[CollectiveCall | ProtocolCall]] = {}
        # MoE layers at ep > 1: which dispatches each chunk's computes made, to replay the rest of their exchanges
        self._exchanges = ChunkExchanges(submodule)
        # Under tp: each parameter's gradient placements, by id, as the backward's trace computed them (a gradient of a
        # replicated parameter is partial where the parameter is used on sharded activations).
        self._gradient_placements: dict[int, tuple] = {}
        # The last stage under loss parallelism: the schedule's loss of one microbatch (output, target), whose
        # collectives a failed stage replays too; set by the runtime.
        self.loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None

    # ------------------------------------------------------------------ shape inference, on fake tensors
    @override
    def _compute_outputs(self, *args: torch.Tensor, module: nn.Module, **kwargs: Any) -> Any:
        with self.failure.fake_mode():
            return super()._compute_outputs(*args, module=module, **kwargs)

    @override
    def _compute_input_grads(self, outputs: list[torch.Tensor], all_fwd_inputs: list[torch.Tensor],
                             grad_outputs: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor | None, ...]:
        with self.failure.fake_mode():
            return super()._compute_input_grads(outputs, all_fwd_inputs, grad_outputs)

    @override
    def _post_metadata_inference_cleanup(self) -> None:
        super()._post_metadata_inference_cleanup()  # (reshards every FSDP2 unit of the stage)
        if self.failure.unsharded is not None:  # the step keeps them gathered: again, before any compute
            for unit in self._fsdp_units():
                unit.unshard()

    # ------------------------------------------------------------------ FSDP2 stages (sharded_recovery.py)
    def _fsdp_units(self) -> list[Any]:
        """The stage's FSDP2 modules (``nn.Module`` and ``FSDPModule``), the root first."""
        return [m for m in self.submod.modules() if isinstance(m, FSDPModule)]

    def _fsdp_hooks_set_aside(self) -> AbstractContextManager[None]:
        """FSDP2's hooks off for a compute on fake tensors while the step keeps the units gathered: they would
        only reshard (after a backward) or move FSDP2's state; off a recoverable FSDP2 step, nothing changes."""
        return fsdp_hooks_set_aside(self._fsdp_units()) if self.failure.unsharded is not None else nullcontext()

    @override
    def perform_reduce_grad(self, grad_scale_factor: int) -> None:
        unsharded = self.failure.unsharded
        if self.failure.failed and unsharded is not None and isinstance(self.submod, FSDPModule):
            # A hollow stage lacks gradients its replicas computed: zeros, so that its reduce-scatter pairs with theirs
            # (and, under tp, FSDP2's redistribution of a partial gradient with its tp peer's: the same placements,
            # which a backward's trace records; the tp parameters are the DTensors among the unsharded ones)
            parameters = unsharded[id(self.submod)]
            if not self._gradient_placements and any(isinstance(p, DTensor) for p in parameters) and self._chunk_calls:
                self._collectives_of("backward", min(self._chunk_calls))
            zero_missing_gradients(parameters, self._gradient_placements)
        super().perform_reduce_grad(grad_scale_factor)

    # ------------------------------------------------------------------ compute that may fail
    def _compute(self, run: Callable[[], Any], kind: str = "", chunk: int = 0) -> tuple[bool, Any]:
        """``(True, run())`` unless this rank's step already failed or ``run`` runs out of memory (then the failure
        is recorded, the graphs held are dropped, and ``(False, None)``: the caller goes on hollow).

        ``kind`` (see :meth:`_collectives_of`) and ``chunk`` name the compute, whose collectives a failed stage
        replays when ``failure.replays_collectives`` (the ones not issued before the error, if it failed here).
        """
        replays = self.failure.replays_collectives and bool(kind)
        issued: dict[str, int] = {}
        if self.failure.exchanges_tokens and kind in ("forward", "backward", "backward_input"):
            # (the input half of a zero-bubble backward is where its exchanges run, recomputed dispatches included)
            self._exchanges.compute_starts("forward" if kind == "forward" else "backward", chunk)
        if not self.failure.failed:
            before = issued_collectives() if replays else {}
            try:
                with stage_compute():
                    return True, run()
            except RuntimeError as error:  # torch's stage wraps what a forward or backward raises
                if not is_out_of_memory(error):
                    raise
                self.failure.record(error)
                if replays:
                    issued = issued_since(before)
            self.failure.drop_graphs()
        if replays:
            self.failure.replayed += replay_remaining(self._collectives_of(kind, chunk), issued)
        return False, None

    def _collectives_of(self, kind: str, chunk: int) -> list[CollectiveCall | ProtocolCall]:
        """The collectives of one compute of ``chunk``, traced on fake tensors: ``kind`` is ``"forward"``, ``"loss"``
        (the last stage's loss of the chunk's output), ``"backward"`` (a whole backward), or the zero-bubble
        schedules' halves ``"backward_input"`` and ``"backward_weight"``.

        A backward is traced as the chunk's forward (and, on the last stage, its loss) followed by gradients of its
        outputs (ones for each: which values flow back does not change which collectives run), and its collectives
        are those after the forward's (a checkpointed block's recomputed forward included). The input half is the
        gradients of the stage's inputs alone (none on the first stage, whose torch stage runs the whole backward in
        the weight half); the weight half is the whole backward's collectives less the input half's, in order. The
        traces compute gradients without accumulating them, so the parameters' ``.grad`` is left as it was.
        """
        if kind in self._traced:
            return self._traced[kind]
        # MoE token exchanges (ep > 1) are per chunk: their sizes follow the chunk's routing, so nothing is cached
        exchanging = self.failure.exchanges_tokens
        traced: dict[str, list[CollectiveCall | ProtocolCall]] = {} if exchanging else self._traced
        args, kwargs = self._chunk_calls[chunk]
        fake = self.failure.fake_mode()
        loss_fn = self.loss_fn  # (the runtime sets it on the last stage only)

        def forward(with_loss: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            """The stage's differentiable outputs (its loss, when asked and known) and inputs."""
            inputs = args if self.is_first else tuple(
                torch.empty(m.shape, dtype=m.dtype, device=self.device, requires_grad=m.requires_grad)
                for m in self._stage_meta.inputs or ())
            output = self.submod(*inputs, **kwargs)
            if with_loss and loss_fn is not None:
                output = loss_fn(output, kwargs["mb_index"])  # the schedule's target is the microbatch's index
            outputs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            return outputs, [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor) and t.requires_grad]

        def backward_of(leaves_of: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> Callable[[], None]:
            def run() -> None:
                outputs, inputs = forward(with_loss=True)
                leaves = leaves_of(inputs)
                if leaves:
                    grads = torch.autograd.grad(outputs, leaves, grad_outputs=[torch.ones_like(t) for t in outputs],
                                                allow_unused=True)
                    # (a hollow FSDP2 stage's zero gradients take these placements: perform_reduce_grad)
                    self._gradient_placements.update({
                        id(leaf): grad.placements for leaf, grad in zip(leaves, grads, strict=True)
                        if isinstance(grad, DTensor)})
            return run

        def trace_collectives_of(run: Callable[[], Any]) -> list[CollectiveCall | ProtocolCall]:
            with self._fsdp_hooks_set_aside():
                return trace_collectives(run, fake_mode=fake)

        if "forward" not in traced:
            traced["forward"] = trace_collectives_of(partial(forward, with_loss=False))
            if exchanging and kind == "forward":
                self._exchanges.link_forward(chunk, traced["forward"])
        if kind != "forward" and "loss" not in traced:
            forward_and_loss = [] if loss_fn is None else trace_collectives_of(partial(forward, with_loss=True))
            traced["loss"] = forward_and_loss[len(traced["forward"]):]
        after = len(traced["forward"]) + len(traced.get("loss", ()))
        if kind in ("forward", "loss"):
            pass
        elif kind == "backward":
            every = backward_of(lambda inputs: [p for p in self.submod.parameters() if p.requires_grad] + inputs)
            whole_trace = trace_collectives_of(every)
            traced[kind] = whole_trace[after:]
            if exchanging:
                self._exchanges.link_backward(chunk, whole_trace[:after], traced[kind])
        elif kind == "backward_input":
            traced[kind] = []
            if not self.is_first:  # (the first stage's torch stage runs its whole backward in the weight half)
                input_trace = trace_collectives_of(backward_of(lambda inputs: inputs))
                traced[kind] = input_trace[after:]
                if exchanging:
                    self._exchanges.link_backward(chunk, input_trace[:after], traced[kind])
        elif kind == "backward_weight":
            whole = self._collectives_of("backward", chunk)
            traced[kind] = whole if self.is_first else \
                _without(whole, self._collectives_of("backward_input", chunk))
        else:
            raise ValueError(f"unknown stage compute {kind!r}")
        return traced[kind]

    def compute_loss(self, compute: Callable[[], torch.Tensor], target: torch.Tensor) -> torch.Tensor | None:
        """The last stage's loss of the microbatch ``target`` names, or None where this rank's step failed (before or
        in it: the caller returns a hollow loss), after issuing the loss's collectives the failure skipped."""
        chunk = microbatch_index(target) if self.failure.replays_collectives else 0
        ran, loss = self._compute(compute, "loss", chunk)
        return loss if ran else None

    @override
    def forward_one_chunk(self, fwd_chunk_id: int, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
                          save_forward_output: bool = True) -> Any:
        if self.failure.replays_collectives:
            self._chunk_calls[fwd_chunk_id] = (args, kwargs or {})
        ran, output = self._compute(partial(PipelineStage.forward_one_chunk, self, fwd_chunk_id, args, kwargs,
                                            save_forward_output), "forward", fwd_chunk_id)
        return output if ran else self._hollow_forward(fwd_chunk_id, save_forward_output)

    @override
    def backward_one_chunk(self, bwd_chunk_id: int, loss: Any = None, full_backward: bool = True,
                           last_backward: bool = False) -> None:
        if not self.has_backward:
            return
        ran, _ = self._compute(partial(PipelineStage.backward_one_chunk, self, bwd_chunk_id, loss, full_backward,
                                       last_backward), "backward" if full_backward else "backward_input", bwd_chunk_id)
        if not ran:
            self._hollow_backward(bwd_chunk_id, full_backward)

    @override
    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False) -> None:
        if not self.has_backward:
            return
        ran, _ = self._compute(partial(PipelineStage.backward_weight_one_chunk, self, bwd_chunk_id, last_backward),
                               "backward_weight", bwd_chunk_id)
        if not ran:
            self.dw_runner.pop(bwd_chunk_id, None)
            self.backward_state.pop(bwd_chunk_id, None)

    def end_schedule(self) -> None:
        """Forget what this schedule's chunks exchanged (the next schedule numbers its chunks from 0 again)."""
        self._exchanges.clear()

    # ------------------------------------------------------------------ the hollow step
    def _hollow_forward(self, fwd_chunk_id: int, save_forward_output: bool) -> Any:
        """Zeros of the stage's output shapes, kept as this chunk's forward so its sends and backward find them."""
        metas = self._stage_meta.outputs or ()
        outputs = tuple(torch.zeros(m.shape, dtype=m.dtype, device=self.device) for m in metas)
        output = outputs[0] if len(outputs) == 1 else outputs
        if self.is_last and save_forward_output:
            self.output_chunks.append(output)
        self.fwd_cache[fwd_chunk_id] = (outputs, [])
        return output

    def _hollow_backward(self, bwd_chunk_id: int, full_backward: bool) -> None:
        """No input gradients (the schedule sends zeros for them); the chunk's forward is dropped."""
        self.fwd_cache.pop(bwd_chunk_id, None)
        self.bwd_cache[bwd_chunk_id] = (None,) * len(self._stage_meta.inputs or ())
        if not full_backward:
            self.backward_state.pop(bwd_chunk_id, None)
            self.dw_runner[bwd_chunk_id] = lambda: None  # the weight half of this chunk: nothing to do either

    def drop_graphs(self) -> None:
        """Free the activations of the chunks forwarded before the failure: their backward will be hollow.

        The outputs themselves stay (a posted send may still read them); only their autograd graph goes.
        """
        for chunk, (outputs, _) in list(self.fwd_cache.items()):
            for tensor in outputs:
                if isinstance(tensor, torch.Tensor) and not tensor._is_view():
                    tensor.detach_()
            self.fwd_cache[chunk] = (outputs, [])
        self.backward_state.clear()  # zero-bubble: what the weight half of each chunk would have used


def _same_call(call: CollectiveCall | ProtocolCall, other: CollectiveCall | ProtocolCall) -> bool:
    return call.same_as(other) if isinstance(call, ProtocolCall) else call == other


def _without(calls: list[CollectiveCall | ProtocolCall], part: list[CollectiveCall | ProtocolCall]
             ) -> list[CollectiveCall | ProtocolCall]:
    """``calls`` less ``part``, a subsequence of it (matched in order, first fit): the zero-bubble weight half's
    collectives are the whole backward's less the input half's."""
    rest: list[CollectiveCall | ProtocolCall] = []
    waiting = iter(part)
    wanted = next(waiting, None)
    for call in calls:
        if wanted is not None and _same_call(call, wanted):
            wanted = next(waiting, None)
        else:
            rest.append(call)
    if wanted is not None:
        raise RuntimeError("`memory.oom_recovery`: the input half of a stage's backward issues collectives its whole "
                           "backward does not; the weight half's collectives cannot be told apart")
    return rest
