"""What the monitors need to know about a run, whether a Trainer or a Fabric script drives it.

The callbacks never talk to the Trainer directly except through :class:`RunContext`, so the same
code serves ``Trainer(callbacks=[...])`` and the explicit Fabric calls. The helpers here also hold
the few collectives the monitors issue; every rank must call them on the same steps.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class RunContext:
    """Rank, sizes, device, loggers and optimizers of the run being monitored."""

    global_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "32-true"
    strategy: Any = None
    loggers: list[Any] = field(default_factory=list)
    log_dir: str | None = None
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    trainer: Any = None
    fabric: Any = None

    @classmethod
    def from_trainer(cls, trainer: Any) -> RunContext:
        """Read everything off a ``lightning.Trainer``."""
        log_dir = None
        try:
            log_dir = trainer.log_dir
        except Exception:  # noqa: BLE001 - some loggers raise when asked before setup
            log_dir = None
        return cls(
            global_rank=trainer.global_rank,
            world_size=trainer.world_size,
            device=trainer.strategy.root_device,
            precision=str(trainer.precision),
            strategy=trainer.strategy,
            loggers=list(trainer.loggers),
            log_dir=log_dir or trainer.default_root_dir,
            optimizers=list(trainer.optimizers),
            trainer=trainer,
        )

    @classmethod
    def from_fabric(cls, fabric: Any, optimizers: Iterable[torch.optim.Optimizer] = ()) -> RunContext:
        """Read everything off a ``lightning.Fabric``; pass the optimizers to log their learning rate."""
        logger = fabric.logger if fabric.loggers else None
        log_dir = getattr(logger, "log_dir", None) or getattr(logger, "root_dir", None) or os.getcwd()
        plugin = getattr(fabric.strategy, "precision", None)
        return cls(
            global_rank=fabric.global_rank,
            world_size=fabric.world_size,
            device=fabric.device,
            precision=str(getattr(plugin, "precision", "32-true")),
            strategy=fabric.strategy,
            loggers=list(fabric.loggers),
            log_dir=log_dir,
            optimizers=list(optimizers),
            fabric=fabric,
        )

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def layout(self) -> Any:
        """The strategy's ``ParallelLayout`` (picotron3d), or ``None`` for other strategies."""
        return getattr(self.strategy, "layout", None)

    @property
    def data_parallel_size(self) -> int:
        """Replicas that see different samples: tokens/s over the run is this many times one replica's."""
        layout = self.layout
        if layout is not None and getattr(layout, "is_resolved", False):
            return int(layout.dp)
        try:
            kwargs = self.strategy.distributed_sampler_kwargs or {}
            return int(kwargs.get("num_replicas", self.world_size))
        except Exception:  # noqa: BLE001 - single-device strategies have no sampler kwargs
            return self.world_size

    @property
    def ranks_per_stage(self) -> int:
        layout = self.layout
        if layout is not None and getattr(layout, "is_resolved", False):
            return self.world_size // int(layout.pp)
        return self.world_size

    def learning_rates(self) -> dict[str, float]:
        """Current learning rate per optimizer and param group (``lr`` when there is only one)."""
        rates = {}
        for i, opt in enumerate(self.optimizers):
            inner = getattr(opt, "optimizer", opt)  # LightningOptimizer / _FabricOptimizer wrap the real one
            single = len(self.optimizers) == 1 and len(inner.param_groups) == 1
            for j, group in enumerate(inner.param_groups):
                rates["lr" if single else f"lr/opt{i}_group{j}"] = float(group["lr"])
        return rates

    def should_stop(self) -> None:
        """Ask the run to stop after this step (every rank calls it with the same decision)."""
        if self.trainer is not None:
            self.trainer.should_stop = True

    # --------------------------------------------------------------------------- collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce over all ranks of a small tensor on the collective device."""
        if _distributed() and dist.get_world_size() > 1:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(tensor, op=ops[op])
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack ``tensor`` from every rank into shape (world, *tensor.shape)."""
        if not (_distributed() and dist.get_world_size() > 1):
            return tensor.unsqueeze(0)
        world = dist.get_world_size()
        flat = torch.empty(world * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        # torch 2.13 renamed all_gather_into_tensor; gloo wants a flat output either way.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(flat, tensor.contiguous().reshape(-1))
        return flat.view(world, *tensor.shape)

    def collective_tensor(self, values: list[float]) -> torch.Tensor:
        """A float64 tensor on the device the process group can reduce (CUDA for NCCL)."""
        device = self.device
        if _distributed() and dist.get_backend() == "gloo":
            device = torch.device("cpu")
        return torch.tensor(values, dtype=torch.float64, device=device)

    def save_checkpoint(self, path: str) -> None:
        """Save a checkpoint on every rank (strategies with sharded state need all of them)."""
        if self.trainer is not None:
            self.trainer.save_checkpoint(path)


# ----------------------------------------------------------------------------------------- norms
class _AsGrad:
    """Presents a parameter's data as a ``.grad`` so `global_grad_norm` measures the weights."""

    __slots__ = ("grad", "_picotron_distinct_pieces")

    def __init__(self, p: torch.Tensor) -> None:
        from picotron_lightning.parallel.grad_norm import DISTINCT_PIECES_ATTR

        self.grad = p.detach()
        self._picotron_distinct_pieces = getattr(p, DISTINCT_PIECES_ATTR, 1)


def grad_norm(ctx: RunContext, module: nn.Module) -> torch.Tensor:
    """Global gradient L2 norm, identical on every rank: one all-reduce.

    Uses the strategy's own ``global_grad_norm()`` where it has one (picotron3d knows its groups);
    otherwise the package's layout-aware norm, which handles DTensor shards and replicas.
    """
    own = getattr(ctx.strategy, "global_grad_norm", None)
    if callable(own):
        return torch.as_tensor(own()).detach().float()
    from picotron_lightning.parallel.grad_norm import global_grad_norm

    return global_grad_norm(module.parameters(), 2.0, ranks_per_stage=ctx.ranks_per_stage)


def param_norm(ctx: RunContext, module: nn.Module) -> torch.Tensor:
    """Global parameter L2 norm with the same shard/replica accounting as the gradient norm."""
    from picotron_lightning.parallel.grad_norm import global_grad_norm

    return global_grad_norm([_AsGrad(p) for p in module.parameters()], 2.0,  # type: ignore[misc]
                            ranks_per_stage=ctx.ranks_per_stage)


def local_grads_finite(module: nn.Module) -> bool:
    """Whether every gradient this rank holds is finite (one fused pass over the gradients)."""
    grads = []
    for p in module.parameters():
        g = p.grad
        if g is None:
            continue
        local = g.to_local() if hasattr(g, "to_local") else g
        if local.numel():
            grads.append(local.detach())
    if not grads:
        return True
    # A sum is NaN/Inf exactly when an element is (barring overflow of a finite sum), and it is
    # much cheaper on CPUs than an inf-norm; accumulate in fp32 so fp16 sums do not overflow.
    sums = torch.stack([torch.sum(g, dtype=torch.float32) for g in grads])
    return bool(torch.isfinite(sums).all())


# ---------------------------------------------------------------------------------------- memory
def host_rss_bytes() -> int:
    """Resident set size of this process (current where /proc exists, else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def memory_stats(device: torch.device) -> dict[str, float]:
    """Accelerator memory (allocated, reserved, peak, fragmentation) in GiB plus host RSS.

    Fragmentation here is reserved minus allocated: memory the caching allocator holds but no
    tensor uses, the part that an out-of-memory error with "reserved but unallocated" refers to.
    """
    gib = 1024**3
    stats = {"host_rss_gb": host_rss_bytes() / gib}
    if device.type == "cuda" and torch.cuda.is_available():
        allocated = torch.cuda.memory_allocated(device)
        reserved = torch.cuda.memory_reserved(device)
        stats.update(
            allocated_gb=allocated / gib,
            reserved_gb=reserved / gib,
            peak_allocated_gb=torch.cuda.max_memory_allocated(device) / gib,
            fragmentation_gb=(reserved - allocated) / gib,
        )
    return stats


# ---------------------------------------------------------------------------------- shared state
_LOOSE_STATE: dict[int, dict[str, Any]] = {}


def shared_state(ctx: RunContext) -> dict[str, Any]:
    """A dict shared by all monitors of one run (kept on the Trainer or Fabric object).

    The monitors share one TensorBoard writer and one gradient norm per step through it, so two
    callbacks never issue the same collective twice.
    """
    owner = ctx.trainer if ctx.trainer is not None else ctx.fabric
    if owner is None:
        return _LOOSE_STATE.setdefault(id(ctx), {})
    state = getattr(owner, "_picotron_monitoring", None)
    if state is None:
        state = {}
        owner._picotron_monitoring = state
    return state


def cached_grad_norm(ctx: RunContext, module: nn.Module, step: int) -> torch.Tensor:
    """:func:`grad_norm` computed at most once per optimizer step for all monitors of the run."""
    state = shared_state(ctx)
    cached = state.get("grad_norm")
    if cached is not None and cached[0] == step:
        return cached[1]
    value = grad_norm(ctx, module)
    state["grad_norm"] = (step, value)
    return value
