"""Per-rank peak memory of one training step, before launch: trace it on fake tensors, one rank at a time.

For each rank the estimator joins a *fake* process group of the full world size as that rank
(collectives return at once and move nothing), builds the model on fake tensors (no memory, no
compute), applies the same ``parallelize`` steps as the strategy, and runs two training steps the
way Lightning's automatic optimization does (training step, zero_grad, backward, optimizer step).
The second step is measured by :class:`~picotron_lightning.memory.tracker.LiveBytes`: the live
bytes of every storage, peak broken down into parameters, gradients, optimizer state,
activations and temporaries.

Where fake tensors cannot follow the model (data-dependent shapes, as MoE routing has) the
estimator says so and stops; ``allow_real_trace=True`` runs the same trace on real tensors, which
is exact for the memory of a model that fits in host memory but costs its compute.

DDP's gradient buckets live in C++ (no op creates them), so they are added as a separate line,
``comm_buffers``: one copy of this rank's gradients.

Run ``python -m picotron_lightning.memory.estimate --help`` for the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from picotron_lightning.memory.cuda_allocator import CudaMemory, cuda_memory
from picotron_lightning.memory.policy import POLICIES, MemoryPolicy, PolicyEstimate, skip_reason
from picotron_lightning.memory.tracker import PeakBreakdown
from picotron_lightning.topology import ParallelLayout

if TYPE_CHECKING:
    from picotron_lightning.memory.options import MemoryOptions
    from picotron_lightning.options import Picotron3DOptions

StepFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class RankEstimate:
    """Predicted peak bytes of one rank's training step."""

    rank: int
    coordinates: dict[str, int]
    breakdown: PeakBreakdown
    comm_buffers: int  # DDP gradient buckets (not created by ops, so added arithmetically)
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


def representative_ranks(layout: ParallelLayout) -> list[int]:
    """One rank per (pipeline stage, tensor rank): data-parallel ranks of one of them hold equal shapes."""
    return [layout.rank_of(pp=s, dp=0, tp=t) for s in range(layout.pp) for t in range(layout.tp)]


def estimate_memory(
    build_module: Callable[[], nn.Module],
    batch: torch.Tensor,
    layout: ParallelLayout,
    *,
    options: Picotron3DOptions | None = None,
    checkpointing: str = "none",
    checkpoint_every: int = 1,
    memory: MemoryOptions | None = None,
    ranks: Sequence[int] | None = None,
    step: StepFn | None = None,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    allow_real_trace: bool = False,
    timeout: float = 600.0,
    count_flops: bool = False,
    in_process_group: bool = False,
) -> list[RankEstimate]:
    """Predict each rank's peak memory in one training step of ``layout``.

    Args:
        build_module: builds the (unparallelized) model; called once per rank under fake tensors
            (picklable, e.g. a ``functools.partial``, when the real trace may run).
        batch: one rank's micro-batch (a real tensor of the real shape; its values are not used).
        layout: a resolved layout.
        options: the strategy's :class:`~picotron_lightning.options.Picotron3DOptions` (data-parallel mode,
            tp options, pipeline schedule; its layout and memory sections are replaced by ``layout`` and
            ``checkpointing``); default: FSDP2 and the strategy's defaults.
        checkpointing, checkpoint_every: activation checkpointing (see :class:`MemoryOptions`).
        memory: the whole memory policy (checkpointing, activation offload, FSDP2 CPU offload); when given,
            ``checkpointing`` and ``checkpoint_every`` are ignored.
        ranks: which global ranks to estimate; default :func:`representative_ranks`.
        step: ``step(model, batch) -> loss`` for one micro-batch; default: the module's ``training_step``.
        build_optimizer: default: the module's ``configure_optimizers()`` or AdamW.
        allow_real_trace: when fake tensors cannot follow the layout (pipeline and tensor+data
            parallelism on the fake process group, data-dependent shapes such as MoE routing), run
            the step on real tensors in ``layout.world_size`` local gloo processes instead. Exact,
            but it needs every rank's share of the model in host memory and costs one real step.
        timeout: deadline of the real trace, in seconds.
        count_flops: also fill :attr:`RankEstimate.flops`, from one more step run after the measured one
            (under :class:`~picotron_lightning.memory.flops.FlopCount`), so counting never changes the peak.
        in_process_group: trace one real step on the process group that already exists (gloo, CPU tensors,
            world size ``layout.world_size``) instead of fake tensors or local processes. A collective call:
            every rank of the group calls it with the same arguments, and every rank gets every rank's
            estimate (``all_gather_object``), so all of them see the same numbers.
    """
    from picotron_lightning.options import Picotron3DOptions

    if not layout.is_resolved:
        raise ValueError(f"`layout` must be resolved (no 'auto'); got {layout.describe()}. Call layout.resolve(n).")
    base = options if options is not None else Picotron3DOptions()
    policy = memory if memory is not None else dataclasses.replace(
        base.memory, activation_checkpointing=checkpointing, checkpoint_every=checkpoint_every)
    config = dataclasses.replace(base, memory=dataclasses.replace(policy, memory_budget=None))
    wanted = list(ranks) if ranks is not None else representative_ranks(layout)
    if in_process_group:
        every_rank = _trace_on_existing_group(build_module, batch, layout, config, step, build_optimizer,
                                              count_flops=count_flops)
        return [every_rank[rank] for rank in wanted]
    try:
        return [_fake_trace(build_module, batch, layout, config, rank, step, build_optimizer, count_flops=count_flops)
                for rank in wanted]
    except Exception as error:  # noqa: BLE001 - reported, or the real trace runs instead
        if not allow_real_trace:
            raise RuntimeError(
                f"The fake-tensor trace of {layout.describe()} failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). Pass allow_real_trace=True (--real) to trace "
                "one real step in local gloo processes instead (needs each rank's model share in host memory)."
            ) from error
    from picotron_lightning.testing import run_ranks

    every = run_ranks(_real_trace_worker, layout.world_size, build_module, batch, layout, config, step,
                      build_optimizer, timeout=timeout, count_flops=count_flops)
    return [every[rank] for rank in wanted]


def estimate_policies(
    build_module: Callable[[], nn.Module],
    batch: torch.Tensor,
    layout: ParallelLayout,
    *,
    options: Picotron3DOptions | None = None,
    device_type: str = "cuda",
    policies: Sequence[MemoryPolicy] = POLICIES,
    estimate_skipped: bool = True,
    stop_at_budget: int | None = None,
    **kwargs: Any,
) -> list[PolicyEstimate]:
    """:func:`estimate_memory` for each memory policy, cheapest first, with its recompute FLOPs and bytes moved.

    ``device_type`` is the device the run will use: offload policies are marked skipped on ``"cpu"``
    (and still estimated, as for an accelerator, unless ``estimate_skipped=False``). Other keyword
    arguments go to :func:`estimate_memory`. ``stop_at_budget``: stop after the first applicable policy whose
    peak fits these bytes (the later ones could not be chosen; each estimate is one trace per rank).
    """
    from picotron_lightning.options import Picotron3DOptions

    base = options if options is not None else Picotron3DOptions()
    dp_mode = base.data_parallel.mode if layout.dp > 1 else "none"
    results: list[PolicyEstimate] = []
    baseline_flops: dict[int, int] = {}
    for policy in policies:
        skipped = skip_reason(policy, device_type, "fsdp" if dp_mode == "auto" else dp_mode)
        if skipped and not estimate_skipped:
            results.append(PolicyEstimate(policy, None, skipped=skipped))
            continue
        try:
            ranks = estimate_memory(build_module, batch, layout, options=base, memory=policy.applied_to(base.memory),
                                    count_flops=True, **kwargs)
        except Exception as error:  # noqa: BLE001 - a policy the layout cannot take is reported, not fatal
            if not skipped:
                raise
            results.append(PolicyEstimate(policy, None, skipped=f"{skipped}; not estimated: {error}"))
            continue
        for r in ranks:
            baseline_flops.setdefault(r.rank, r.flops)  # the first policy, "none", has no recompute
        results.append(PolicyEstimate(
            policy, max(r.peak for r in ranks), skipped=skipped, ranks=tuple(ranks),
            recompute_flops=max(max(0, r.flops - baseline_flops[r.rank]) for r in ranks),
            bytes_moved=max(r.bytes_moved for r in ranks)))
        if stop_at_budget is not None and not skipped and results[-1].peak is not None \
                and results[-1].peak <= stop_at_budget:
            break
    return results


def _fake_trace(
    build_module: Callable[[], nn.Module], batch: torch.Tensor, layout: ParallelLayout, config: Any, rank: int,
    step: StepFn | None, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None, *,
    count_flops: bool = False,
) -> RankEstimate:
    from picotron_lightning.parallel.data import resolve_mode

    if config.data_parallel.mode != "ddp" and config.data_parallel.mode == "auto" and layout.tp == 1:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            probe = build_module()
            mode = resolve_mode("auto", probe, torch.device("cpu"), layout.world_size, tensor_parallel=False)
        config = dataclasses.replace(config, data_parallel=dataclasses.replace(config.data_parallel, mode=mode))
    if config.data_parallel.mode == "ddp" and layout.dp > 1 and layout.ep > 1:
        # One replica without data parallelism would hold every expert; the real trace shares them out.
        raise NotImplementedError("DDP with expert parallelism: the one-replica trace cannot share out the experts")
    if config.data_parallel.mode == "ddp" and layout.dp > 1:
        # DDP's replicas each hold and compute what one process would; its only addition is the
        # gradient buckets (added arithmetically). DDP cannot be built on fake tensors, so trace one replica.
        single = ParallelLayout(1, layout.tp, layout.pp, 1)
        # DDP is refused with pp > 1 by the options; the single replica is traced without data parallelism.
        coords = layout.coordinates(rank)
        inner_rank = single.rank_of(pp=coords.pp, tp=coords.tp)
        with fake_process_group(inner_rank, single.world_size):
            estimate = _trace_in_group(build_module, batch, single, config, inner_rank, step, build_optimizer, True,
                                       count_flops=count_flops)
        grads = estimate.breakdown.params - _buffer_bytes_of(build_module)
        b = estimate.breakdown
        # At the end of DDP's backward every gradient exists and each bucket's all-reduce result (one
        # more gradient-sized copy) is being copied back into them: a peak one replica never has.
        end_of_backward = PeakBreakdown(params=b.params, grads=grads, optimizer=b.optimizer, activations=0,
                                        temporaries=grads)
        breakdown = end_of_backward if end_of_backward.total > b.total else b
        return dataclasses.replace(estimate, rank=rank, coordinates=_coordinates(layout, rank), comm_buffers=grads,
                                   breakdown=breakdown)
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
    count_flops: bool = False,
) -> RankEstimate:
    """Build, parallelize and run two steps as ``rank`` of the process group that exists; measure the second
    (the third under real DDP, after its buckets are rebuilt).

    With ``count_flops`` a third step runs under :class:`FlopCount`: the measured step is the same with or
    without it.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from picotron_lightning.memory.flops import FlopCount
    from picotron_lightning.memory.tracker import LiveBytes
    from picotron_lightning.parallel.parallelize import parallelize

    device = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `self.log` outside a Trainer, fake-group notices
        mesh = layout.build_device_mesh(device.type)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            module = build_module()
            local_batch = fake_mode.from_tensor(batch) if fake_mode is not None else batch.clone()
            parallel = parallelize(module, mesh, layout, config, device, local_processes=layout.world_size)
            optimizer = _optimizer(module, build_optimizer)
            run = _step_runner(parallel, module, optimizer, step)
            run(local_batch)  # first step: creates the optimizer state
            if parallel.data_parallel_mode == "ddp":
                # Real DDP (the real trace) rebuilds its buckets in the second step's forward, in the order the
                # first backward produced gradients: measure the third step, which every later step resembles.
                run(local_batch)
            tracker = LiveBytes(offload_saved=config.memory.activation_offload)
            # As in Lightning, the previous step's gradients live until zero_grad (after the forward).
            tracker.register([*module.parameters(), *module.buffers(), local_batch])
            tracker.register(p.grad for p in module.parameters() if p.grad is not None)
            tracker.register(v for state in optimizer.state.values() for v in state.values())
            tracker.reset_peak()
            with tracker:
                run(local_batch)
            breakdown = tracker.breakdown(module, [optimizer])
            sizes = tracker.peak_sizes()
            state = _offloaded_state(module, breakdown) if config.memory.cpu_offload else 0
            flops = FlopCount()
            if count_flops:  # after the measurement, so nothing of it is in the peak
                with flops:
                    run(local_batch)
        buckets = 0
        if parallel.data_parallel_mode == "ddp":
            buckets = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    moved = 2 * tracker.offloaded_bytes
    if state:
        # Per step: the shards go to the device for each all-gather (forward, and backward when
        # resharded after forward), the reduced gradient shards come back.
        gathers = 2 if config.data_parallel.reshard_after_forward else 1
        moved += gathers * breakdown.params + breakdown.grads
    return RankEstimate(rank=rank, coordinates=_coordinates(layout, rank), breakdown=breakdown,
                        comm_buffers=buckets, method="fake" if fake else "real", flops=flops.total,
                        offloaded_activations=tracker.offloaded_bytes, offloaded_state=state, bytes_moved=moved,
                        cuda=cuda_memory(sizes, expandable_segments=config.memory.expandable_segments))


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
                 step: StepFn | None) -> Callable[[Any], None]:
    """One training step in the order of Lightning's automatic optimization."""
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
        optimizer.zero_grad(set_to_none=True)
        if pipeline is not None:
            pipeline.finish_backward()
        else:
            loss.backward()
        optimizer.step()

    return run


# ---------------------------------------------------------------------- command line
def format_table(estimates: Sequence[RankEstimate], title: str = "") -> str:
    """One row per rank, MiB per kind; readable in a terminal."""
    columns = ("params", "grads", "optimizer", "activations", "temporaries")
    header = f"{'rank':>4} {'pp':>2} {'dp':>2} {'tp':>2} " + " ".join(f"{c:>11}" for c in columns)
    header += f" {'comm bufs':>11} {'offloaded':>11} {'peak':>11} {'CUDA active':>11} {'CUDA rsrvd':>11}  trace"
    lines = [title, header] if title else [header]
    for e in estimates:
        b = e.breakdown.as_dict()
        c = e.coordinates
        row = f"{e.rank:>4} {c['pp']:>2} {c['dp']:>2} {c['tp']:>2} " + " ".join(f"{_mib(b[k]):>11}" for k in columns)
        active, reserved = (e.cuda.active, e.cuda.reserved) if e.cuda is not None else (0, 0)
        lines.append(row + f" {_mib(e.comm_buffers):>11} {_mib(e.offloaded_state):>11} {_mib(e.peak):>11}"
                     f" {_mib(active + e.comm_buffers):>11} {_mib(reserved + e.comm_buffers):>11}  {e.method}")
    lines.append("(MiB; peak = live tensor bytes at the step's peak + communication buffers - state offloaded to the "
                 "host; CUDA: the caching allocator's rounded blocks and the segments holding them, a lower bound)")
    return "\n".join(lines)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m picotron_lightning.memory.estimate --preset small --world-size 4 --tp 2 --micro-batch 8``."""
    import functools

    from picotron_lightning.models import CausalLMModule
    from picotron_lightning.options import Picotron3DOptions
    from picotron_lightning.parallel.data import DataParallelOptions

    parser = argparse.ArgumentParser(prog="python -m picotron_lightning.memory.estimate",
                                     description="Per-rank peak memory of one training step of the reference Llama.")
    parser.add_argument("--preset", default="tiny", help="reference model preset (picotron_lightning.models.PRESETS)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size")
    parser.add_argument("--dp-mode", default="fsdp", choices=("fsdp", "ddp", "hsdp", "auto"))
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per rank and step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--checkpointing", default="none", help="none, selective, full, or a comma-separated list")
    parser.add_argument("--all-ranks", action="store_true", help="every rank, not one per (stage, tp rank)")
    parser.add_argument("--real", action="store_true", help="trace on real tensors in local gloo processes "
                        "where fake tensors cannot follow the layout")
    parser.add_argument("--policies", action="store_true", help="estimate every memory policy (checkpointing, "
                        "offload) and show recompute FLOPs and bytes moved")
    parser.add_argument("--budget", type=float, default=None, help="with --policies: per-rank budget in MiB; "
                        "shows the policy memory_budget would choose")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="the device the run will use "
                        "(offload policies are skipped on cpu)")
    args = parser.parse_args(argv)
    overrides = {"num_layers": args.layers} if args.layers else None
    build = functools.partial(CausalLMModule, preset=args.preset, config=overrides, seed=0)
    layout = ParallelLayout("auto", args.tp, args.pp, 1).resolve(args.world_size)
    batch = torch.zeros(args.micro_batch, args.seq_len + 1, dtype=torch.long)
    options = Picotron3DOptions(data_parallel=DataParallelOptions(mode=args.dp_mode))
    if args.policies:
        return _print_policies(build, batch, layout, options, args)
    for mode in args.checkpointing.split(","):
        estimates = estimate_memory(build, batch, layout, options=options, checkpointing=mode,
                                    ranks=range(layout.world_size) if args.all_ranks else None,
                                    allow_real_trace=args.real)
        print(format_table(estimates, f"{args.preset}, {layout.describe()}, {args.dp_mode}, checkpointing={mode}, "
                                      f"micro-batch {args.micro_batch} x {args.seq_len} tokens"))
        print()
    return 0


def _print_policies(build: Callable[[], nn.Module], batch: torch.Tensor, layout: ParallelLayout,
                    options: Picotron3DOptions, args: argparse.Namespace) -> int:
    from picotron_lightning.memory.policy import MemoryBudgetError, choose_policy, format_policy_table

    results = estimate_policies(build, batch, layout, options=options, device_type=args.device,
                                allow_real_trace=args.real)
    budget = None if args.budget is None else int(args.budget * 2**20)
    print(f"{args.preset}, {layout.describe()}, {args.dp_mode}, micro-batch {args.micro_batch} x {args.seq_len} "
          f"tokens, device {args.device}: every memory policy, cheapest first")
    print(format_policy_table(results, budget))
    if budget is not None:
        try:
            print(choose_policy(results, budget)[1])
        except MemoryBudgetError as error:
            print(f"no policy fits: {str(error).splitlines()[0]}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
