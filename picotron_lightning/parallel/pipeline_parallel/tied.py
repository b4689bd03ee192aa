"""Parameters shared by the first and the last pipeline stage (tied input/output embeddings).

A model with ``tie_embeddings=True`` / ``tie_word_embeddings=True`` uses one weight in its
embedding (first stage) and its output head (last stage). Split over ranks, each end keeps its
own copy, Megatron-style:

* **Same start.** After data parallelism, the last stage's copy is overwritten with the first
  stage's (one broadcast per pair of ranks holding the two ends with the same (dp, tp) coordinates).
* **Same updates.** Each training step's gradient of the two copies is summed over that pair
  before it is added to ``.grad`` (so also under gradient accumulation each contribution is summed
  once), hence both copies see the gradient one process sees and take identical optimizer steps.
* **One norm.** The last stage's copy is marked so that the global gradient norm counts the
  weight once (``parallel/grad_norm.py``); clipping still scales both copies alike.
* **Original names.** The end a rank does not run is a parameter-free stub; the copy is registered
  on that stub under the original parameter name too, so every stage rank's ``state_dict`` has the
  keys (and the optimizer state the parameter name) of the one-process model. Checkpoints therefore
  move between pipeline sizes.

Under tensor parallelism the tied embedding and head stay replicated over ``tp`` (see ``_untie``
in ``tensor_parallel/sharding.py``); under FSDP2 both copies are sharded alike (same global
shape, ``Shard(0)`` over equally sized ``dp`` meshes), so the local shards are summed pairwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from picotron_lightning.parallel.grad_norm import TIED_COPY_ATTR
from picotron_lightning.parallel.pipeline_parallel.split import PipelineParts, PipelineSplitError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from picotron_lightning.parallel.pipeline_parallel.options import PipelineOptions


@dataclass(frozen=True)
class TiedPair:
    """One weight used by a first-stage module and a last-stage module (qualified parameter names)."""

    first_module: str
    last_module: str
    attr_first: str
    attr_last: str

    @property
    def first(self) -> str:
        return f"{self.first_module}.{self.attr_first}"

    @property
    def last(self) -> str:
        return f"{self.last_module}.{self.attr_last}"


def find_tied_across_stages(root: nn.Module, parts: PipelineParts) -> list[TiedPair]:
    """The parameters a first-stage module shares with a last-stage module, in a fixed order.

    Only a parameter held directly by the first/last-stage module (``embed_tokens.weight``,
    ``lm_head.weight``) can be tied: the other stage replaces that module by a stub that holds it.
    """
    first: dict[int, tuple[str, str]] = {}
    for name in parts.first:
        for pname, p in root.get_submodule(name).named_parameters():
            first.setdefault(id(p), (name, pname))
    pairs = []
    for name in parts.last:
        for pname, p in root.get_submodule(name).named_parameters():
            if id(p) not in first:
                continue
            first_module, first_attr = first[id(p)]
            if "." in pname or "." in first_attr:
                raise PipelineSplitError(
                    f"`{name}.{pname}` is shared with `{first_module}.{first_attr}` across pipeline stages, but only "
                    "a parameter held directly by a first/last-stage module (e.g. `embed_tokens.weight` and "
                    "`lm_head.weight`) can be tied across stages. Untie them or use pipeline_parallel_size=1."
                )
            pairs.append(TiedPair(first_module, name, first_attr, pname))
    return pairs


def check_tied_supported(pairs: list[TiedPair], options: PipelineOptions) -> None:
    """Refuse tied weights where the two ends cannot be kept as copies on separate ranks."""
    if not pairs:
        return
    pair = pairs[0]
    if options.schedule == "zbv":
        raise PipelineSplitError(
            f"`{pair.last}` is tied to `{pair.first}` (tied input/output embeddings), and pipeline_schedule='zbv' "
            "places the first and the last stage on the same rank, which tied weights do not support. Use "
            "pipeline_schedule='1f1b', 'gpipe', 'interleaved_1f1b' or 'zero_bubble', or untie the weights."
        )
    if options.split == "trace":
        raise PipelineSplitError(
            f"`{pair.last}` is tied to `{pair.first}` (tied input/output embeddings); pipeline_split='trace' does "
            "not support tied weights. Use pipeline_split='structural' (the default)."
        )


class TiedWeights:
    """This rank's part in keeping the tied copies identical: its pair group and the copies it holds."""

    def __init__(self, pairs: list[TiedPair], mesh: DeviceMesh, last_stage_rank: int,
                 holds_first: bool, holds_last: bool) -> None:
        self.pairs = pairs
        self.holds_first, self.holds_last = holds_first, holds_last
        self.group: dist.ProcessGroup | None = None
        self.first_rank = -1  # global rank of this pair's first-stage end
        self.params: list[nn.Parameter] = []
        if not pairs:
            return
        # Every rank creates every pair's group, in the same order (new_group is collective).
        columns = mesh.mesh.reshape(mesh["pp"].size(), -1)
        me = dist.get_rank()
        for column in columns.T.tolist():
            ranks = [column[0], column[last_stage_rank]]
            group = dist.new_group(ranks)
            if me in ranks:
                self.group, self.first_rank = group, ranks[0]

    def attach(self, root: nn.Module) -> None:
        """After data parallelism: register each copy under both names, copy the first end's values, mark copies."""
        self.params = []
        if not (self.holds_first or self.holds_last):
            return  # a middle stage: neither end, and in no pair group
        for pair in self.pairs:
            if self.holds_first:
                param = root.get_submodule(pair.first_module).get_parameter(pair.attr_first)
                other, attr = root.get_submodule(pair.last_module), pair.attr_last
            else:
                param = root.get_submodule(pair.last_module).get_parameter(pair.attr_last)
                other, attr = root.get_submodule(pair.first_module), pair.attr_first
            if other._parameters.get(attr) is not param:  # the stub standing in for the other end
                other.register_parameter(attr, param)
            if self.holds_last and not self.holds_first:
                setattr(param, TIED_COPY_ATTR, True)
            self.params.append(param)
        with torch.no_grad():
            for param in self.params:
                local = _local(param)
                if local.device.type != "meta":
                    dist.broadcast(local, src=self.first_rank, group=self.group)

    def reduce(self, pending: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Sum this step's gradients of the tied copies over the pair; ``pending`` with the summed gradients."""
        if not self.params:
            return pending
        grads = {id(p): g for p, g in pending}
        out = [(p, g) for p, g in pending if not any(p is q for q in self.params)]
        for param in self.params:
            grad = grads.get(id(param))
            local = _local(grad) if grad is not None else torch.zeros_like(_local(param))
            dist.all_reduce(local, group=self.group)  # both ends always call: no rank waits alone
            if grad is None:
                if not bool(local.any()):
                    continue
                grad = _like(param, local)
            out.append((param, grad))
        return out


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` as a gradient of ``param`` (a DTensor with the parameter's placements when it is one)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride())
    return local
