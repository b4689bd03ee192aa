"""Pipeline parallelism: a model split into stages along its block stack, run through a pipeline schedule.

Modules, in the order a step meets them:

* ``options.py``: :class:`PipelineOptions` (schedule, microbatches, virtual stages, splitter).
* ``split.py``: which blocks each stage keeps (found by structure, or declared with
  ``configure_pipeline_stages()`` returning a :class:`PipelinePlan`).
* ``trace.py``: the alternative splitter (``pipeline_split="trace"``, ``torch.export`` graphs);
  ``traced_sharding.py``: FSDP2 for its stages.
* ``stage.py``: a stage as a module (the model's own forward with only that stage active).
* ``step_state.py``: what a step captured, handed by the runtime to its stages.
* ``user_step.py``: the user's unchanged ``training_step`` reused for capture, loss and logging.
* ``schedule.py``: which ``torch.distributed.pipelining`` schedule, how many microbatches, the bubble.
* ``runtime.py``: :func:`split_into_stages` and the :class:`PipelineRuntime` that drives the rest.
* ``recovery.py``: under ``memory.oom_recovery``, stages that finish their schedule hollow after an OOM.
"""

from picotron_lightning.parallel.pipeline_parallel.options import PipelineOptions
from picotron_lightning.parallel.pipeline_parallel.runtime import (
    PipelineRuntime,
    check_pipeline_model,
    check_traceable_layout,
    plan_pipeline,
    split_into_stages,
)
from picotron_lightning.parallel.pipeline_parallel.schedule import (
    BubbleMeter,
    choose_microbatches,
    schedule_class,
    stage_ids,
    theoretical_bubble,
)
from picotron_lightning.parallel.pipeline_parallel.split import (
    PIPELINE_STAGES_HOOK,
    PipelineParts,
    PipelinePlan,
    PipelineSplitError,
    balance_stages,
    find_pipeline_parts,
)

__all__ = [
    "PIPELINE_STAGES_HOOK",
    "BubbleMeter",
    "PipelineOptions",
    "PipelineParts",
    "PipelinePlan",
    "PipelineRuntime",
    "PipelineSplitError",
    "balance_stages",
    "check_pipeline_model",
    "check_traceable_layout",
    "choose_microbatches",
    "find_pipeline_parts",
    "plan_pipeline",
    "schedule_class",
    "split_into_stages",
    "stage_ids",
    "theoretical_bubble",
]
