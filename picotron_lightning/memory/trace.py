"""How the memory estimate runs one rank's training step: on fake tensors, in local gloo processes, or on the
process group that exists; see :mod:`picotron_lightning.memory.estimate` for the public calls.

For each rank the trace builds the model (on fake tensors, or real), applies the strategy's ``parallelize``
steps, runs training steps in the order of Lightning's automatic optimization (training step, zero_grad,
backward, optimizer step) and measures one of them with :class:`~picotron_lightning.memory.tracker.LiveBytes`.
DDP's gradient buckets live in C++ (no op creates them) for the whole run, and the gradients are views into
them (``gradient_as_bucket_view``): the fake trace's one replica keeps its gradients through the step
(``zero_grad(set_to_none=False)``, so backward accumulates into them as into the buckets), and a real DDP
trace counts them as the gradients they are; either way ``gradient_buckets`` says how many bytes they are.
Under tensor parallelism the fake trace comes out a little over the real one (measured up to 4.6% at tp=2 on
tiny Llamas and GPT-2: one collective-sized buffer more at the peak), on the side of caution for a budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from picotron_lightning.memory.cuda_allocator import CudaMemory, cuda_memory
from picotron_lightning.memory.tracker import PeakBreakdown
from picotron_lightning.topology import ParallelLayout

StepFn = Callable[[nn.Module, Any], torch.Tensor]

# A real trace measures this many steps and keeps the smallest peak. A storage counts until its last reference
# goes, and gloo's worker thread lets go of a finished collective's buffers a moment after the step's thread
# waited for it; on a busy machine that moment can fall after the step's next peak and add the buffer to it
# (measured: tp=2 with full checkpointing, rank 0 traced 1.358 MiB where its replica and the real run had
# 1.295). The delay only adds bytes and steady steps have equal peaks, so the smallest of a few is the step's.
# (Not where MoE layers route by weights that each step updates: their steps' peaks differ.)
REAL_MEASURED_STEPS = 3


@dataclass(frozen=True)
class RankEstimate:
    """Predicted peak bytes of one rank's training step."""

    rank: int
    coordinates: dict[str, int]
    breakdown: PeakBreakdown
    comm_buffers: int  # DDP gradient buckets not already counted as gradients (0 with gradient_as_bucket_view)
    method: str  # "fake" (fake tensors) or "real" (real tensors on the fake process group)
    flops: int = 0
    """Floating-point operations of one step (matmuls and attention, recompute included); 0 unless ``count_flops``."""
    offloaded_activations: int = 0
    """Bytes of saved tensors copied to the host in the step (activation offload; each comes back once)."""
    offloaded_state: int = 0
    """Sharded parameters, gradients and optimizer state kept in host memory (FSDP2 ``CPUOffloadPolicy``)."""
    bytes_moved: int = 0
    """Bytes crossing between device and host per step because of offload."""
    cuda: CudaMemory | None = None
    """Active and reserved bytes CUDA's caching allocator would need for the storages live at the peak."""
    gradient_buckets: int = 0
    """Bytes of DDP's gradient buckets (counted in the breakdown's gradients, or in ``comm_buffers``): memory a
    real DDP holds from its construction, which no dispatched op allocates (what ``MicroBatchFinder`` adds to a
    measured first step)."""
    routing: str = ""
    """The MoE routing charged: ``"worst case"`` (a bound over batches, ``memory/routing.py``), ``"measured"``
    (the traced batch's own routing), or ``""`` where no MoE layer's memory depends on its routing."""

    @property
    def traced_peak(self) -> int:
        """The traced step's peak: what an op-level live-byte counter sees."""
        return self.breakdown.total

    @property
    def peak(self) -> int:
        """Device bytes the rank holds at the peak: communication buffers in, host-offloaded state out."""
        return self.breakdown.total + self.comm_buffers - self.offloaded_state


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """Be ``rank`` of a fake world of ``world_size`` (collectives are no-ops) for the duration."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            "The memory estimate runs before launch: a process group already exists in this process. "
            "Call it before `trainer.fit` (or run `python -m picotron_lightning.memory.estimate`)."
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        forget_dtensor_shardings()


def forget_dtensor_shardings() -> None:
    """Clear DTensor's caches of each op's sharding, which outlive the fake process group otherwise.

    They are keyed by the op's input specs, which what runs next in the same process matches with its own mesh of
    the same shape. The training run after a memory budget's choice reused the fake trace's entries and its
    tensor-parallel backward went wrong (at tp=2 every gradient off, up to 10%, and the losses 6e-3 from one
    process from the second step, the first loss exact; clearing these caches alone mends it, as if the reused
    entries' collectives ran on the fake group, which does nothing). And the next rank's trace in the same
    estimate reused the previous rank's local shapes: GPT-2's head, 51 and 50 columns at tp=2, failed.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache

    clear_native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)  # the C++ dispatch's
    if clear_native is not None:
        clear_native()
    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    clear_redistribute_planner_cache()


def representative_ranks(layout: ParallelLayout) -> list[int]:
    """One rank per (pipeline stage, expert-parallel rank, tensor rank): the data-parallel replicas of one of them
    hold equal shapes. (The expert-parallel ranks hold different experts and, in an MoE step, different rows:
    under worst-case routing their peaks differed by 3% on tiny-moe.)"""
    return [layout.rank_of(pp=s, dp=e, tp=t) for s in range(layout.pp) for e in range(layout.ep)
            for t in range(layout.tp)]


def _fake_trace(
    build_module: Callable[[], nn.Module], batch: torch.Tensor, layout: ParallelLayout, config: Any, rank: int,
    step: StepFn | None, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None, *,
    count_flops: bool = False,
) -> RankEstimate:
    from picotron_lightning.parallel.data import check_ddp_with_tensor_parallel, resolve_mode

    if config.data_parallel.mode == "auto" and layout.tp == 1:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            probe = build_module()
            mode = resolve_mode("auto", probe, torch.device("cpu"), layout.world_size, tensor_parallel=False)
        config = dataclasses.replace(config, data_parallel=dataclasses.replace(config.data_parallel, mode=mode))
    if layout.dp > 1 and layout.pp == 1:
        check_ddp_with_tensor_parallel(config.data_parallel.mode, layout.tp > 1)  # as parallelize would refuse it
    if config.data_parallel.mode == "ddp" and layout.dp > 1 and layout.ep > 1:
        # One replica without data parallelism would hold every expert; the real trace shares them out.
        raise NotImplementedError("DDP with expert parallelism: the one-replica trace cannot share out the experts")
    if config.data_parallel.mode == "ddp" and layout.dp > 1:
        # DDP's replicas each hold and compute what one process would; its additions are the gradient buckets,
        # which exist for the whole run with the gradients as views into them. DDP cannot be built on fake
        # tensors, so one replica is traced with its gradients kept through the step: zeroed in place instead of
        # freed, backward accumulating into them as it does into the buckets. (Freeing them at zero_grad and
        # adding a bucket copy instead was 2-8% off: the replica's peak fell where it held no gradients, and the
        # real run's where it held the buckets, on Hugging Face GPT-2 with selective checkpointing 7.8% under.)
        single = ParallelLayout(1, layout.tp, layout.pp, 1)
        # DDP is refused with pp > 1 by the options; the single replica is traced without data parallelism.
        coords = layout.coordinates(rank)
        inner_rank = single.rank_of(pp=coords.pp, tp=coords.tp)
        with fake_process_group(inner_rank, single.world_size):
            estimate = _trace_in_group(build_module, batch, single, config, inner_rank, step, build_optimizer, True,
                                       count_flops=count_flops, keep_gradients=True)
        grads = estimate.breakdown.params - _buffer_bytes_of(build_module)
        b = estimate.breakdown
        # At the end of DDP's backward every gradient exists and each bucket's all-reduce result (one
        # more gradient-sized copy) is being copied back into them: a peak one replica never has.
        end_of_backward = PeakBreakdown(params=b.params, grads=grads, optimizer=b.optimizer, activations=0,
                                        temporaries=grads)
        breakdown = end_of_backward if end_of_backward.total > b.total else b
        return dataclasses.replace(estimate, rank=rank, coordinates=_coordinates(layout, rank), comm_buffers=0,
                                   gradient_buckets=grads, breakdown=breakdown)
    with fake_process_group(rank, layout.world_size):
        return _trace_in_group(build_module, batch, layout, config, rank, step, build_optimizer, True,
                               count_flops=count_flops)


def _buffer_bytes_of(build_module: Callable[[], nn.Module]) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        module = build_module()
        return sum(b.numel() * b.element_size() for b in module.buffers()) + sum(
            p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)


def _coordinates(layout: ParallelLayout, rank: int) -> dict[str, int]:
    c = layout.coordinates(rank)
    return {"pp": c.pp, "dp": c.dp, "tp": c.tp, "ep": c.ep}


def _real_trace_worker(rank: int, world_size: int, build_module: Callable[[], nn.Module], batch: torch.Tensor,
                       layout: ParallelLayout, config: Any, step: StepFn | None,
                       build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None, *,
                       count_flops: bool = False) -> RankEstimate:
    from picotron_lightning.testing import init_gloo

    init_gloo(rank, world_size)
    estimate = _trace_in_group(build_module, batch, layout, config, rank, step, build_optimizer, False,
                               count_flops=count_flops)
    dist.barrier()
    return estimate


def _trace_on_existing_group(build_module: Callable[[], nn.Module], batch: torch.Tensor, layout: ParallelLayout,
                             config: Any, step: StepFn | None,
                             build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None, *,
                             count_flops: bool = False) -> list[RankEstimate]:
    """This rank's real trace on the process group that exists, then every rank's, gathered."""
    import gc

    if not dist.is_initialized():
        raise RuntimeError("`in_process_group=True` traces on the existing process group, but there is none.")
    if dist.get_world_size() != layout.world_size:
        raise ValueError(f"`in_process_group=True`: the process group has {dist.get_world_size()} ranks, the layout "
                         f"{layout.describe()} needs {layout.world_size}.")
    if dist.get_backend() != "gloo":
        raise RuntimeError(f"`in_process_group=True` traces with CPU tensors, which the {dist.get_backend()!r} "
                           "process group cannot communicate; it needs a gloo group.")
    # The trace builds and trains a copy of the model: keep the run's random state as it was.
    with torch.random.fork_rng(devices=[]):
        mine = _trace_in_group(build_module, batch, layout, config, dist.get_rank(), step, build_optimizer, False,
                               count_flops=count_flops)
    gc.collect()  # the copy's cycles (module <-> hooks) go before training starts
    every: list[Any] = [None] * layout.world_size
    dist.all_gather_object(every, mine)
    return every


def _trace_in_group(
    build_module: Callable[[], nn.Module], batch: torch.Tensor, layout: ParallelLayout, config: Any, rank: int,
    step: StepFn | None, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None, fake: bool, *,
    count_flops: bool = False, keep_gradients: bool = False,
) -> RankEstimate:
    """Build, parallelize and run two steps as ``rank`` of the process group that exists; measure the second
    (the third under real DDP, after its buckets are rebuilt; on real tensors the smallest peak of
    :data:`REAL_MEASURED_STEPS` steps from there, unless MoE routing follows the weights).

    With ``count_flops`` a third step runs under :class:`FlopCount`: the measured step is the same with or
    without it. Where an MoE layer's memory depends on its routing and ``memory.moe_routing`` is
    ``"worst_case"``, the step is traced once per expert-parallel rank ``j`` with every token routed to ``j``'s
    experts (:func:`~picotron_lightning.memory.routing.forced_routing`; every rank takes the same ``j`` in turn)
    and the rank is charged its largest peak. ``keep_gradients``: zero the gradients in place at ``zero_grad``
    instead of freeing them (a DDP replica traced without DDP, whose buckets hold them for the whole run).
    """
    worst_case = config.memory.moe_routing == "worst_case"
    estimate, targets = _trace_once(build_module, batch, layout, config, rank, step, build_optimizer, fake,
                                    count_flops=count_flops, target=0 if worst_case else None,
                                    keep_gradients=keep_gradients)
    for target in range(1, targets if worst_case else 0):
        other, _ = _trace_once(build_module, batch, layout, config, rank, step, build_optimizer, fake,
                               count_flops=count_flops, target=target, keep_gradients=keep_gradients)
        if other.peak > estimate.peak:
            estimate = other
    return estimate


def _trace_once(
    build_module: Callable[[], nn.Module], batch: torch.Tensor, layout: ParallelLayout, config: Any, rank: int,
    step: StepFn | None, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None, fake: bool, *,
    count_flops: bool, target: int | None, keep_gradients: bool = False,
) -> tuple[RankEstimate, int]:
    """One trace of :func:`_trace_in_group`; with ``target``, MoE routing forced to that expert-parallel rank's
    worst case where routing matters. Also returns :func:`routing_targets` of the model."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from picotron_lightning.memory.flops import FlopCount
    from picotron_lightning.memory.routing import forced_routing, routing_targets
    from picotron_lightning.memory.tracker import LiveBytes
    from picotron_lightning.parallel.parallelize import parallelize

    device = torch.device("cpu")
    with warnings.catch_warnings(), contextlib.ExitStack() as forcing:
        warnings.simplefilter("ignore")  # `self.log` outside a Trainer, fake-group notices
        dp = config.data_parallel
        # HSDP's mesh splits dp into replicate x shard, as the strategy builds it (one node: every rank local).
        shard = layout.hsdp_shard_size(dp.hsdp_shard_size, layout.world_size) if dp.mode == "hsdp" else None
        mesh = layout.build_device_mesh(device.type, hsdp_shard_size=shard)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            module = build_module()
            local_batch = fake_mode.from_tensor(batch) if fake_mode is not None else batch.clone()
            parallel = parallelize(module, mesh, layout, config, device, local_processes=layout.world_size)
            targets = routing_targets(module)
            if targets and target is not None:
                forcing.enter_context(forced_routing(module, target))
            optimizer = _optimizer(module, build_optimizer)
            run = _step_runner(parallel, module, optimizer, step, keep_gradients=keep_gradients)
            run(local_batch)  # first step: creates the optimizer state
            if parallel.data_parallel_mode == "ddp":
                # Real DDP (the real trace) rebuilds its buckets in the second step's forward, in the order the
                # first backward produced gradients: measure the third step, which every later step resembles.
                run(local_batch)
            # Steps differ where an MoE layer routes by its weights, which each step updates: measure one of them.
            routes_by_weights = bool(targets) and target is None
            tracker = None
            for _ in range(1 if fake or routes_by_weights else REAL_MEASURED_STEPS):
                candidate = LiveBytes(offload_saved=config.memory.activation_offload)
                candidate.start_step(module, [optimizer], local_batch)
                with candidate:
                    run(local_batch)
                if tracker is None or candidate.peak < tracker.peak:
                    tracker = candidate
            assert tracker is not None
            breakdown = tracker.breakdown(module, [optimizer])
            sizes = tracker.peak_sizes()
            state = _offloaded_state(module, breakdown) if config.memory.cpu_offload else 0
            flops = FlopCount()
            if count_flops:  # after the measurement, so nothing of it is in the peak
                with flops:
                    run(local_batch)
        ddp = parallel.data_parallel_mode == "ddp"
        buckets = _separate_bucket_bytes(parallel.module) if ddp else 0
        bucket_bytes = _bucket_bytes(parallel.module) if ddp else 0
    moved = 2 * tracker.offloaded_bytes
    if state:
        # Per step: the shards go to the device for each all-gather (forward, and backward when
        # resharded after forward), the reduced gradient shards come back.
        gathers = 2 if config.data_parallel.reshard_after_forward else 1
        moved += gathers * breakdown.params + breakdown.grads
    routing = "" if not targets else "worst case" if target is not None else "measured"
    return RankEstimate(rank=rank, coordinates=_coordinates(layout, rank), breakdown=breakdown,
                        comm_buffers=buckets, gradient_buckets=bucket_bytes, method="fake" if fake else "real",
                        flops=flops.total,
                        offloaded_activations=tracker.offloaded_bytes, offloaded_state=state, bytes_moved=moved,
                        cuda=cuda_memory(sizes, expandable_segments=config.memory.expandable_segments),
                        routing=routing), targets


def _bucket_bytes(ddp: nn.Module) -> int:
    """Bytes of a real DDP module's gradient buckets: its reduced parameters' gradients."""
    ignored = set(getattr(ddp, "parameters_to_ignore", ()))
    inner = getattr(ddp, "module", ddp)
    return sum(p.numel() * p.element_size() for name, p in inner.named_parameters()
               if p.requires_grad and name not in ignored)


def _separate_bucket_bytes(ddp: nn.Module) -> int:
    """Bytes of a real DDP module's gradient buckets that the trace does not already count.

    With ``gradient_as_bucket_view`` (how ``parallel/data.py`` builds DDP) every reduced parameter's
    ``.grad`` is a view into its bucket: the buckets *are* the gradients, which the trace registers and
    counts, so nothing is added (adding them counted one gradient copy twice). Otherwise the buckets are
    a copy of the reduced parameters' gradients, allocated in C++ where no op shows them.
    """
    return 0 if getattr(ddp, "gradient_as_bucket_view", False) else _bucket_bytes(ddp)


def _offloaded_state(module: nn.Module, breakdown: PeakBreakdown) -> int:
    """What FSDP2's CPU offload keeps off the device at the peak: sharded parameters (not buffers), gradients,
    optimizer state. (A unit's shard is copied to the device for its all-gather; that copy is transient.)"""
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return max(0, breakdown.params - buffers) + breakdown.grads + breakdown.optimizer


def _optimizer(module: nn.Module, build: Callable[[nn.Module], torch.optim.Optimizer] | None) -> torch.optim.Optimizer:
    if build is not None:
        return build(module)
    configure = getattr(module, "configure_optimizers", None)
    if configure is not None:
        out = configure()
        if isinstance(out, dict):
            out = out["optimizer"]
        if isinstance(out, (list, tuple)):
            out = out[0]
        if isinstance(out, torch.optim.Optimizer):
            return out
    return torch.optim.AdamW(module.parameters())


def _step_runner(parallel: Any, module: nn.Module, optimizer: torch.optim.Optimizer,
                 step: StepFn | None, keep_gradients: bool = False) -> Callable[[Any], None]:
    """One training step in the order of Lightning's automatic optimization (``keep_gradients``: zeroed in place,
    as DDP's bucket views, not freed)."""
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    pipeline = parallel.pipeline
    redirect = _ForwardRedirection()

    def loss_of(batch: Any) -> torch.Tensor:
        if step is not None:
            return step(parallel.module, batch)
        if pipeline is not None:
            return pipeline.run_step(module, "training_step", (batch, 0), {})
        if not hasattr(module, "training_step"):
            raise ValueError("The model has no `training_step`; pass `step=` (a function of model and batch -> loss).")
        # Through the root's __call__ so FSDP's root hooks (or DDP's) run, as the strategy does.
        out: Any = redirect(parallel.module, module, "training_step", batch, 0)  # type: ignore[arg-type]
        return out["loss"] if isinstance(out, dict) else out

    def run(batch: Any) -> None:
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=not keep_gradients)
        if pipeline is not None:
            pipeline.finish_backward()
        else:
            loss.backward()
        optimizer.step()

    return run
