"""The strategy's options: one frozen, nested, keyword-only dataclass, validated once.

Both strategies keep flat keyword arguments (``tensor_parallel_size=2``, ``pipeline_schedule="gpipe"``),
because that is what users and LightningCLI pass; :meth:`Picotron3DOptions.from_arguments` sorts them
into one section per concern, and every consumer reads its section. A field's flat name is its own
name unless its metadata says otherwise (``field(metadata={"flat": "pipeline_schedule"})``).

Adding an option: one field, with a docstring, in the section it belongs to (validated in that
section's ``__post_init__``), the same keyword in both strategies' signatures (a test checks that
they agree with :func:`flat_option_names`), and its consumer reading ``options.<section>.<field>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from picotron_lightning.fault_tolerance.options import FaultToleranceOptions
from picotron_lightning.memory.options import MemoryOptions
from picotron_lightning.parallel.compile import CompileOptions
from picotron_lightning.parallel.data import DataParallelOptions
from picotron_lightning.parallel.pipeline_parallel import PipelineOptions
from picotron_lightning.parallel.tensor_parallel import TensorParallelOptions
from picotron_lightning.topology import ParallelLayout

START_METHODS = ("popen", "spawn")


@dataclass(frozen=True, kw_only=True)
class ProcessOptions:
    """How ranks are started and talk to each other."""

    process_group_backend: str | None = None
    """``"gloo"`` or ``"nccl"``; ``None`` picks by device (gloo on CPU, nccl on CUDA)."""

    timeout: timedelta | None = timedelta(minutes=30)
    """Timeout of every collective: a stuck rank fails the run after this long instead of hanging it."""

    start_method: Literal["popen", "spawn"] = "popen"
    """``"popen"`` re-runs the script for each rank (as Lightning's ``ddp``); ``"spawn"`` starts ranks
    with ``torch.multiprocessing`` (notebooks, tests)."""

    def __post_init__(self) -> None:
        if self.start_method not in START_METHODS:
            raise ValueError(f"`start_method={self.start_method!r}` is not supported; use one of {START_METHODS}.")
        if self.process_group_backend not in (None, "gloo", "nccl", "mpi", "ucc", "xccl"):
            raise ValueError(f"`process_group_backend={self.process_group_backend!r}` is not a torch.distributed "
                             "backend; use 'gloo', 'nccl' or None (chosen by device).")
        if self.timeout is not None and not isinstance(self.timeout, timedelta):
            raise ValueError(f"`timeout` must be a datetime.timedelta or None, got {self.timeout!r}.")


@dataclass(frozen=True, kw_only=True)
class Picotron3DOptions:
    """Everything the strategy's arguments say, one section per concern (each validated on its own)."""

    layout: ParallelLayout = field(default_factory=ParallelLayout)
    """Sizes: ``data_parallel_size``, ``tensor_parallel_size``, ``pipeline_parallel_size``, ``expert_parallel_size``."""

    data_parallel: DataParallelOptions = field(default_factory=DataParallelOptions)
    """FSDP2 / DDP / HSDP: ``data_parallel_mode``, ``hsdp_shard_size``, ``reshard_after_forward``, dtypes."""

    tensor_parallel: TensorParallelOptions = field(default_factory=TensorParallelOptions)
    """``tp_plan``, ``sequence_parallel``, ``loss_parallel``."""

    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    """``pipeline_schedule``, ``num_microbatches``, ``virtual_stages``, ``pipeline_split``."""

    memory: MemoryOptions = field(default_factory=MemoryOptions, metadata={"flat": "memory"})
    """``memory=`` (a ``MemoryOptions`` or a dict of its fields: checkpointing mode, garbage collection,
    allocator), and the flat ``activation_checkpointing``."""

    compile: CompileOptions = field(default_factory=CompileOptions, metadata={"flat": "compile"})
    """``compile=``: ``True`` or a dict of ``torch.compile`` arguments compiles each transformer block."""

    process: ProcessOptions = field(default_factory=ProcessOptions)
    """``process_group_backend``, ``timeout``, ``start_method``."""

    fault_tolerance: FaultToleranceOptions = field(default_factory=FaultToleranceOptions)
    """``resume``, ``async_checkpointing``, ``max_checkpoints_in_flight``, ``keep_last_checkpoints``,
    ``heartbeat_timeout``."""

    def __post_init__(self) -> None:
        # Rules that involve two sections; each section checked its own fields already.
        if self.data_parallel.mode == "ddp" and self.layout.pp != 1 and self.pipeline.split != "trace":
            # DDP's reducer expects one backward per forward; a pipeline schedule runs several
            # microbatches per step and DDP's bucket rebuild fails on them. FSDP2 handles this. (The
            # traced split averages its replicas' gradients itself, without DDP's reducer.)
            raise ValueError(
                "data_parallel_mode='ddp' is not supported with pipeline_parallel_size > 1; use 'fsdp' or 'hsdp' "
                "('auto' picks fsdp under pipeline parallelism), or pipeline_split='trace' (stages as replicas)."
            )

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> Picotron3DOptions:
        """Build the options from a strategy's flat keyword arguments (other keys, such as ``self``, are ignored).

        A section may also come whole under its own flat name (``memory=MemoryOptions(...)`` or a dict);
        a flat field that differs from its default is then laid over it, unless the two disagree.
        """
        sections: dict[str, Any] = {}
        for section in dataclasses.fields(cls):
            section_type = _section_type(section)
            values = {f.name: arguments[flat] for f, flat in _flat_fields(section_type) if flat in arguments}
            whole_name = section.metadata.get("flat")
            if whole_name is not None and arguments.get(whole_name) is not None:
                whole = section_type.from_arg(arguments[whole_name])  # type: ignore[attr-defined]  # sections given whole have it
                values = _lay_over(whole_name, whole, values)
            sections[section.name] = section_type(**values)
        return cls(**sections)

    def as_arguments(self) -> dict[str, Any]:
        """The flat keyword arguments these options were built from (``from_arguments`` inverts it)."""
        arguments = {flat: getattr(getattr(self, s.name), f.name)
                     for s in dataclasses.fields(self) for f, flat in _flat_fields(_section_type(s))}
        for s in dataclasses.fields(self):
            if s.metadata.get("flat") is not None:
                arguments[s.metadata["flat"]] = getattr(self, s.name)
        return arguments


def _lay_over(whole_name: str, whole: Any, flat_values: dict[str, Any]) -> dict[str, Any]:
    """The fields of a section given whole, with the flat arguments that were changed from their defaults on top."""
    defaults = type(whole)()
    values = {f.name: getattr(whole, f.name) for f in dataclasses.fields(whole)}
    for name, value in flat_values.items():
        changed = type(whole)(**{name: value})  # normalised as the section normalises it
        if getattr(changed, name) == getattr(defaults, name):
            continue
        if values[name] != getattr(defaults, name) and values[name] != getattr(changed, name):
            raise ValueError(f"`{name}={value!r}` and `{whole_name}.{name}={values[name]!r}` disagree; pass one.")
        values[name] = getattr(changed, name)
    return values


def _section_type(section: dataclasses.Field) -> type:
    factory = section.default_factory
    assert callable(factory)
    return factory  # type: ignore[return-value]  # each section's default factory is its class


def _flat_fields(section_type: type) -> Iterator[tuple[dataclasses.Field, str]]:
    for f in dataclasses.fields(section_type):
        flat = f.metadata.get("flat", f.name)
        if flat is not None:  # flat=None: not a strategy argument (e.g. reserved sizes)
            yield f, flat


def flat_option_names() -> list[str]:
    """Every flat keyword the options understand (fields, and sections given whole): the strategies' arguments."""
    names = [flat for s in dataclasses.fields(Picotron3DOptions) for _, flat in _flat_fields(_section_type(s))]
    return names + [s.metadata["flat"] for s in dataclasses.fields(Picotron3DOptions) if s.metadata.get("flat")]
