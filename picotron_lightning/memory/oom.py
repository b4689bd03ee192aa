"""OOM recovery agreed across ranks: the decisions, the batch split, and the checks that keep it sound.

A ``torch.OutOfMemoryError`` in forward or backward on any rank makes every rank redo the step's
global batch in twice as many micro-batches (gradients accumulated inside the step). The
Lightning side (running the attempts inside the optimizer step) is
:mod:`picotron_lightning.strategies.oom_step`; this module holds what does not depend on Lightning:

* :class:`SplitSchedule`: how many micro-batches the next step uses (doubles on an agreed OOM,
  halves after ``retry_larger_after`` clean steps, gives up at one sample per micro-batch);
* :func:`split_batch`: the batch cut along dim 0, with each piece's weight (its share of samples);
* :func:`covered_attempt` / :func:`inside_attempt`: marks the part of a step that recovery covers (an
  attempt: forward and backward of every piece), which the test tooling injects OOMs into;
* :class:`CollectiveGuard`: refuses a collective inside the part of a step that may fail, which is
  what makes the agreement sound (see docs/memory.md, "OOM recovery");
* :func:`check_recovery_layout` (with :class:`ExpertLayerFacts`): the layouts where that holds, and the message
  where it does not;
* :func:`exhausted_message`, :func:`snapshot_path`, :func:`memory_history_kwargs`: the stop message
  and the CUDA memory-history dump.

Every input to a decision here is the same on every rank (agreed outcomes, not local ones), so every
rank keeps the same schedule without communicating.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten


class OOMRecoveryExhausted(RuntimeError):
    """Raised on every rank when a step fails with one sample per micro-batch: nothing smaller is left."""


class SplitSchedule:
    """Micro-batches per step: 1 until an agreed OOM, doubled on each, tried smaller again after clean steps.

    Args:
        retry_larger_after: after this many clean steps at a split above 1, the next step uses half
            as many micro-batches (larger ones). 0 keeps a split for the rest of the run.
    """

    def __init__(self, retry_larger_after: int = 50) -> None:
        self.retry_larger_after = retry_larger_after
        self.split = 1
        self.clean_steps = 0

    def on_oom(self, batch_size: int) -> int | None:
        """An OOM was agreed for a step of ``batch_size`` samples: the split to retry with, or None if exhausted."""
        self.clean_steps = 0
        if self.split >= batch_size:
            return None
        self.split = min(2 * self.split, batch_size)
        return self.split

    def on_success(self) -> None:
        """A step finished on every rank at the current split."""
        if self.split == 1:
            return
        self.clean_steps += 1
        if self.retry_larger_after and self.clean_steps >= self.retry_larger_after:
            self.split = max(1, self.split // 2)
            self.clean_steps = 0

    def state_dict(self) -> dict[str, int]:
        return {"split": self.split, "clean_steps": self.clean_steps}


def batch_size_of(batch: Any) -> int:
    """Samples in ``batch``: the size of dim 0, the same for every tensor in it (raises otherwise)."""
    sizes = {t.size(0) for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(
            "`memory.oom_recovery` splits the batch along dim 0, so every tensor in it needs the same dim 0; "
            f"found sizes {sorted(sizes) or 'none (no tensor)'}. Turn oom_recovery off for this data."
        )
    return sizes.pop()


def split_batch(batch: Any, pieces: int) -> list[tuple[Any, float]]:
    """``batch`` cut into ``pieces`` consecutive parts along dim 0, each with its share of the samples.

    The shares weight each part's (mean) loss, so the accumulated gradient equals the whole batch's
    when the loss is a mean over samples (DESIGN.md's loss semantics). Parts differ by at most one sample.
    """
    total = batch_size_of(batch)
    if not 1 <= pieces <= total:
        raise ValueError(f"cannot split a batch of {total} samples into {pieces} micro-batches")
    leaves, spec = tree_flatten(batch)
    cut = [t.tensor_split(pieces) if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in leaves]
    parts = []
    for i in range(pieces):
        part = [c[i] if c is not None else leaf for c, leaf in zip(cut, leaves, strict=True)]
        size = next(c[i].size(0) for c in cut if c is not None)
        parts.append((tree_unflatten(part, spec), size / total))
    return parts


_attempts_running = 0  # attempts of a recovered step running on this process (0 or 1; a counter for nesting)


@contextmanager
def covered_attempt() -> Iterator[None]:
    """Marks one attempt of a recovered step: its forward and backward, every piece of it. An out-of-memory error
    raised here is recovered from; the agreement and the reductions after it are not inside (see docs/memory.md)."""
    global _attempts_running
    _attempts_running += 1
    try:
        yield
    finally:
        _attempts_running -= 1


def inside_attempt() -> bool:
    """Whether an attempt of a recovered step runs now (:func:`covered_attempt`)."""
    return _attempts_running > 0


class CollectiveGuard(TorchDispatchMode):
    """Raise before any collective runs: the part of a step that may fail must not communicate.

    A rank that fails there would leave its peers waiting in a collective it never joins. The
    strategy enters this guard for the first protected step; every rank runs the same code, so every
    rank stops at the same collective with the same message instead of hanging.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        if name.startswith(("c10d.", "_c10d_functional.", "c10d_functional.")):
            raise RuntimeError(
                f"`memory.oom_recovery=True` needs a training step whose forward and backward do not communicate, "
                f"but `{name}` ran inside it. A rank that ran out of memory before this collective would leave the "
                "others waiting in it. Move the collective out of training_step (e.g. log with sync_dist in "
                "on_train_batch_end), or turn oom_recovery off."
            )
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class ExpertLayerFacts:
    """What OOM recovery needs to know of one mixture-of-experts layer (the strategy reads it off the model).

    Attributes:
        name: the layer's qualified name, for the message.
        records_exchange: whether the layer records its token exchange for a replay
            (:class:`picotron_lightning.moe.MoELayer` does; Hugging Face experts converted for ep do not).
        aux_loss_coeff: the auxiliary load-balancing loss weight.
        capacity_factor: None for dropless routing.
    """

    name: str
    records_exchange: bool
    aux_loss_coeff: float = 0.0
    capacity_factor: float | None = None


def check_recovery_layout(
    *, pp: int, experts: Sequence[ExpertLayerFacts] = (), automatic_optimization: bool = True, tp: int = 1,
    dp: int = 1, ep: int = 1, pipeline_split: str = "structural", pipeline_schedule: str = "1f1b",
    activation_checkpointing: str = "none",
) -> None:
    """Refuse ``oom_recovery`` where a failed rank cannot account for the collectives of its step, or where
    redoing the step in smaller micro-batches would not give the same update.

    Covered: DDP (gradient sync deferred to the agreement point), FSDP2/HSDP and tensor parallelism
    (a failed rank replays the rest of the step's collectives, :mod:`.replay`), dropless MoE layers
    without an auxiliary loss, with or without expert parallelism (their token exchange is replayed by
    protocol), and pipeline parallelism whose stages communicate only with their neighbours (a failed
    stage finishes its schedule hollow, :mod:`picotron_lightning.parallel.pipeline_parallel.recovery`):
    pp alone, with data-parallel replicas (DDP-style under ``pipeline_split="trace"``, or FSDP2/HSDP under either
    split: the stage's units are gathered before the schedule and a hollow stage reduce-scatters zeros,
    :mod:`picotron_lightning.parallel.pipeline_parallel.sharded_recovery`), with tensor parallelism (a hollow stage
    replays its tp collectives, per forward, loss, backward or zero-bubble backward half), and with MoE layers at
    ``ep = 1`` (at ``dp > 1`` their routing statistics' all-reduce has a fixed shape, so a hollow stage replays it
    like a tp collective) and at ``ep > 1`` under the structural split (a hollow stage replays each chunk's token
    exchange by protocol, its backward, or a zero-bubble backward's input half, with the sizes its forward learned:
    :mod:`picotron_lightning.parallel.pipeline_parallel.exchange_replay`). Not covered: ep > 1 with the traced split,
    or with a zero-bubble schedule and activation checkpointing; MoE with an auxiliary loss or a capacity (a split
    step changes the update).
    Raised before the first training step, on every rank alike.
    """
    reasons = []
    split_backward = pipeline_schedule in ("zero_bubble", "zbv")
    exchanging = pp > 1 and bool(experts) and ep > 1
    if exchanging and pipeline_split != "structural":
        reasons.append(
            f"pipeline_parallel_size={pp} with {len(experts)} MoE layer(s) at expert_parallel_size={ep} under "
            f"pipeline_split={pipeline_split!r} (a stage that ran out of memory replays each chunk's token exchange "
            "by protocol, which the MoE layers of the structural split record; use pipeline_split='structural')")
    elif exchanging and split_backward and activation_checkpointing != "none":
        reasons.append(
            f"pipeline_parallel_size={pp} with {len(experts)} MoE layer(s) at expert_parallel_size={ep} under "
            f"pipeline_schedule={pipeline_schedule!r} with activation_checkpointing={activation_checkpointing!r} (the "
            "recomputed blocks' token exchanges of a zero-bubble backward are not replayed by a stage that ran out of "
            "memory; use activation_checkpointing='none', or pipeline_schedule='1f1b', 'gpipe' or 'interleaved_1f1b')")
    for layer in experts:
        if not layer.records_exchange:
            reasons.append(f"MoE layer '{layer.name}' exchanges tokens without recording the exchange for a replay "
                           "(use picotron_lightning.moe.MoELayer, or expert_parallel_size=1)")
        if layer.aux_loss_coeff:
            reasons.append(f"MoE layer '{layer.name}' has aux_loss_coeff={layer.aux_loss_coeff} (a product of batch "
                           "means: a step split into micro-batches changes it; use 0, e.g. with bias balancing, "
                           "bias_update_rate > 0, which a split does not change)")
        if layer.capacity_factor is not None:
            reasons.append(f"MoE layer '{layer.name}' has capacity_factor={layer.capacity_factor} (which assignments "
                           "are dropped depends on the tokens of one forward; use None, dropless)")
    if reasons:
        shown = reasons[:4] + ([f"and {len(reasons) - 4} more"] if len(reasons) > 4 else [])
        raise ValueError(
            "`memory.oom_recovery=True` needs steps whose collectives a rank that runs out of memory can issue "
            "without the values, and that give the same update when redone in smaller micro-batches; this run "
            "has " + "; ".join(shown) + ". Change those, or turn oom_recovery off."
        )
    if not automatic_optimization:
        raise ValueError(
            "`memory.oom_recovery=True` works with Lightning's automatic optimization (the strategy redoes the "
            "closure); this module sets `automatic_optimization = False`. Turn oom_recovery off."
        )


def exhausted_message(
    *, step: int, batch_size: int, ranks: Sequence[int], error: str, activation_checkpointing: str,
    device: torch.device, peak_bytes: int | None = None, pieces: int | None = None,
) -> str:
    """What every rank says when a step fails at its finest split: ``pieces`` micro-batches (default: one sample
    each; a pipeline schedule may need several samples per piece)."""
    where = f"rank(s) {list(ranks)}"
    pieces = batch_size if pieces is None else pieces
    finest = "one sample per micro-batch" if pieces == batch_size else \
        f"{batch_size // pieces} samples per micro-batch, the fewest the pipeline schedule runs"
    lines = [
        f"Out of memory at step {step} on {where} even with {finest} (the batch of {batch_size} "
        f"samples was split into {pieces} micro-batches); no smaller split is left. Last error: {error}",
    ]
    if peak_bytes is not None:
        lines.append(f"Live tensor bytes at the failure on this rank: {peak_bytes / 2**20:.1f} MiB.")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        lines.append(f"Device {device}: {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB.")
    turn_on = []
    if activation_checkpointing != "full":
        turn_on.append("memory.activation_checkpointing='full'" if activation_checkpointing == "selective"
                       else "memory.activation_checkpointing='selective' (or 'full')")
    turn_on += ["data_parallel_mode='fsdp' (shards parameters, gradients and optimizer state, OOM recovery included)",
                "a memory budget (memory.memory_budget, where available), a shorter sequence or a smaller model"]
    lines.append("Estimate each rank's peak before launch with `python -m picotron_lightning.memory.estimate "
                 "--world-size N --micro-batch 1 --seq-len L --checkpointing none,selective,full` (or "
                 "`picotron_lightning.memory.estimate.estimate_memory`), and turn on: " + "; ".join(turn_on) + ".")
    return "\n".join(lines)


def memory_history_kwargs(device: torch.device, max_entries: int) -> dict[str, Any] | None:
    """Arguments for ``torch.cuda.memory._record_memory_history``, or None where no history is kept (CPU, 0)."""
    if device.type != "cuda" or max_entries <= 0:
        return None
    return {"enabled": "all", "max_entries": max_entries, "context": "all", "stacks": "python"}


def snapshot_path(directory: str | Path, rank: int, step: int, attempt: int) -> Path:
    """Where rank ``rank`` writes its CUDA memory snapshot for an OOM in ``step`` (retry ``attempt``)."""
    return Path(directory) / "oom_snapshots" / f"rank{rank}_step{step}_attempt{attempt}.pickle"


def dump_memory_snapshot(directory: str | Path, rank: int, step: int, attempt: int) -> Path | None:
    """Dump the CUDA memory-history ring buffer (viewable at pytorch.org/memory_viz); None off CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    path = snapshot_path(directory, rank, step, attempt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
    return path
