"""ParallelLayout: how the world of ranks is divided into pipeline, data, tensor and expert groups.

The layout is pure arithmetic until `build_device_mesh` is called, so every size can be checked
against the world size *before* a single process group exists. A wrong size must fail here, with
a message, instead of hanging inside the first collective.

Mesh order, outer to inner: ``pp, dp, tp``. Tensor parallel ranks are neighbours (rank r and
r+1), the fastest links on a node. Expert parallelism takes its ranks from ``dp``: the ``dp``
ranks of one ``(pp, tp)`` coordinate are split into ``dp / ep`` replicas of ``ep`` consecutive
ranks each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

from picotron_lightning._util import divisors

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

SizeArg = int | Literal["auto"]

MESH_DIM_NAMES = ("pp", "dp", "tp")
HSDP_MESH_DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")
EXPERT_MESH_DIM_NAMES = ("pp", "ep_replicate", "ep", "tp")


class LayoutError(ValueError):
    """A parallel size that cannot work with the world size or the model."""


class RankCoordinates(NamedTuple):
    """Where one global rank sits in the layout."""

    pp: int
    dp: int
    tp: int
    ep: int
    ep_replicate: int


def _check_positive_int(name: str, value: object, allow_auto: bool = False) -> None:
    if allow_auto and value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = "a positive integer or 'auto'" if allow_auto else "a positive integer"
        raise LayoutError(f"`{name}` must be {what}, got {value!r}.")


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of each parallel dimension, with ``"auto"`` allowed for ``data_parallel_size``.

    Call :meth:`resolve` with the world size to get a layout whose sizes are all integers and
    known to multiply to that world size.
    """

    data_parallel_size: SizeArg = "auto"
    tensor_parallel_size: SizeArg = 1
    pipeline_parallel_size: SizeArg = 1
    expert_parallel_size: SizeArg = 1
    # Reserved, not a strategy argument yet: context parallelism is not implemented.
    context_parallel_size: int = field(default=1, metadata={"flat": None})

    def __post_init__(self) -> None:
        _check_positive_int("data_parallel_size", self.data_parallel_size, allow_auto=True)
        # "auto" here means: the layout planner (picotron_lightning.planner) chooses it from the model.
        _check_positive_int("tensor_parallel_size", self.tensor_parallel_size, allow_auto=True)
        _check_positive_int("pipeline_parallel_size", self.pipeline_parallel_size, allow_auto=True)
        _check_positive_int("expert_parallel_size", self.expert_parallel_size, allow_auto=True)
        if self.context_parallel_size != 1:
            raise LayoutError(
                f"`context_parallel_size={self.context_parallel_size}` is not supported yet; use 1."
            )

    # ------------------------------------------------------------------ resolution
    @property
    def is_resolved(self) -> bool:
        return self.data_parallel_size != "auto" and not self.needs_plan

    @property
    def dp(self) -> int:
        self._require_resolved()
        assert isinstance(self.data_parallel_size, int)
        return self.data_parallel_size

    @property
    def needs_plan(self) -> bool:
        """Whether a tensor, pipeline or expert size is ``"auto"``: the planner must choose it first."""
        return "auto" in (self.tensor_parallel_size, self.pipeline_parallel_size, self.expert_parallel_size)

    def _planned(self, name: str, value: SizeArg) -> int:
        if value == "auto":
            raise LayoutError(f"`{name}='auto'` has not been planned yet: the strategy plans it from the model "
                              "before the process group exists (picotron_lightning.planner).")
        assert isinstance(value, int)
        return value

    @property
    def tp(self) -> int:
        return self._planned("tensor_parallel_size", self.tensor_parallel_size)

    @property
    def pp(self) -> int:
        return self._planned("pipeline_parallel_size", self.pipeline_parallel_size)

    @property
    def ep(self) -> int:
        return self._planned("expert_parallel_size", self.expert_parallel_size)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def _require_resolved(self) -> None:
        if not self.is_resolved:
            raise LayoutError("The layout still has data_parallel_size='auto'; call `resolve(world_size)` first.")

    def resolve(self, world_size: int) -> ParallelLayout:
        """Fill ``"auto"`` and check every size against ``world_size``; raise `LayoutError` if impossible."""
        _check_positive_int("world_size", world_size)
        tp, pp, ep = self.tp, self.pp, self.ep
        model_parallel = tp * pp
        if world_size % model_parallel != 0:
            raise LayoutError(
                f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} = {model_parallel} does not divide"
                f" the world size {world_size} (devices x num_nodes). Sizes that would work:"
                f" tensor_parallel_size x pipeline_parallel_size in {divisors(world_size)}."
            )
        dp = self.data_parallel_size
        if dp == "auto":
            dp = world_size // model_parallel
        elif dp * model_parallel != world_size:
            working = world_size // model_parallel
            raise LayoutError(
                f"data_parallel_size={dp} x tensor_parallel_size={tp} x pipeline_parallel_size={pp}"
                f" = {dp * model_parallel} does not equal the world size {world_size} (devices x num_nodes)."
                f" With these tensor and pipeline sizes, data_parallel_size={working} would work,"
                f" or pass data_parallel_size='auto'."
            )
        if dp % ep != 0:
            raise LayoutError(
                f"expert_parallel_size={ep} must divide data_parallel_size={dp} (expert parallel ranks are"
                f" drawn from the data-parallel ranks). Sizes that would work: expert_parallel_size in"
                f" {divisors(dp)}."
            )
        return ParallelLayout(dp, tp, pp, ep, self.context_parallel_size)

    # ------------------------------------------------------------------ coordinates
    def coordinates(self, rank: int) -> RankCoordinates:
        """Coordinates of global ``rank``; rank = (pp_index * dp + dp_index) * tp + tp_index."""
        self._require_resolved()
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside the world of size {self.world_size}.")
        tp_index = rank % self.tp
        dp_index = (rank // self.tp) % self.dp
        pp_index = rank // (self.tp * self.dp)
        return RankCoordinates(
            pp=pp_index, dp=dp_index, tp=tp_index, ep=dp_index % self.ep, ep_replicate=dp_index // self.ep
        )

    def rank_of(self, pp: int = 0, dp: int = 0, tp: int = 0) -> int:
        """Global rank at the given coordinates (inverse of :meth:`coordinates`)."""
        self._require_resolved()
        return (pp * self.dp + dp) * self.tp + tp

    # ------------------------------------------------------------------ meshes
    def hsdp_shard_size(self, requested: int | Literal["auto"], local_processes: int) -> int:
        """Ranks per HSDP shard group: ``requested``, or for ``"auto"`` the data-parallel ranks of one node.

        Raises `LayoutError` (before any process group exists) if it does not divide ``dp``.
        """
        self._require_resolved()
        shard = requested
        if shard == "auto":
            shard = math.gcd(self.dp, max(1, local_processes // (self.tp * self.pp)))
        if self.dp % shard:
            raise LayoutError(
                f"hsdp_shard_size={shard} must divide data_parallel_size={self.dp}; sizes that would work: "
                f"{divisors(self.dp)}."
            )
        return shard

    def build_device_mesh(self, device_type: str, hsdp_shard_size: int | None = None) -> DeviceMesh:
        """The ``(pp, dp, tp)`` DeviceMesh over all ranks. Creates process groups: call on every rank.

        With ``hsdp_shard_size`` the mesh is ``(pp, dp_replicate, dp_shard, tp)`` and ``dp`` is the
        flattened ``dp_replicate x dp_shard``, so every other step still reads ``mesh["dp"]``.
        """
        from torch.distributed.device_mesh import init_device_mesh

        self._require_resolved()
        if hsdp_shard_size is None:
            return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=MESH_DIM_NAMES)
        shape = (self.pp, self.dp // hsdp_shard_size, hsdp_shard_size, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=HSDP_MESH_DIM_NAMES)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return mesh

    def build_expert_mesh(self, device_type: str) -> DeviceMesh:
        """The ``(pp, ep_replicate, ep, tp)`` view used by expert parallelism.

        ``ep`` holds the ranks that exchange tokens; ``ep_replicate`` holds the copies of the same
        experts, over which expert gradients are reduced.
        """
        import torch
        from torch.distributed.device_mesh import DeviceMesh

        self._require_resolved()
        ranks = torch.arange(self.world_size).reshape(self.pp, self.dp // self.ep, self.ep, self.tp)
        return DeviceMesh(device_type, ranks, mesh_dim_names=EXPERT_MESH_DIM_NAMES)

    def describe(self) -> str:
        if self.needs_plan:
            return (f"dp={self.data_parallel_size} tp={self.tensor_parallel_size} pp={self.pipeline_parallel_size} "
                    f"ep={self.expert_parallel_size} (to be planned)")
        if not self.is_resolved:
            return f"dp=auto tp={self.tp} pp={self.pp} ep={self.ep}"
        return f"pp={self.pp} x dp={self.dp} x tp={self.tp} (ep={self.ep} within dp) = {self.world_size} ranks"
