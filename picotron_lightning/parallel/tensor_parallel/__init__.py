"""Tensor parallelism: Megatron-style sharding of an unchanged model over the ``tp`` mesh dimension (DTensor).

Modules, in the order a plan goes through them:

* ``options.py``: :class:`TensorParallelOptions` (``tp_plan``, sequence and loss parallelism).
* ``plan_types.py``: what a plan is (:class:`TensorParallelPlan`, the styles).
* ``plans.py``: where a plan comes from (argument, module hook, Hugging Face, reference model, detector).
* ``detect.py``: the data-flow detector for transformers nobody described.
* ``validate.py``: checks run on every rank before any collective.
* ``sharding.py``: :func:`make_tensor_plan` (find and validate) and :func:`apply_plan` (shard).
"""

from picotron_lightning.parallel.tensor_parallel.options import TensorParallelOptions
from picotron_lightning.parallel.tensor_parallel.plan_types import STYLES, TENSOR_PLAN_HOOK, TensorParallelPlan
from picotron_lightning.parallel.tensor_parallel.plans import resolve_plan
from picotron_lightning.parallel.tensor_parallel.sharding import (
    apply_plan,
    loss_parallel_context,
    make_tensor_plan,
    shard_tensor_parallel,
)
from picotron_lightning.parallel.tensor_parallel.validate import validate_plan

__all__ = [
    "STYLES",
    "TENSOR_PLAN_HOOK",
    "TensorParallelOptions",
    "TensorParallelPlan",
    "apply_plan",
    "loss_parallel_context",
    "make_tensor_plan",
    "resolve_plan",
    "shard_tensor_parallel",
    "validate_plan",
]
