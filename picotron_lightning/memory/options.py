"""``MemoryOptions``: everything the strategy's ``memory=`` argument controls, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from picotron_lightning.memory.checkpointing import CHECKPOINTING_MODES


@dataclass(frozen=True, kw_only=True)
class MemoryOptions:
    """Memory management of a picotron3d run (``Picotron3DStrategy(memory=MemoryOptions(...))`` or a dict)."""

    activation_checkpointing: str = "none"
    """``"none"``, ``"selective"`` (keep matmul outputs, recompute the rest of each block) or ``"full"``
    (recompute each whole block in backward). Also the strategy's flat argument, where ``True`` means
    ``"full"`` and ``False`` ``"none"``."""

    checkpoint_every: int = field(default=1, metadata={"flat": None})
    """Checkpoint every n-th block only (with ``activation_checkpointing`` selective or full); 1 = all blocks."""

    gc_every_n_steps: int | None = field(default=50, metadata={"flat": None})
    """Python's automatic garbage collection is turned off during training and one collection runs every
    this many steps, at the same step on every rank (so no rank stalls a collective while the others wait).
    ``None`` leaves the garbage collector alone."""

    gc_freeze_after_setup: bool = field(default=True, metadata={"flat": None})
    """``gc.freeze()`` once the model and optimizer exist, so collections never scan them again."""

    expandable_segments: bool = field(default=True, metadata={"flat": None})
    """On CUDA, set ``expandable_segments:True`` in ``PYTORCH_CUDA_ALLOC_CONF`` (effective only if set before
    CUDA initialises; a warning says when it is too late). Ignored on CPU."""

    fragmentation_threshold: float = field(default=0.5, metadata={"flat": None})
    """On CUDA, ``empty_cache`` runs at a step boundary on every rank when (reserved - allocated) / reserved
    exceeds this fraction on any rank and at least ``fragmentation_min_bytes`` are idle. 1.0 turns it off."""

    fragmentation_min_bytes: int = field(default=1 << 30, metadata={"flat": None})
    """Idle reserved bytes below which fragmentation is not worth an ``empty_cache``."""

    fragmentation_check_every_n_steps: int = field(default=100, metadata={"flat": None})
    """How often (in steps) the ranks compare fragmentation; one tiny all-reduce each time."""

    activation_offload: bool = field(default=False, metadata={"flat": None})
    """Keep the tensors autograd saves for backward in host memory (``torch.autograd.graph.save_on_cpu``, pinned on
    CUDA): no recompute, but every saved tensor crosses to the host and back once per step. On a CPU device the
    host is the device, so it saves nothing there (the hooks still run)."""

    cpu_offload: bool = field(default=False, metadata={"flat": None})
    """FSDP2 ``CPUOffloadPolicy``: sharded parameters, gradients and optimizer state live in host memory and the
    optimizer steps on the CPU. Needs ``data_parallel_mode`` ``"fsdp"`` or ``"hsdp"``."""

    memory_budget: int | float | None = None
    """Per-rank device memory the step may use: bytes (an int), or a fraction in (0, 1] of ``device_memory``.
    The strategy then estimates each policy of :data:`picotron_lightning.memory.policy.POLICIES` before the
    process group exists and applies the first (cheapest) whose estimated peak fits; the choice and the reason
    are logged on rank 0. Replaces ``activation_checkpointing``, ``checkpoint_every``, ``activation_offload``
    and ``cpu_offload`` (pass those or a budget, not both). Trainer only."""

    device_memory: int | None = field(default=None, metadata={"flat": None})
    """Bytes a fractional ``memory_budget`` is a fraction of. Default: the CUDA device's total memory. A CPU run
    has no device memory of its own (the ranks share the host), so there a fraction needs this stated."""

    moe_routing: str = field(default="worst_case", metadata={"flat": None})
    """The MoE routing the memory estimate (and so ``memory_budget``) charges where a layer's memory depends on
    it (expert parallelism, or a ``capacity_factor``): ``"worst_case"`` traces every token routed to one
    expert-parallel rank's experts, once per rank, an upper bound on any batch's routing (capped by the
    capacity where set); ``"measured"`` the routing of the one batch traced, which a later batch can exceed.
    See docs/memory.md ("Why can an MoE budget with expert parallelism be exceeded?")."""

    oom_recovery: bool = field(default=False, metadata={"flat": None})
    """Recover from ``torch.OutOfMemoryError`` in forward or backward on any rank (Trainer; DDP, FSDP2, tensor,
    expert and pipeline parallelism): every rank agrees at one fixed point of the step, frees what the step held
    and redoes the same global batch in twice as many micro-batches (accumulated inside the step), so the update
    is the one without the OOM; under ``accumulate_grad_batches > 1`` each batch of a step alike, the earlier
    batches' gradients kept aside while a later one is attempted. Stops on every rank, with the estimate command
    and what to turn on, at the finest split (one sample per micro-batch, or the fewest a pipeline schedule
    runs). See docs/memory.md ("OOM recovery") for the layouts it covers, those it refuses, and why."""

    oom_retry_larger_after: int = field(default=50, metadata={"flat": None})
    """With ``oom_recovery``: clean steps (batches, under gradient accumulation) after which a split step tries
    half as many (larger) micro-batches again. 0 keeps a split for the rest of the run."""

    oom_memory_history: int = field(default=100_000, metadata={"flat": None})
    """With ``oom_recovery`` on CUDA: entries of the allocator's memory-history ring buffer
    (``torch.cuda.memory._record_memory_history``), dumped to ``<log_dir>/oom_snapshots/`` on every OOM.
    0 records nothing. Ignored on CPU."""

    def __post_init__(self) -> None:
        if isinstance(self.activation_checkpointing, bool):  # the strategy's flat True/False
            object.__setattr__(self, "activation_checkpointing", "full" if self.activation_checkpointing else "none")
        if self.activation_checkpointing not in CHECKPOINTING_MODES:
            raise ValueError(
                f"`memory.activation_checkpointing={self.activation_checkpointing!r}` is not supported; use one of "
                f"{CHECKPOINTING_MODES}."
            )
        _positive_int("checkpoint_every", self.checkpoint_every)
        if self.gc_every_n_steps is not None:
            _positive_int("gc_every_n_steps", self.gc_every_n_steps, extra=" or None (leave gc alone)")
        for name in ("gc_freeze_after_setup", "expandable_segments"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`memory.{name}` must be True or False, got {getattr(self, name)!r}.")
        threshold = self.fragmentation_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise ValueError(
                f"`memory.fragmentation_threshold={threshold!r}` must be a fraction in (0, 1]; 1.0 turns it off."
            )
        _positive_int("fragmentation_min_bytes", self.fragmentation_min_bytes, minimum=0)
        _positive_int("fragmentation_check_every_n_steps", self.fragmentation_check_every_n_steps)
        if not isinstance(self.oom_recovery, bool):
            raise ValueError(f"`memory.oom_recovery` must be True or False, got {self.oom_recovery!r}.")
        _positive_int("oom_retry_larger_after", self.oom_retry_larger_after, minimum=0, extra=" (0: keep the split)")
        _positive_int("oom_memory_history", self.oom_memory_history, minimum=0, extra=" (0: no history)")
        for name in ("activation_offload", "cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`memory.{name}` must be True or False, got {getattr(self, name)!r}.")
        from picotron_lightning.memory.routing import ROUTING_ASSUMPTIONS

        if self.moe_routing not in ROUTING_ASSUMPTIONS:
            raise ValueError(f"`memory.moe_routing={self.moe_routing!r}` is not supported; use one of "
                             f"{ROUTING_ASSUMPTIONS} (worst_case: a bound over batches; measured: the traced batch).")
        self._check_budget()

    def _check_budget(self) -> None:
        budget = self.memory_budget
        if budget is None:
            return
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"`memory_budget={budget!r}` must be bytes (an int) or a fraction in (0, 1] (a float).")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(f"`memory_budget={budget!r}`: a float is a fraction of the device's memory, in (0, 1]; "
                             "pass bytes as an int.")
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"`memory_budget={budget!r}` must be a positive number of bytes.")
        if self.device_memory is not None:
            _positive_int("device_memory", self.device_memory)
        chosen = {name: getattr(self, name) for name in ("activation_checkpointing", "checkpoint_every",
                                                          "activation_offload", "cpu_offload")}
        defaults = {"activation_checkpointing": "none", "checkpoint_every": 1, "activation_offload": False,
                    "cpu_offload": False}
        set_by_user = {k: v for k, v in chosen.items() if v != defaults[k]}
        if set_by_user:
            raise ValueError(f"`memory_budget={budget!r}` chooses the memory policy itself, but {set_by_user} "
                             "were also given; pass either a budget or the policy fields.")

    @classmethod
    def from_arg(cls, value: MemoryOptions | dict[str, Any] | None) -> MemoryOptions:
        """The strategy's ``memory=`` argument as options: an instance, a dict of fields, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"`memory` has unknown keys {unknown}; known keys: {sorted(known)}.")
            return cls(**value)
        raise ValueError(f"`memory` must be a MemoryOptions, a dict of its fields or None, got {type(value).__name__}.")


def _positive_int(name: str, value: Any, minimum: int = 1, extra: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`memory.{name}={value!r}` must be an integer >= {minimum}{extra}.")
