"""Options of the pipeline step: schedule, microbatches, virtual stages, splitter (a leaf module)."""

from __future__ import annotations

from dataclasses import dataclass, field

from picotron_lightning.topology import LayoutError

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv")
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "zero_bubble", "zbv")
SPLITS = ("structural", "trace")


@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """The strategy's pipeline arguments, checked at construction (see docs/pipeline_parallel.md)."""

    schedule: str = field(default="1f1b", metadata={"flat": "pipeline_schedule"})
    """One of :data:`SCHEDULES`: ``"1f1b"`` (default), ``"gpipe"``, ``"interleaved_1f1b"``, ``"zero_bubble"``,
    ``"zbv"``."""

    num_microbatches: int | None = None
    """Microbatches each step's local batch is cut into; ``None`` derives it from the batch (aiming at 4 x pp)."""

    virtual_stages: int | None = None
    """Model chunks per pipeline rank; ``None`` means 1, or 2 for the interleaved schedules."""

    split: str = field(default="structural", metadata={"flat": "pipeline_split"})
    """``"structural"`` (the model's own forward per stage; composes with FSDP2/TP/EP) or ``"trace"``
    (``torch.export`` split by ``torch.distributed.pipelining.pipeline``; with data parallelism as replicas
    only: no FSDP2, tensor or expert parallelism). Both keep parameter
    names, so checkpoints move between pipeline sizes and splitters."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise LayoutError(f"`pipeline_schedule={self.schedule!r}` is not supported; use one of {SCHEDULES}.")
        for name in ("num_microbatches", "virtual_stages"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise LayoutError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if self.split not in SPLITS:
            raise LayoutError(
                f"`pipeline_split={self.split!r}` is not supported; use one of {SPLITS} (a model neither can read "
                "can declare its stages with `configure_pipeline_stages()` and 'structural')."
            )
        v = self.stages_per_rank
        if self.schedule in ("gpipe", "1f1b") and v != 1:
            raise LayoutError(
                f"`virtual_stages={v}` needs an interleaved schedule; with pipeline_schedule={self.schedule!r} "
                "use virtual_stages=1, or pipeline_schedule='interleaved_1f1b'."
            )
        if self.schedule == "zbv" and v != 2:
            raise LayoutError(f"pipeline_schedule='zbv' places exactly 2 stages per rank; got virtual_stages={v}.")

    @property
    def stages_per_rank(self) -> int:
        if self.virtual_stages is not None:
            return self.virtual_stages
        return 2 if self.schedule in MULTI_STAGE_SCHEDULES else 1

    @property
    def is_multi(self) -> bool:
        return self.schedule in MULTI_STAGE_SCHEDULES
