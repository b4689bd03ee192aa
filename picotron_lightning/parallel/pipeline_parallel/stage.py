"""A pipeline stage as a module: the model's own forward with only one stage's part active.

:class:`StageModule` is what the ``torch.distributed.pipelining`` schedule runs and what FSDP
shards per stage; :class:`BlockView` is how a block looks to that stage while it runs (fed the
previous stage's activation, or ending the stage's forward). A stage reads the model through a
:class:`SplitModel` and the current step's inputs through a
:class:`~picotron_lightning.parallel.pipeline_parallel.step_state.StepState`; it never sees the runtime.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from picotron_lightning.parallel.pipeline_parallel.split import PipelineParts, PipelineSplitError, replace_submodule
from picotron_lightning.parallel.pipeline_parallel.step_state import StepState, microbatch_index


@dataclass(frozen=True)
class SplitModel:
    """The split model as this rank's stages see it (held by the stages, not registered as their children)."""

    root: nn.Module
    """The LightningModule (or module) that was split."""

    inner: nn.Module
    """The child of ``root`` called as "the model": the one holding the block stack."""

    parts: PipelineParts
    """Where the blocks, the first-stage and the last-stage modules are."""

    first_stubs: dict[str, nn.Module]
    """Parameter-free stand-ins for the first stage's modules, swapped in while a later stage runs."""


class _StageExit(Exception):  # noqa: N818 - control flow, not an error
    """Raised after a non-last stage's last block: the rest of the forward belongs to later stages."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__("stage done")
        self.output = output


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The block's call with its hidden-state input replaced by ``hidden``."""
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    name = "hidden_states" if "hidden_states" in kwargs else next(
        (k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.shape == hidden.shape), None)
    if name is None:
        raise RuntimeError("Pipeline stage: cannot find the hidden-state input of the stage's first block.")
    return args, {**kwargs, name: hidden}


def _second_streams(values: Any, hidden: torch.Tensor, label: str) -> list[str]:
    """Where ``values`` hold another floating tensor of the hidden state's shape (a second activation stream)."""
    items = values.items() if isinstance(values, dict) else enumerate(values)
    return [f"{label} {key!r}" for key, value in items
            if isinstance(value, torch.Tensor) and value is not hidden and value.is_floating_point()
            and value.shape == hidden.shape]


def _refuse_second_stream(block: nn.Module, where: str, found: list[str], shape: torch.Size) -> None:
    """The structural split carries one tensor across a stage boundary; a block that needs more would train wrong."""
    if found:
        raise PipelineSplitError(
            f"The structural pipeline split passes one tensor (the hidden state) between stages, but the "
            f"{type(block).__name__} at a stage boundary {where} another tensor of the hidden state's shape "
            f"({', '.join(found)}, {tuple(shape)}): that second stream would be recomputed from nothing on the "
            "next stage and training would silently diverge from one process. Use pipeline_split=\"trace\" (every "
            "tensor the traced graph passes crosses the boundary), or change the blocks to take and return one tensor."
        )


class BlockView(nn.Module):
    """A block as one stage sees it: input from the previous stage, and/or the end of the stage.

    Lives in the block container only during that stage's forward. The block is held without
    registering it, and attribute reads fall through to it (models read e.g. ``layer.attention_type``).
    """

    def __init__(self, block: nn.Module, hidden: torch.Tensor | None, last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_hidden", hidden)
        object.__setattr__(self, "_last", last)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        block = object.__getattribute__(self, "_block")
        if self._hidden is not None:
            args, kwargs = _with_hidden(args, kwargs, self._hidden)
            found = (_second_streams(args, self._hidden, "positional argument")
                     + _second_streams(kwargs, self._hidden, "keyword argument"))
            _refuse_second_stream(block, "takes, besides it,", found, self._hidden.shape)
        out = self._block(*args, **kwargs)
        if self._last:
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(out, (tuple, list)) and isinstance(hidden, torch.Tensor):
                found = _second_streams(out, hidden, "output")
                _refuse_second_stream(block, "returns, besides it,", found, hidden.shape)
            raise _StageExit(hidden)
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class StageModule(nn.Module):
    """One pipeline stage: runs the model's forward with only this stage's part active.

    Its children are the stage's blocks and first/last modules (the same objects the model holds),
    so FSDP can use it as the stage's root and the schedule sees exactly the stage's parameters.
    """

    _model: SplitModel  # set with object.__setattr__ in __init__ (declared for type checkers)
    _state: StepState
    _traced: nn.Module | None

    def __init__(self, model: SplitModel, state: StepState, index: int, num_stages: int,
                 block_keys: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not children: the model holds them, not the stage
        object.__setattr__(self, "_state", state)
        # pipeline_split="trace" under FSDP2: the traced graph this stage runs instead of the model's forward
        # (set by the runtime per input shape; not a child, so not in the state dict or the FSDP2 units).
        object.__setattr__(self, "_traced", None)
        self.index, self.num_stages, self.block_keys = index, num_stages, block_keys
        self.blocks = nn.ModuleDict()
        self.first = nn.ModuleDict()
        self.last = nn.ModuleDict()

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def attach(self) -> None:
        """(Re)collect this stage's modules from the model, after earlier steps may have wrapped them."""
        model = self._model
        container = model.parts.container._modules
        self.blocks = nn.ModuleDict({k: container[k] for k in self.block_keys})
        key = lambda name: name.replace(".", "__")  # noqa: E731 - ModuleDict keys cannot hold dots
        if self.is_first:
            self.first = nn.ModuleDict({key(n): model.root.get_submodule(n) for n in model.parts.first})
        if self.is_last:
            self.last = nn.ModuleDict({key(n): model.root.get_submodule(n) for n in model.parts.last})

    @contextmanager
    def _only_this_stage(self, hidden: torch.Tensor | None) -> Iterator[None]:
        """Make the model look like this stage alone for one forward call."""
        model = self._model
        container = model.parts.container
        saved = container._modules
        view: OrderedDict[str, nn.Module] = OrderedDict()
        for pos, key in enumerate(self.block_keys):
            block = saved[key]
            feed = hidden if pos == 0 else None
            end = pos == len(self.block_keys) - 1 and not self.is_last
            view[key] = BlockView(block, feed, end) if feed is not None or end else block
        container._modules = view
        swapped = []
        if not self.is_first:
            swapped = [(n, replace_submodule(model.root, n, stub)) for n, stub in model.first_stubs.items()]
        try:
            yield
        finally:
            container._modules = saved
            for name, module in swapped:
                replace_submodule(model.root, name, module)

    def run_traced(self, graph: nn.Module | None) -> None:
        """Run ``graph`` (a traced stage, same call signature) as this stage's forward; None: the model's own."""
        object.__setattr__(self, "_traced", graph)

    def forward(self, *activations: torch.Tensor, mb_index: torch.Tensor) -> Any:
        if self._traced is not None:
            return self._traced(*activations, mb_index=mb_index)
        index = microbatch_index(mb_index)
        args, kwargs = self._state.calls[index]
        received = None if self.is_first else activations
        if received is not None and len(received) != 1:
            raise RuntimeError(f"Stage {self.index} received {len(received)} tensors; the structural split passes one.")
        with self._only_this_stage(None if received is None else received[0]):
            try:
                out = self._model.inner(*args, **kwargs)
            except _StageExit as done:
                # A view (DTensor's to_local under tp) is copied: the zero-bubble schedules' input half detaches the
                # stage's outputs in place, which torch refuses for a view.
                return done.output.clone() if done.output._is_view() else done.output
        return self._state.pack_output(out, index)
