"""The Trainer strategy's OOM recovery: Lightning's training closure run as agreed, retryable attempts.

Lightning's automatic optimization hands the strategy a closure (training step, zero_grad,
backward) inside ``optimizer.step``. With ``memory.oom_recovery`` the strategy runs that closure as:

1. **Attempt.** Under DDP alone, with no collective: DDP's gradient sync is deferred (``no_sync``),
   DDP's buffer broadcast is moved to step 3. Under FSDP2, tensor parallelism and with MoE layers the
   attempt communicates as usual (gathers, reduce-scatters, tp all-reduces, token all-to-alls and routing
   statistics). Either way, reductions that
   ``training_step`` asks for (``self.log(..., sync_dist=True)`` calls ``strategy.reduce``) are recorded
   instead of run. DDP attempts up to the first that succeeds on every rank run under
   :class:`~picotron_lightning.memory.oom.CollectiveGuard`, which stops every rank alike if anything
   else communicates. A ``torch.OutOfMemoryError`` is caught; the step's graph, gradients and outputs
   are dropped; under FSDP2/tp/MoE the failed rank then issues the collectives it skipped
   (:mod:`picotron_lightning.memory.replay`; MoE exchanges by protocol, :mod:`picotron_lightning.moe.communication`),
   so its peers finish their attempt.
2. **Agreement**: one all-reduce (MAX) of a small vector: which ranks failed, how many reductions each
   recorded, and which parameters have gradients. Every rank reaches it having issued the same
   collectives since the previous step.
3. On success everywhere: the gradient all-reduce over the data-parallel group (DDP; FSDP2 reduced in
   backward), the expert gradients' over their replicas, the recorded reductions and the buffer broadcast,
   in the same order on every rank. On any
   failure: every rank clears its gradients, reports the retry (AlertManager alert, MetricsCollector
   metric) and redoes step 1 from the step's random state with the same global batch in twice as many
   micro-batches, each loss weighted by its share of the samples.

Gradient accumulation (``Trainer(accumulate_grad_batches=M)``): Lightning runs the closure of each of the M
batches of an optimizer step, the last one inside ``optimizer.step``. Every closure the loop makes is run as
above (:meth:`OOMRecoveryStep.install` wraps the loop's closure factory), one batch at a time: the earlier
batches' gradients are set aside while a batch is attempted (a failed attempt's partial gradients cannot be
told apart from them otherwise) and added back when it succeeds; the gradient reductions of step 3 wait for
the last batch, whose agreement reduces the sum. Under FSDP2 each batch reduce-scatters its own gradients
(Lightning's ``no_sync`` for the earlier batches would mix them into one unsharded accumulator).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.loops.optimization.automatic import Closure, ClosureResult
from torch import nn

from picotron_lightning.memory.oom import (
    CollectiveGuard,
    ExpertLayerFacts,
    OOMRecoveryExhausted,
    SplitSchedule,
    batch_size_of,
    check_recovery_layout,
    covered_attempt,
    dump_memory_snapshot,
    exhausted_message,
    memory_history_kwargs,
    split_batch,
)
from picotron_lightning.memory.options import MemoryOptions
from picotron_lightning.memory.replay import (
    begin_attempt,
    end_recording,
    issued_collectives,
    issued_since,
    replay_remaining,
    trace_collectives,
)
from picotron_lightning.moe import LoadBalancer, MoELayer
from picotron_lightning.parallel.expert import ExpertParallelExperts, is_expert_parameter, set_aux_loss_scale


class OOMRecoveryStep:
    """Runs each training step's closure as agreed attempts; state and history of the run's retries.

    Attributes (the same on every rank): ``schedule`` (the current split), ``retries`` (how many),
    ``events`` (one dict per retry: step, attempt, failed ranks, new split).
    """

    def __init__(self, strategy: Any, trainer: Any, options: MemoryOptions) -> None:
        module = strategy.lightning_module
        experts = _expert_layer_facts(module)
        fsdp_root = _fsdp_root(strategy.model)
        check_recovery_layout(
            pp=strategy.layout.pp, experts=experts,
            automatic_optimization=module.automatic_optimization,
            tp=strategy.layout.tp, dp=strategy.layout.dp, ep=strategy.layout.ep,
            pipeline_split=strategy._options.pipeline.split, pipeline_schedule=strategy._options.pipeline.schedule,
            activation_checkpointing=options.activation_checkpointing,  # (as memory_budget chose it)
        )
        self.strategy, self.trainer, self.options = strategy, trainer, options
        # Pipeline parallelism: a stage that runs out of memory finishes its schedule hollow (its sends and
        # receives still happen, and under tp its tp collectives, replayed by the stage) and the runtime reports
        # the failure after the step; nothing for the strategy to replay.
        self.pipeline = strategy._pipeline
        # MoE layers inside stages exchange tokens over ep (ep > 1) within each chunk's forward and backward
        self._stages_exchange_tokens = self.pipeline is not None and bool(experts) and strategy.layout.ep > 1
        if self.pipeline is not None:
            self.pipeline.enable_oom_recovery(
                loss_communicates=strategy._options.tensor_parallel.loss_parallel and strategy.layout.tp > 1,
                # MoE layers all-reduce their routing statistics over the data-parallel replicas of their stage
                experts_communicate=bool(experts) and strategy.layout.dp > 1,
                experts_exchange=self._stages_exchange_tokens)
        self.schedule = SplitSchedule(options.oom_retry_larger_after)
        self.retries = 0
        self.events: list[dict[str, Any]] = []
        self.micro_batch: Any = None  # what strategy.training_step runs instead of the loop's batch
        self.loss_weight: float | None = None  # this micro-batch's share of the samples, applied in backward
        self.deferred: list[tuple[torch.Tensor, Any, Any]] | None = None  # reductions asked for in an attempt
        self.batch: Any = None  # the loop's batch of the current step (strategy.batch_to_device records it)
        # Tensor parallelism and FSDP2 communicate inside forward and backward: a rank that fails mid-step
        # replays the rest of the step's collectives (memory/replay.py) instead of the step being kept silent.
        # FSDP2 also reduces its gradients inside each backward (sharded, accumulated over micro-batches),
        # so the agreement point has no gradient reduction left to do for it.
        self.fsdp_root = fsdp_root
        if self.fsdp_root is not None:
            _materialize_unsharded_parameters(strategy.model)
        # MoE layers exchange tokens (ep > 1) and all-reduce routing statistics inside forward; their exchange is
        # replayed by protocol (moe/communication.py), and the split step scales their injected gradients.
        self.has_experts = bool(experts)
        # DDP: the gradients' all-reduce and the buffers' broadcast over the replicas are the agreement's to do
        # (FSDP2 reduce-scatters in each backward; a pipeline reduces its own gradients).
        self._dp_group = strategy.device_mesh["dp"].get_group()
        self._reduces_over_replicas = (dist.get_world_size(self._dp_group) > 1 and self.fsdp_root is None
                                       and self.pipeline is None)
        # Lightning divides each batch's loss by the accumulation factor, and setup scaled the MoE layers' injected
        # gradients alike; a piece of a split batch scales them by its share of the samples on top.
        self._accumulate = max(1, int(trainer.accumulate_grad_batches))
        self._aux_loss_base = 1.0 / self._accumulate
        self._aux_loss_scale = self._aux_loss_base  # what the MoE layers' injected gradients are scaled by now
        # True while Lightning runs a batch whose gradients wait for later batches of the same optimizer step
        # (the strategy's block_backward_sync sets it): its agreement reduces no gradient.
        self.step_continues = False
        self._loop: Any = None  # the loop whose closure factory install() wrapped
        self.replays_collectives = self.pipeline is None and (
            strategy.layout.tp > 1 or self.fsdp_root is not None or self.has_experts)
        self.replayed: list[int] = []  # collectives each replay issued (for tests and the log)
        # A guard would refuse the collectives these layouts need (a pipeline step sends and receives throughout).
        self._guarded = self.replays_collectives or self.pipeline is not None
        ddp = strategy.model
        if hasattr(ddp, "broadcast_buffers"):  # DDP broadcasts buffers in forward; done at the agreement instead
            ddp.broadcast_buffers = False
        self._buffers = list(module.buffers())
        history = memory_history_kwargs(strategy.root_device, options.oom_memory_history)
        if history is not None:
            torch.cuda.memory._record_memory_history(**history)
        self.install()

    # ------------------------------------------------------------------ the step
    def install(self) -> None:
        """Run every closure the Trainer's automatic-optimization loop makes through :meth:`run`.

        Lightning calls the closure of an accumulated batch itself and that of an optimizer step's last batch
        inside ``optimizer.step``; wrapping the loop's closure factory covers both, and the precision plugin and
        optimizer see Lightning's own ``Closure``. :meth:`uninstall` puts the factory back.
        """
        loop = self.trainer.fit_loop.epoch_loop.automatic_optimization
        make_closure = getattr(loop, "_make_closure", None)
        if make_closure is None:
            raise RuntimeError(
                "`memory.oom_recovery=True` runs Lightning's training closure through its agreement, and finds it "
                "through the loop's `_make_closure` (Lightning 2.5 and 2.6); this Lightning has none. Install "
                "lightning>=2.5,<2.7 or turn oom_recovery off.")

        def make_recoverable_closure(kwargs: Any, optimizer: Any, batch_idx: int) -> Closure:
            closure = make_closure(kwargs, optimizer, batch_idx)
            # (Closure.__call__ calls self.closure: the instance attribute runs instead of the class's method)
            closure.closure = partial(self.run, closure, batch_idx)  # type: ignore[method-assign]
            return closure

        loop._make_closure = make_recoverable_closure
        self._loop = loop

    def uninstall(self) -> None:
        """Give the loop its own closure factory back (end of the fit)."""
        if self._loop is not None:
            vars(self._loop).pop("_make_closure", None)
            self._loop = None

    @contextlib.contextmanager
    def continuing_step(self) -> Any:
        """Lightning runs a batch whose gradients are kept for later batches of the same optimizer step."""
        self.step_continues = True
        try:
            yield
        finally:
            self.step_continues = False

    @torch.enable_grad()
    def run(self, closure: Closure, batch_idx: int = 0) -> ClosureResult:
        """Lightning's closure for one batch, as attempts agreed across ranks; returns what the closure returns."""
        step, attempt = self.trainer.global_step, 0
        split = self.schedule.split
        rng = _rng_state(self.strategy.root_device)
        last_of_step = not self.step_continues
        module = self.strategy.lightning_module
        # Later batches of an optimizer step: the earlier batches' gradients and routing counts stay out of reach
        # of the attempts (the first batch's closure zeroes the gradients, as Lightning's does).
        kept = _set_gradients_aside(module) if batch_idx % self._accumulate else {}
        counts = _bias_counts(module)
        while True:
            if attempt:
                _set_rng_state(self.strategy.root_device, rng)  # a retry draws what the step would have drawn
                _restore_bias_counts(counts)  # the failed attempt's routing counts are not the step's
            result, error = self._attempt(closure, split, first=attempt == 0)
            failed_ranks, has_grad = self._agree(error is not None, kept)
            if not failed_ranks:
                assert result is not None
                end_recording()
                _add_gradients_back(kept)
                self._finish(has_grad, reduce_gradients=last_of_step)
                self._guarded = True
                self.schedule.on_success()
                return result
            attempt += 1
            new_split = self.schedule.on_oom(self._splittable(batch_size_of(self.batch)))
            self._report(step, batch_idx, attempt, failed_ranks, split, new_split, error)
            if new_split is None:
                raise OOMRecoveryExhausted(exhausted_message(
                    step=step, batch_size=batch_size_of(self.batch), ranks=failed_ranks, pieces=split,
                    error=error or "on another rank", device=self.strategy.root_device,
                    activation_checkpointing=self.options.activation_checkpointing))
            split = new_split

    def _attempt(self, closure: Closure, split: int, first: bool) -> tuple[ClosureResult | None, str | None]:
        """Forward and backward of the whole batch in ``split`` micro-batches, without any collective."""
        module = self.strategy.lightning_module
        fx_name = module._current_fx_name
        if not first:
            _clear_gradients(module)
        self.deferred = []
        guard = contextlib.nullcontext() if self._guarded else CollectiveGuard()  # until one attempt succeeded
        issued_before = issued_collectives() if self.replays_collectives else {}
        if self.replays_collectives or self._stages_exchange_tokens:
            begin_attempt()  # (MoE layers keep each dispatch's counts: a failed rank replays the rest with them)
        issued: dict[str, int] = {}
        message: str | None = None
        pieces = None if split == 1 and first else split_batch(self.batch, split)  # (views: nothing to run out of)
        try:
            with guard, self._local_gradients(), covered_attempt():
                if pieces is None:
                    result = Closure.closure(closure)  # Lightning's own order, hooks and all
                else:
                    result = self._split_attempt(closure, pieces, first)
            message = self.pipeline.take_failure() if self.pipeline is not None else None
            if message is None:
                return result, None
            del result  # a hollow pipeline step ran to its end; its values are not the step's
        except torch.OutOfMemoryError as oom:
            # (a pipeline's stage may have failed first, and the step run on hollow: its error is the one to report)
            earlier = self.pipeline.take_failure() if self.pipeline is not None else None
            message = earlier or (str(oom).splitlines()[0] if str(oom) else type(oom).__name__)
            self._snapshot()
            if issued_before:
                issued = issued_since(issued_before)
        finally:
            self._set_piece(None, None)
            module._current_fx_name = fx_name
        # The exception and its frames are gone here: what the attempt held can be freed.
        self.deferred = None
        _clear_gradients(module)
        if torch.cuda.is_available() and self.strategy.root_device.type == "cuda":
            torch.cuda.empty_cache()
        if self.replays_collectives:
            failure = None
            try:
                self._let_peers_finish(closure, split, issued)
            except Exception as error:  # noqa: BLE001 - any failure here leaves the peers without this rank
                failure = f"{type(error).__name__}: {error}"
            # Raised outside the handler, unchained: the trace's frames hold autograd nodes that reference the
            # parameters, and Lightning's teardown (which moves the model) fails while they are alive.
            if failure is not None:
                raise RuntimeError(
                    f"`memory.oom_recovery`: rank {dist.get_rank()} ran out of memory ({message}) and then could not "
                    f"issue the rest of the step's collectives ({failure}); its peers cannot finish the step, so the "
                    "run stops here. The step is traced on fake tensors to learn its collectives, so training_step "
                    "must not read tensor values (`.item()`, `.tolist()`, branching on them); see docs/memory.md."
                )
        return None, message

    def _splittable(self, batch_size: int) -> int:
        """The most pieces the batch can be split into (a pipeline schedule may need several samples per piece)."""
        if self.pipeline is None:
            return batch_size
        return max(1, batch_size // self.pipeline.smallest_piece())

    def _local_gradients(self) -> Any:
        """DDP: keep gradients local until the agreement (``no_sync``). FSDP2 reduce-scatters in backward as usual;
        a pipeline under recovery keeps its gradients local by itself (``finish_backward``)."""
        if self.fsdp_root is not None or self.pipeline is not None:
            return contextlib.nullcontext()
        return self.strategy._no_gradient_sync(self.strategy.model)

    def _let_peers_finish(self, closure: Closure, split: int, issued: dict[str, int]) -> None:
        """Issue the collectives of this attempt that the failure skipped, so the peers reach the agreement.

        The attempt runs again on fake tensors (no memory, no communication) to learn its collectives in
        order; ``self.log`` is silenced there and ``strategy.reduce`` deferred as in the real attempt, so
        nothing of the traced run reaches the logs. Its fake gradients are dropped.
        """
        module = self.strategy.lightning_module

        def attempt() -> None:
            for piece, weight in split_batch(self.batch, split):
                self._set_piece(piece, weight)
                result = closure._step_fn()
                if result.closure_loss is not None:
                    with self.strategy._step_context():
                        result.closure_loss.backward()

        module.log = _silenced_log  # type: ignore[method-assign]  # an instance attribute, removed below
        self.deferred = []
        try:
            self._reset_fsdp()  # the failure left FSDP2 mid-iteration (units gathered, hooks pending)
            with self._local_gradients():
                calls = trace_collectives(attempt)
        finally:
            del module.log
            self.deferred = None
            self._set_piece(None, None)
            _clear_gradients(module)
        self._reset_fsdp()
        self.replayed.append(replay_remaining(calls, issued))

    def _reset_fsdp(self) -> None:
        """FSDP2's recovery call after an aborted iteration: waits for issued collectives, reshards, clears trackers.

        Safe before the replay: the collectives it waits for were issued before the failure, so the peers run them.
        """
        if self.fsdp_root is not None:
            self.fsdp_root.reset_iter_state()

    def _set_piece(self, piece: Any, weight: float | None) -> None:
        """The micro-batch ``training_step`` runs next and its share of the samples (None, None: the loop's batch).

        MoE layers inject their z-loss gradient themselves; it is scaled like the user's loss.
        """
        self.micro_batch, self.loss_weight = piece, weight
        scale = self._aux_loss_base * (1.0 if weight is None else weight)
        if self.has_experts and scale != self._aux_loss_scale:  # (a clean step sets nothing: no walk over the model)
            set_aux_loss_scale(self.strategy.lightning_module, scale)
            self._aux_loss_scale = scale

    def _split_attempt(self, closure: Closure, pieces: list[tuple[Any, float]], first: bool) -> ClosureResult:
        total: torch.Tensor | None = None
        extra: dict[str, Any] = {}
        for i, (piece, weight) in enumerate(pieces):
            self._set_piece(piece, weight)
            try:
                result = closure._step_fn()
                if i == 0 and first and closure._zero_grad_fn is not None:
                    closure._zero_grad_fn()  # once per step, where Lightning calls it
                if closure._backward_fn is not None and result.closure_loss is not None:
                    closure._backward_fn(result.closure_loss)
                if result.loss is not None:
                    total = result.loss * weight if total is None else total + result.loss * weight
            except torch.OutOfMemoryError as oom:
                if self.pipeline is None:
                    raise
                # After this piece's schedule (Lightning's closure, the gradients' weighting): the later pieces'
                # schedules still run, hollow, so that no other stage waits for this rank's sends.
                self.pipeline.record_failure(oom)
                continue
            extra = result.extra
        return ClosureResult(total, extra=extra)

    # ------------------------------------------------------------------ the fixed point
    def _agree(self, failed: bool, kept: dict[nn.Parameter, torch.Tensor]) -> tuple[list[int], list[bool]]:
        """One all-reduce (MAX): failed ranks, recorded reductions (count and its negative), gradients present
        (this batch's, or those ``kept`` aside from earlier batches of the optimizer step).

        Under pipeline parallelism each rank holds other parameters (its stages'), so the gradient flags are
        left out: each rank keeps its own, and :meth:`_finish` reduces them with the pipeline's own reductions.
        """
        strategy = self.strategy
        world, rank = dist.get_world_size(), dist.get_rank()
        local = _trainable(strategy.lightning_module)
        params = local if self.pipeline is None else []
        count = len(self.deferred or [])
        vector = torch.zeros(world + 2 + len(params), device=strategy.root_device)
        vector[rank] = float(failed)
        vector[world], vector[world + 1] = count, -count
        vector[world + 2:] = torch.tensor([p.grad is not None or p in kept for p in params], dtype=torch.float32)
        dist.all_reduce(vector, op=dist.ReduceOp.MAX)
        flags = vector.tolist()
        failed_ranks = [r for r in range(world) if flags[r] > 0]
        if not failed_ranks and flags[world] != -flags[world + 1]:
            raise RuntimeError(
                f"`memory.oom_recovery`: the ranks recorded different numbers of reductions in training_step "
                f"(between {int(-flags[world + 1])} and {int(flags[world])}); every rank must log the same keys "
                "with sync_dist=True in each step."
            )
        if self.pipeline is not None:
            return failed_ranks, [p.grad is not None or p in kept for p in local]
        return failed_ranks, [flag > 0 for flag in flags[world + 2:]]

    def _finish(self, has_grad: list[bool], reduce_gradients: bool) -> None:
        """The collectives the attempt left out, in the same order on every rank (the gradients' only after the
        last batch of an optimizer step: they are reduced as their sum over its batches)."""
        if reduce_gradients:
            self._reduce_gradients(has_grad)
        for tensor, group, op in self.deferred or []:
            reduced = self.strategy._reduce_now(tensor, group, op)
            if reduced is not tensor:
                tensor.copy_(reduced)
        self.deferred = None
        if self._reduces_over_replicas:
            for buffer in self._buffers:  # what DDP's forward would have broadcast from dp rank 0
                dist.broadcast(buffer, src=dist.get_global_rank(self._dp_group, 0), group=self._dp_group)

    def _reduce_gradients(self, has_grad: list[bool]) -> None:
        """A gradient wherever any rank has one, then DDP's all-reduce, the pipeline's and the experts' reductions."""
        strategy = self.strategy
        dp_group = self._dp_group
        dp = dist.get_world_size(dp_group)
        ddp = self._reduces_over_replicas
        handles = []
        synced = []
        for p, any_rank in zip(_trainable(strategy.lightning_module), has_grad, strict=True):
            if not any_rank:
                continue  # no rank has a gradient: the optimizer skips it, as without recovery
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if ddp and not is_expert_parameter(p):  # (ep-split experts are averaged over their replicas below)
                handles.append(dist.all_reduce(p.grad, group=dp_group, async_op=True))
                synced.append(p.grad)
        for handle in handles:
            handle.wait()
        for grad in synced:
            grad.div_(dp)
        if self.pipeline is not None:  # the tied copies' sum and the traced replicas' average (runtime.py)
            self.pipeline.reduce_gradients()
        if self.has_experts:
            strategy._reduce_expert_gradients(strategy.lightning_module)  # what post_backward left to this point

    # ------------------------------------------------------------------ reporting
    def _report(self, step: int, batch_idx: int, attempt: int, ranks: list[int], split: int, new_split: int | None,
                error: str | None) -> None:
        from picotron_lightning.monitoring.alerts import find_alert_manager
        from picotron_lightning.monitoring.collector import MetricsCollector

        self.retries += 1
        self.events.append({"step": step, "batch_idx": batch_idx, "attempt": attempt, "ranks": ranks, "split": split,
                            "new_split": new_split})
        callbacks = self.trainer.callbacks
        alerts = find_alert_manager(callbacks)
        if alerts is not None:
            if new_split is None:
                alerts.alert("oom_exhausted", f"out of memory on rank(s) {ranks} at the finest split ({split} "
                             "micro-batches); stopping", severity="critical", step=step, key=f"oom_exhausted@{step}")
            else:
                alerts.alert("oom_retry", f"out of memory on rank(s) {ranks} with {split} micro-batch(es); redoing "
                             f"the step with {new_split}" + (f" ({error})" if error else ""), severity="warning",
                             step=step, key=f"oom_retry@{step}.{batch_idx}.{attempt}", ranks=ranks, split=new_split)
        for callback in callbacks:
            if isinstance(callback, MetricsCollector):
                callback.record_metric("memory/oom_retries", float(self.retries))
                callback.record_metric("memory/oom_micro_batches", float(new_split or split))

    def _snapshot(self) -> None:
        if memory_history_kwargs(self.strategy.root_device, self.options.oom_memory_history) is None:
            return
        directory = self.trainer.log_dir or self.trainer.default_root_dir
        dump_memory_snapshot(directory, self.trainer.global_rank, self.trainer.global_step, self.retries)

    # ------------------------------------------------------------------ hooks the strategy calls
    def defer(self, tensor: torch.Tensor, group: Any, reduce_op: Any) -> bool:
        """Record a reduction asked for inside an attempt (done at the agreement point); False outside one."""
        if self.deferred is None:
            return False
        self.deferred.append((tensor, group, reduce_op))
        return True


def _silenced_log(*args: Any, **kwargs: Any) -> None:
    """``LightningModule.log`` while an attempt is traced on fake tensors: their values are not the step's."""


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _clear_gradients(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def _fsdp_root(model: nn.Module) -> Any:
    """The outermost FSDP2 module of ``model`` (the one ``reset_iter_state`` is called on), or None."""
    from torch.distributed.fsdp import FSDPModule

    return next((m for m in model.modules() if isinstance(m, FSDPModule)), None)


def _materialize_unsharded_parameters(model: nn.Module) -> None:
    """Gather and free every FSDP2 unit once, on every rank alike, before training.

    FSDP2 creates each unit's unsharded parameters at its first all-gather and reuses them after. A step
    traced on fake tensors (the replay after an OOM) must not be that first gather, or the parameters it
    creates would be fake for the rest of the run; so every unit is gathered once here, root first (the
    root's first call sets up the others' state as its children).
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():  # pre-order: the root comes first
        if isinstance(module, FSDPModule):
            module.unshard()
            module.reshard()


def _expert_layer_facts(module: nn.Module) -> list[ExpertLayerFacts]:
    """The MoE layers of ``module``, as OOM recovery's layout check reads them."""
    facts = []
    for name, m in module.named_modules():
        if isinstance(m, MoELayer):
            facts.append(ExpertLayerFacts(name, records_exchange=True, aux_loss_coeff=m.balancer.aux_loss_coeff,
                                          capacity_factor=m.capacity_factor))
        elif isinstance(m, ExpertParallelExperts):
            facts.append(ExpertLayerFacts(name, records_exchange=False))
    return facts


def _set_gradients_aside(module: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """Take the gradients of the optimizer step's earlier batches off the parameters (an attempt starts from none)."""
    kept = {}
    for p in module.parameters():
        if p.grad is not None:
            kept[p], p.grad = p.grad, None
    return kept


def _add_gradients_back(kept: dict[nn.Parameter, torch.Tensor]) -> None:
    """The earlier batches' gradients plus the successful attempt's, in the earlier buffers."""
    for p, grad in kept.items():
        if p.grad is not None:
            grad.add_(p.grad)
        p.grad = grad


def _bias_counts(module: nn.Module) -> dict[LoadBalancer, torch.Tensor | None]:
    return {m: m.pending_counts() for m in module.modules() if isinstance(m, LoadBalancer)}


def _restore_bias_counts(counts: dict[LoadBalancer, torch.Tensor | None]) -> None:
    for balancer, pending in counts.items():
        balancer.restore_pending(pending)
