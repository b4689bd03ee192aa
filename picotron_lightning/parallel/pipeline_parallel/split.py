"""Splitting a model into pipeline stages by structure: which blocks each stage keeps.

The model is found by shape (see ``picotron_lightning/structure.py``): a stack of repeated blocks inside an "inner"
model (the child of the LightningModule that holds the stack), modules before the stack (the
embeddings) that go to the first stage, and modules after it (final norm, head) that go to the
last. Stages get contiguous runs of blocks, balanced by parameter count with the embedding counted
on the first stage and the norm and head on the last.

Pruning keeps original names: the block ``ModuleList`` keeps its string keys (``"5"`` stays
``"5"`` on the stage that holds it), and modules a stage does not hold are replaced by
parameter-free stubs. So ``state_dict`` keys are the one-process keys, and a checkpoint written at
one pipeline size loads at any other.

Models this cannot read declare their stages with a ``configure_pipeline_stages()`` method on the
LightningModule returning :class:`PipelinePlan` (or a dict with the same fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from picotron_lightning._util import num_params
from picotron_lightning.structure import find_main_block_stack
from picotron_lightning.topology import LayoutError

PIPELINE_STAGES_HOOK = "configure_pipeline_stages"
"""The LightningModule method that declares the stages (returns a :class:`PipelinePlan`)."""


class PipelineSplitError(LayoutError):
    """The model cannot be split into the requested pipeline stages."""


@dataclass(frozen=True)
class PipelinePlan:
    """A user's declaration of the stages, returned by ``LightningModule.configure_pipeline_stages()``.

    Names are qualified names inside the LightningModule.

    Args:
        blocks: the ``nn.ModuleList``/``nn.Sequential`` of repeated blocks, e.g. ``"model.layers"``.
        first: modules that run before the blocks (embeddings); they live on the first stage.
        last: modules that run after the blocks (final norm, head); they live on the last stage.
    """

    blocks: str
    first: tuple[str, ...] = ()
    last: tuple[str, ...] = ()


@dataclass
class PipelineParts:
    """The pieces of one model that pipeline splitting moves around."""

    inner_name: str  # child of the root that is called as "the model" ("" = the root itself)
    blocks_name: str  # qualified name of the block container in the root
    container: nn.ModuleList | nn.Sequential
    first: list[str] = field(default_factory=list)  # qualified names in the root
    last: list[str] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.container)


def _unsplittable(root: nn.Module, why: str) -> PipelineSplitError:
    return PipelineSplitError(
        f"pipeline_parallel_size > 1 needs the model split into stages, but {why}. Declare the stages: define "
        f"`{PIPELINE_STAGES_HOOK}(self)` on {type(root).__name__} returning "
        "`PipelinePlan(blocks='model.layers', first=['model.embed_tokens'], last=['model.norm', 'model.output'])` "
        "(from picotron_lightning.parallel.pipeline_parallel), or use pipeline_parallel_size=1."
    )


def _from_plan(root: nn.Module, plan: PipelinePlan | dict) -> PipelineParts:
    if isinstance(plan, dict):
        plan = PipelinePlan(**plan)
    try:
        container = root.get_submodule(plan.blocks)
    except AttributeError as err:
        raise _unsplittable(
            root, f"`{PIPELINE_STAGES_HOOK}` names blocks {plan.blocks!r}, which does not exist") from err
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise _unsplittable(root, f"`{PIPELINE_STAGES_HOOK}` blocks {plan.blocks!r} is a {type(container).__name__}, "
                                  "not an nn.ModuleList or nn.Sequential")
    for name in (*plan.first, *plan.last):
        root.get_submodule(name)  # raises with the missing name
    inner = plan.blocks.split(".")[0] if "." in plan.blocks else ""
    return PipelineParts(inner, plan.blocks, container, list(plan.first), list(plan.last))


def find_pipeline_parts(root: nn.Module) -> PipelineParts:
    """Find the block stack, the first-stage modules and the last-stage modules of ``root``.

    Modules outside the stack that hold parameters are placed by what they are and where they are
    registered: embeddings and anything registered before the stack go first, the rest go last.
    """
    hook = getattr(root, PIPELINE_STAGES_HOOK, None)
    if callable(hook):
        return _from_plan(root, hook())
    stack = find_main_block_stack(root)
    if stack is None:
        raise _unsplittable(root, f"{type(root).__name__} has no stack of repeated blocks (an nn.ModuleList of "
                                  "at least two same-class modules holding most parameters)")
    inner = stack.name.split(".")[0] if "." in stack.name else ""
    first: list[str] = []
    last: list[str] = []
    before_stack = True
    claimed: list[str] = []
    for name, module in root.named_modules():
        if name == stack.name:
            before_stack = False
            claimed.append(name)
            continue
        if any(name.startswith(c + ".") for c in claimed):
            continue
        if not name or stack.name.startswith(name + "."):
            # An ancestor of the stack is split below it; its own parameters would belong to no stage.
            if any(True for _ in module.parameters(recurse=False)):
                raise _unsplittable(root, f"`{name or type(root).__name__}` holds parameters of its own next to "
                                          "the block stack, and no stage can be chosen for them")
            continue
        if num_params(module) == 0:
            continue
        # Whole modules outside the stack: embeddings and what is registered before the stack run first.
        (first if before_stack or isinstance(module, nn.Embedding) else last).append(name)
        claimed.append(name)
    return PipelineParts(inner, stack.name, stack.container, first, last)


def balance_stages(block_costs: list[float], num_stages: int, first_cost: float = 0.0,
                   last_cost: float = 0.0) -> list[range]:
    """Contiguous runs of blocks, one per stage, minimising the most expensive stage.

    The first stage also pays ``first_cost`` and the last ``last_cost``. Every stage gets at least
    one block. Exact dynamic programme over split points (O(stages x blocks^2)).
    """
    n = len(block_costs)
    if num_stages > n:
        raise PipelineSplitError(f"{num_stages} pipeline stages cannot be made from {n} blocks.")
    prefix = [0.0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, i: int, j: int) -> float:  # blocks [i, j) on `stage`
        extra = (first_cost if stage == 0 else 0.0) + (last_cost if stage == num_stages - 1 else 0.0)
        return prefix[j] - prefix[i] + extra

    inf = float("inf")
    # best[s][j]: minimal max-cost of stages 0..s covering blocks [0, j)
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, 0, j)
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                # Ties go to the later cut, so equal blocks spread evenly.
                value = max(best[s - 1][i], cost(s, i, j))
                if value <= best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds = [n]
    for s in range(num_stages - 1, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[k], bounds[k + 1]) for k in range(num_stages)]


def stage_costs(root: nn.Module, parts: PipelineParts) -> tuple[list[float], float, float]:
    """Parameter counts of the blocks, the first-stage modules and the last-stage modules."""
    blocks = [float(num_params(b)) for b in parts.container]
    first = float(sum(num_params(root.get_submodule(n)) for n in parts.first))
    last = float(sum(num_params(root.get_submodule(n)) for n in parts.last))
    return blocks, first, last


def check_stage_count(parts: PipelineParts, pp: int, virtual_stages: int) -> None:
    """Refuse more stages than blocks, naming the block count and what would work."""
    stages = pp * virtual_stages
    if stages <= parts.num_blocks:
        return
    what = f"pipeline_parallel_size={pp}" + (f" x virtual_stages={virtual_stages} = {stages} stages"
                                               if virtual_stages > 1 else "")
    raise PipelineSplitError(
        f"{what}: the model has only {parts.num_blocks} blocks (`{parts.blocks_name}`), and each stage needs at "
        f"least one. Use pipeline_parallel_size x virtual_stages <= {parts.num_blocks}."
    )


class EmbeddingStub(nn.Module):
    """Stands in for an embedding on stages that do not hold it: zeros of the embedding's output shape.

    The real input of such a stage arrives from the previous stage and replaces the first block's
    input; the zeros only let the model's own forward run up to that block.
    """

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim, self.dtype = dim, dtype

    def forward(self, ids: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=ids.device)


class PassThroughStub(nn.Module):
    """Stands in for a non-embedding first-stage module: returns its first input unchanged."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return x


class AbsentStub(nn.Module):
    """Stands in for a last-stage module on other stages, where the forward stops before it."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.held_name = name

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"`{self.held_name}` lives on the last pipeline stage; it cannot run on this one.")


def stub_for(module: nn.Module) -> nn.Module:
    """The parameter-free stand-in used for a first-stage module on later stages."""
    if isinstance(module, nn.Embedding):
        return EmbeddingStub(module.embedding_dim, module.weight.dtype)
    return PassThroughStub()


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at qualified ``name`` in ``root``; return what was there."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = cast(nn.Module, parent._modules[attr])  # _modules is typed Module | None
    parent._modules[attr] = new
    return old


class _StageBlocks(nn.ModuleList):
    """A ``ModuleList`` holding some of the original blocks under their original keys.

    Integer indexing is by position among the held blocks (``layers[0]`` is this stage's first
    block), so code that indexes the list keeps working; names (``layers.5...``) stay the original ones.
    """

    def _get_abs_string_index(self, idx: int) -> str:
        keys = list(self._modules)
        return keys[idx]  # IndexError for a position out of range, as a ModuleList raises


def keep_blocks(container: nn.ModuleList | nn.Sequential, keep: set[int]) -> None:
    """Drop the blocks not in ``keep`` while the kept ones keep their original string keys."""
    for key in list(container._modules):
        if int(key) not in keep:
            del container._modules[key]
    if type(container) is nn.ModuleList:
        container.__class__ = _StageBlocks  # positional indexing over the kept blocks
