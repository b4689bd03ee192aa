"""Collective replay: how a rank that ran out of memory mid-step lets its peers finish the step.

Under FSDP2 and tensor parallelism a step's forward and backward communicate (FSDP2's parameter
all-gathers and gradient reduce-scatters; DTensor's all-reduces, all-gathers and reduce-scatters over
the ``tp`` group). A rank that raises ``torch.OutOfMemoryError`` half-way
leaves its peers blocked in the next collective it never joins. This module gives that rank the rest
of the step's collectives, without the memory the step needed:

1. :func:`issued_collectives` before the attempt and at the failure: each process group's sequence
   number (c10d counts every collective a group runs, functional ones included) tells how many
   collectives of each group the rank issued before the error, at no cost during the step.
2. :func:`trace_collectives` runs the same attempt again under ``FakeTensorMode``: no memory, no
   communication (collectives have meta kernels), but every collective is dispatched with the shapes
   the real step would have used, and :class:`RecordCollectives` writes them down in order.
3. :func:`replay_remaining` issues, per group, the traced collectives after the ones already issued,
   with zeros of the traced shapes, waiting on each. The peers' step completes (with values that the
   agreement then throws away) and every rank reaches the agreement point of
   :mod:`picotron_lightning.strategies.oom_step`.

What this relies on, and what the strategy refuses where it does not hold (see
:func:`picotron_lightning.memory.oom.check_recovery_layout`): every rank of a group issues the same
collectives with the same shapes whatever the values (true for FSDP2 and tensor parallelism; not for
pipeline sends, whose schedule is its own).

Collectives whose sizes follow values exchanged in the step (MoE token all-to-alls: split sizes come from
an exchange of counts) cannot be traced that way. The layer that issues them records a
:class:`ProtocolCall` instead while a trace runs (:func:`record_protocol_call`): an object that knows how
to take part in that collective as a rank that sends nothing, learning the sizes from what it receives.
What such a layer exchanged for real during the attempt (needed when the failure came half-way through
one of its protocols) it keeps per attempt, :func:`recorded_attempt` telling attempts apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# Ops in these namespaces communicate, except the ones that only wait for or wrap a result.
_COLLECTIVE_NAMESPACES = ("c10d.", "_c10d_functional.", "_c10d_functional_autograd.", "c10d_functional.")
_NOT_COMMUNICATING = ("wait_tensor", "_wrap_tensor_autograd")
_communicating_ops: set[str] = set()  # the package's own custom ops that run a collective (register_communicating_op)


def register_communicating_op(name: str) -> None:
    """Declare a custom op (``"namespace::op"``) that runs one collective on the process group named by one of its
    string arguments, with a result of its input's shape: a trace records it (its fake kernel communicates nothing)
    and a replay calls it with zeros. Forward ops only: what an op's autograd formula communicates is dispatched
    as c10d ops, recorded as such."""
    _communicating_ops.add(name.replace("::", "."))


def is_collective(func: Any) -> bool:
    """Whether dispatching ``func`` runs a collective on a process group (waits and wrappers do not)."""
    name = str(func)
    if name.rsplit(".", 1)[0] in _communicating_ops:
        return True
    return name.startswith(_COLLECTIVE_NAMESPACES) and not any(part in name for part in _NOT_COMMUNICATING)


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and device of a tensor a collective received: enough to send zeros in its place."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


@dataclass(frozen=True)
class CollectiveCall:
    """One collective of a traced step: the op, its arguments (tensors as :class:`TensorSpec`) and its group."""

    op: Any
    args: tuple
    kwargs: dict
    group: str


def group_name_of(args: tuple, kwargs: dict) -> str:
    """The process group a collective's arguments name: a ProcessGroup object (c10d ops) or its name (functional)."""
    leaves = tree_flatten((args, kwargs))[0]
    for leaf in leaves:
        if isinstance(leaf, dist.ProcessGroup):
            return leaf.group_name
        if isinstance(leaf, torch.ScriptObject):  # how the dispatcher passes a ProcessGroup to c10d ops
            return dist.ProcessGroup.unbox(leaf).group_name
    known = _group_names()
    names = [leaf for leaf in leaves if isinstance(leaf, str) and leaf in known]
    if not names:
        raise RuntimeError(f"cannot tell which process group a collective with arguments {args} runs on")
    return names[-1]


def _group_names() -> set[str]:
    from torch.distributed.distributed_c10d import _world

    return set(_world.pg_names.values())


class ProtocolCall:
    """One collective of a traced step whose sizes the trace cannot know: the layer that issues it replays it.

    ``group`` is the process group's name, as for :class:`CollectiveCall`. The layer creates one per
    collective its real step would issue there, in the same order, while :func:`tracing_collectives` is true.
    """

    group: str

    def replay(self, issued: bool) -> None:
        """Take part in the collective as the failed rank; ``issued``: it already ran for real (keep its sizes)."""
        raise NotImplementedError

    def same_as(self, other: CollectiveCall | ProtocolCall) -> bool:
        """Whether ``other``, from another trace of the same compute, is this collective (this object, by default)."""
        return other is self


class RecordCollectives(TorchDispatchMode):
    """Writes down every collective dispatched under it, in order (the op still runs below the mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[CollectiveCall | ProtocolCall] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor

        if any(t is not torch.Tensor and not issubclass(t, FakeTensor) for t in types):
            # A tensor subclass (DTensor) runs the op itself, and a mode is switched off while it runs its own
            # dispatch: declined here, the subclass runs it with the mode still on, so the collectives it issues
            # inside the op (loss parallelism's all-reduces in log_softmax and nll_loss) are recorded too.
            return NotImplemented
        kwargs = kwargs or {}
        if is_collective(func):
            spec = tree_map(
                lambda a: TensorSpec(tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a,
                (args, kwargs),
            )
            self.calls.append(CollectiveCall(func, spec[0], spec[1], group_name_of(args, kwargs)))
        return func(*args, **kwargs)


def trace_collectives(run: Callable[[], object], fake_mode: Any = None) -> list[CollectiveCall | ProtocolCall]:
    """The collectives ``run`` dispatches, found by running it on fake tensors (no memory, no communication).

    Real tensors that ``run`` touches (parameters, the batch) are read as fake copies; gradients that its
    backward would accumulate land as fake tensors on the parameters, so the caller clears them.
    ``fake_mode``: the ``FakeTensorMode`` to run under, where ``run`` reads fake tensors made earlier in it
    (default: a new one).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    recorder = RecordCollectives()
    _recorders.append(recorder)
    try:
        with fake_mode or FakeTensorMode(allow_non_fake_inputs=True), recorder:
            run()
    finally:
        _recorders.pop()
    return recorder.calls


_recorders: list[RecordCollectives] = []  # the traces running, innermost last
_attempt = 0  # counts the attempts recorded so far
_recording = False  # whether an attempt that may fail is running (or has just failed)


def tracing_collectives() -> bool:
    """Whether :func:`trace_collectives` is running (on fake tensors): OOM injectors of the tests stay quiet then,
    and layers with value-dependent collectives record :class:`ProtocolCall` objects instead of issuing them."""
    return bool(_recorders)


_inferring_shapes = 0  # how deep this process is in a shape-only run (:func:`inferring_shapes`)


@contextmanager
def inferring_shapes() -> Iterator[None]:
    """A forward on fake tensors that only its outputs' shapes are read from (a recoverable pipeline stage's shape
    inference, ``parallel/pipeline_parallel/recovery.py``): layers whose forward needs values to run at all (MoE
    routing's ``bincount`` and split sizes) return an output of the right shape instead (:func:`shapes_only`)."""
    global _inferring_shapes
    _inferring_shapes += 1
    try:
        yield
    finally:
        _inferring_shapes -= 1


def shapes_only() -> bool:
    """Whether :func:`inferring_shapes` runs: a layer may return any output of the shape its real forward has."""
    return bool(_inferring_shapes)


def record_protocol_call(call: ProtocolCall) -> None:
    """Add ``call`` to the running trace, in order with the collectives dispatched around it."""
    if not _recorders:
        raise RuntimeError("record_protocol_call is only meaningful while trace_collectives runs")
    _recorders[-1].calls.append(call)


def begin_attempt() -> None:
    """An attempt that may fail starts: layers keep what their value-dependent collectives exchange in it."""
    global _attempt, _recording
    _attempt += 1
    _recording = True


def end_recording() -> None:
    """The step is over on every rank: layers stop keeping their exchanges (until the next :func:`begin_attempt`)."""
    global _recording
    _recording = False


def recorded_attempt() -> int | None:
    """The attempt whose exchanges layers keep now (they key what they keep by it), or None outside one."""
    return _attempt if _recording else None


def issued_collectives() -> dict[str, int]:
    """Each process group's count of collectives issued so far (its c10d sequence number), by group name."""
    from torch.distributed.distributed_c10d import _world

    return {name: group._get_sequence_number_for_group()  # type: ignore[attr-defined]  # c10d has it, stubs not
            for group, name in _world.pg_names.items()}


def issued_since(before: dict[str, int]) -> dict[str, int]:
    """Per group, the collectives issued since :func:`issued_collectives` returned ``before`` (none: left out)."""
    now = issued_collectives()
    return {name: count - before.get(name, 0) for name, count in now.items() if count > before.get(name, 0)}


def replay_remaining(calls: list[CollectiveCall | ProtocolCall], issued: dict[str, int]) -> int:
    """Issue, per group, the collectives of ``calls`` after the first ``issued[group]``, with zeros; return how many.

    Each is waited for before the next, in the traced order, so it pairs with the peers' own call.
    Raises (naming the group) when the rank issued more collectives of a group than the trace has: the
    trace is not this attempt's, and replaying would pair the wrong calls.
    """
    traced: dict[str, int] = {}
    for call in calls:
        traced[call.group] = traced.get(call.group, 0) + 1
    for group, count in issued.items():
        if count > traced.get(group, 0):
            raise RuntimeError(
                f"`memory.oom_recovery`: this rank issued {count} collectives on group {group!r} before running out of "
                f"memory, but the traced step has {traced.get(group, 0)}; the step's collectives depend on values, so "
                "it cannot be replayed. Turn oom_recovery off for this model."
            )
    seen: dict[str, int] = {}
    replayed = 0
    for call in calls:
        index = seen.get(call.group, 0)
        seen[call.group] = index + 1
        already = index < issued.get(call.group, 0)  # issued before the error: the peers have (or will) run it
        if isinstance(call, ProtocolCall):
            call.replay(issued=already)  # told even when issued: later calls of its protocol need its sizes
            replayed += not already
            continue
        if already:
            continue
        args, kwargs = tree_map(lambda a: a.zeros() if isinstance(a, TensorSpec) else a, (call.args, call.kwargs))
        _wait(call.op(*args, **kwargs))
        replayed += 1
    return replayed


def _wait(result: Any) -> None:
    """Wait for a collective's result: a Work object (c10d ops) or an async tensor (functional ops)."""
    for leaf in tree_flatten(result)[0]:
        if isinstance(leaf, torch.Tensor):
            torch.ops._c10d_functional.wait_tensor(leaf)
        elif hasattr(leaf, "wait"):
            leaf.wait()
