"""The strategy's use of the planner: sizes left to ``"auto"`` are chosen from the model at launch.

Called in every rank (and identically: the planner is arithmetic on the model's shapes, the world size
and fixed tables, with no measurement) after the ranks know the world size and before any process
group exists. What the user fixed stays fixed (sizes, data-parallel mode, schedule, checkpointing);
the planner fills the rest: the ``"auto"`` sizes, the microbatch count under pipeline parallelism, the
data-parallel mode when it is ``"auto"``, and FSDP's ``reshard_after_forward``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from picotron_lightning.planner.hardware import device_spec
from picotron_lightning.planner.model_spec import describe_model
from picotron_lightning.planner.ranking import PlanError, PlanResult, plan_layout
from picotron_lightning.planner.search import Constraints
from picotron_lightning.topology import ParallelLayout

DEFAULT_SEQ_LEN = 2048


def batch_shape_from_trainer(module: nn.Module) -> tuple[int, int] | None:
    """(per-rank batch size, sequence length) of the training loader given to ``fit``, without iterating it.

    Lightning's loader batch size is per data-parallel rank. The first sample's last dimension is taken
    as the sequence length (reading one item leaves every random state alone).
    """
    trainer = getattr(module, "_trainer", None)
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    loader = getattr(source, "instance", None)
    batch_size = getattr(loader, "batch_size", None)
    dataset = getattr(loader, "dataset", None)
    if not isinstance(batch_size, int) or dataset is None:
        return None
    try:
        sample = dataset[0]
    except Exception:  # noqa: BLE001 - an iterable dataset: fall back to the defaults
        return None
    if isinstance(sample, torch.Tensor) and sample.dim() >= 1:
        return batch_size, int(sample.shape[-1])
    return None


def _fixed(value: Any) -> int | None:
    return None if value == "auto" else int(value)


def plan_strategy_options(options: Any, module: nn.Module, world_size: int, devices_per_node: int,
                          device: torch.device) -> tuple[Any, PlanResult]:
    """The strategy's options with every ``"auto"`` the planner fills filled; and the plan it chose."""
    layout = options.layout
    shape = batch_shape_from_trainer(module)
    local_batch, seq_len = shape if shape else (1, DEFAULT_SEQ_LEN)
    name = device.type if device.type == "cpu" else torch.cuda.get_device_name(device)
    spec = describe_model(module, seq_len, name=type(module).__name__)
    dp_mode = options.data_parallel.mode
    constraints = Constraints(
        dp=_fixed(layout.data_parallel_size), tp=_fixed(layout.tensor_parallel_size),
        pp=_fixed(layout.pipeline_parallel_size), ep=_fixed(layout.expert_parallel_size),
        dp_mode=None if dp_mode == "auto" else dp_mode, checkpointing=options.memory.activation_checkpointing,
        schedule=options.pipeline.schedule, num_microbatches=options.pipeline.num_microbatches,
        accumulate=False)  # the loader's batch is the micro-batch; accumulate_grad_batches is the user's
    result = plan_layout(spec, devices=world_size, devices_per_node=devices_per_node, device=device_spec(name),
                         global_batch=None, local_batch=local_batch, constraints=constraints)
    best = result.best
    c = best.candidate
    chosen = dataclasses.replace(
        options,
        layout=ParallelLayout(c.dp, c.tp, c.pp, c.ep),
        data_parallel=dataclasses.replace(
            options.data_parallel, mode=c.dp_mode,
            hsdp_shard_size=c.hsdp_shard if c.dp_mode == "hsdp" else options.data_parallel.hsdp_shard_size,
            reshard_after_forward=(best.settings.reshard_after_forward
                                   if best.settings.reshard_after_forward is not None
                                   else options.data_parallel.reshard_after_forward)),
        pipeline=dataclasses.replace(options.pipeline, num_microbatches=c.num_microbatches if c.pp > 1 else None),
    )
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    rank_zero_info(f"picotron3d planner chose {c.describe()} (settings: {best.settings.describe()})\n"
                   f"{result.table(top=5, show_rejected=False)}")
    return chosen, result


__all__ = ["PlanError", "batch_shape_from_trainer", "plan_strategy_options"]
