"""Running an unchanged LightningModule step under a pipeline schedule.

The user's ``training_step`` (or ``validation_step``/``test_step``/``predict_step``) is reused
three ways, without changes to it:

1. **Capture.** On every rank, for each microbatch, the step runs until it calls the inner model;
   the call's arguments are recorded and the step is abandoned there. Every stage can then run
   the model's own forward on those arguments (the stages differ only in which blocks they hold).
2. **Loss.** On the last stage the schedule's loss function runs the step once more per
   microbatch, with the inner model's forward replaced by "return this stage's output": the
   user's own code turns the logits into the loss. ``self.log`` calls made there are recorded.
3. **Replay.** After the schedule, the last stage broadcasts the microbatch-averaged step output
   and logged values over the pipeline group, and every rank calls ``self.log`` with them. So all
   ranks log the same names in the same order (``sync_dist=True`` reduces over matching calls)
   and Lightning receives the replica's mean loss everywhere.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


class _InnerCallCaptured(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the patched inner model to stop a step once its inputs are known."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


def batch_size_of(batch: Any) -> int:
    """The leading dimension of the first tensor in ``batch``."""
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    raise TypeError(
        "Pipeline parallelism splits each batch into microbatches along the first dimension, but the batch "
        f"holds no tensor ({type(batch).__name__})."
    )


def split_batch(batch: Any, chunks: int) -> list[Any]:
    """``batch`` cut into ``chunks`` equal microbatches along dim 0 (other leaves are shared)."""
    size = batch_size_of(batch)
    leaves, spec = tree_flatten(batch)
    pieces = [
        torch.tensor_split(leaf, chunks) if isinstance(leaf, torch.Tensor) and leaf.dim() > 0
        and leaf.shape[0] == size else [leaf] * chunks
        for leaf in leaves
    ]
    return [tree_unflatten([p[i] for p in pieces], spec) for i in range(chunks)]


def merge_outputs(outputs: list[Any]) -> Any:
    """Concatenate per-microbatch predictions along dim 0 (lists for anything else)."""
    flat = [tree_flatten(o) for o in outputs]
    spec = flat[0][1]
    merged: list[Any] = []
    for parts in zip(*(f[0] for f in flat), strict=True):
        if all(isinstance(p, torch.Tensor) and p.dim() > 0 for p in parts):
            merged.append(torch.cat(parts))
        else:
            merged.append(list(parts))
    return tree_unflatten(merged, spec)


def _mean(values: list[Any]) -> Any:
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack([v.detach().float() for v in values]).mean(0).to(values[0].dtype)
    if all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in values):
        return sum(values) / len(values)
    return values[-1]


def mean_outputs(outputs: list[Any]) -> Any:
    """Leaf-wise mean over microbatches of step outputs with the same structure."""
    flat = [tree_flatten(o) for o in outputs]
    return tree_unflatten([_mean(list(parts)) for parts in zip(*(f[0] for f in flat), strict=True)], flat[0][1])


class LogRecorder:
    """Collects ``self.log`` calls per microbatch; averages and replays them once per step."""

    def __init__(self) -> None:
        self.by_microbatch: dict[int, list[tuple[str, Any, tuple, dict]]] = {}

    def recorder(self, microbatch: int) -> Callable[..., None]:
        calls = self.by_microbatch.setdefault(microbatch, [])
        calls.clear()

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            calls.append((name, value.detach() if isinstance(value, torch.Tensor) else value, args, kwargs))

        return log

    def averaged(self) -> list[tuple[str, Any, tuple, dict]]:
        """One call per logged name, in the first microbatch's order, values averaged over microbatches."""
        if not self.by_microbatch:
            return []
        runs = [self.by_microbatch[i] for i in sorted(self.by_microbatch)]
        out = []
        for position, (name, _, args, kwargs) in enumerate(runs[0]):
            values = [run[position][1] for run in runs if position < len(run) and run[position][0] == name]
            out.append((name, _mean(values), args, kwargs))
        return out


@contextmanager
def patched_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Replace ``module.forward`` on the instance for the duration of the context."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had:
            module.forward = previous  # type: ignore[method-assign,assignment]
        else:
            del module.forward


@contextmanager
def patched_log(pl_module: nn.Module, log: Callable[..., None]) -> Iterator[None]:
    """Route ``pl_module.log`` (and so ``log_dict``) to ``log``."""
    pl_module.log = log  # type: ignore[assignment]  # nn.Module.__getattr__ types attrs as Tensor | Module
    try:
        yield
    finally:
        del pl_module.log


def _ignore_log(*args: Any, **kwargs: Any) -> None:
    return None


def capture_inputs(pl_module: nn.Module, inner: nn.Module, step: Callable[..., Any], microbatch: Any,
                   rest: tuple, kwargs: dict, step_name: str, inner_name: str) -> tuple[tuple, dict]:
    """Run ``step(microbatch, *rest)`` until it calls ``inner``; return that call's arguments."""

    def capture(*args: Any, **kw: Any) -> None:
        raise _InnerCallCaptured(args, kw)

    with patched_forward(inner, capture), patched_log(pl_module, _ignore_log), torch.no_grad():
        try:
            step(microbatch, *rest, **kwargs)
        except _InnerCallCaptured as call:
            return call.args, call.kwargs
    raise RuntimeError(
        f"Pipeline parallelism runs `{step_name}` with its model split into stages, but `{step_name}` never "
        f"called the model `{inner_name or type(pl_module).__name__}` (the module holding the transformer blocks). "
        "Call it (e.g. `self.model(inputs)`) inside the step, or declare the stages with "
        "`configure_pipeline_stages()`."
    )


def run_with_output(pl_module: nn.Module, inner: nn.Module, step: Callable[..., Any], microbatch: Any,
                    rest: tuple, kwargs: dict, model_output: Any, log: Callable[..., None]) -> Any:
    """Run the user's step with the inner model returning ``model_output``; return the step's result."""

    def replay(*args: Any, **kw: Any) -> Any:
        return model_output

    with patched_forward(inner, replay), patched_log(pl_module, log):
        return step(microbatch, *rest, **kwargs)


def loss_of(result: Any, step_name: str) -> torch.Tensor:
    """The loss in a training step's result (a tensor or a dict with ``"loss"``)."""
    loss = result.get("loss") if isinstance(result, dict) else result
    if not isinstance(loss, torch.Tensor):
        raise RuntimeError(
            f"Under pipeline parallelism `{step_name}` must return the loss (a tensor, or a dict with 'loss'); "
            f"got {type(result).__name__}. Skipping a step by returning None is not supported with pp > 1."
        )
    return loss


def to_cpu(obj: Any) -> Any:
    """Detached CPU copies of the tensors in ``obj`` (safe to pickle to another rank's device)."""
    return tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, obj)


def to_device(obj: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def broadcast_from_last(obj: Any, group: dist.ProcessGroup, src_group_rank: int, device: torch.device) -> Any:
    """Send ``obj`` from the rank holding the last pipeline stage to every rank of ``group``."""
    src = dist.get_global_rank(group, src_group_rank)
    box = [to_cpu(obj) if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group, device=device if device.type != "cpu" else None)
    return to_device(box[0], device)
