"""The parallelisms, each applied from outside to an unchanged model, and the order they are applied in.

* ``parallelize.py``: :func:`parallelize`, the ordered steps (pipeline split, tensor parallel,
  expert parallel, memory policies, data parallel) and the :class:`ParallelModel` they produce.
* ``pipeline_parallel/``: stages along the block stack, run through a pipeline schedule.
* ``tensor_parallel/``: Megatron-style sharding of the blocks' linears (DTensor).
* ``expert.py``: MoE experts spread over the ``ep`` ranks.
* ``data.py``: FSDP2, DDP or HSDP over the ``dp`` ranks.
* ``grad_norm.py``: the global gradient norm over every parallel dimension.
* ``picotron_lightning/structure.py`` (outside this package, also used by ``memory/``): finding a
  model's stack of repeated blocks.

Context parallelism (splitting long sequences over ranks) would be a ``context_parallel/``
subpackage next to these, with its step in ``parallelize.py``; it does not exist yet.
"""

from picotron_lightning.parallel.data import DataParallelOptions
from picotron_lightning.parallel.parallelize import ParallelModel, parallelize
from picotron_lightning.parallel.pipeline_parallel import PipelineOptions, PipelineRuntime
from picotron_lightning.parallel.tensor_parallel import TensorParallelOptions, TensorParallelPlan

__all__ = [
    "DataParallelOptions",
    "ParallelModel",
    "PipelineOptions",
    "PipelineRuntime",
    "TensorParallelOptions",
    "TensorParallelPlan",
    "parallelize",
]
