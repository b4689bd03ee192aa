"""Searching, ranking and printing: the planner's entry point :func:`plan_layout` and its table."""

from __future__ import annotations

from dataclasses import dataclass, field

from picotron_lightning.planner.cost_model import StepTime, step_time
from picotron_lightning.planner.hardware import DeviceSpec, GiB, Link
from picotron_lightning.planner.memory_model import MemoryBreakdown, estimate
from picotron_lightning.planner.model_spec import ModelSpec
from picotron_lightning.planner.search import Candidate, Constraints, Rejection, SearchSpace
from picotron_lightning.planner.settings import CommSettings, choose_settings

BUDGET_SHARE = 0.9  # of device memory: the allocator's caching and fragmentation need the rest


class PlanError(ValueError):
    """No layout can run, or the planner's inputs contradict each other."""


@dataclass(frozen=True)
class PlannedLayout:
    """A candidate that fits, with its predicted memory, step time and communication settings."""

    candidate: Candidate
    memory: MemoryBreakdown
    time: StepTime
    settings: CommSettings


@dataclass
class PlanResult:
    """Every fitting layout, fastest first, and every rejected one with its reason."""

    spec: ModelSpec
    device: DeviceSpec
    world_size: int
    devices_per_node: int
    global_batch: int | None
    budget: int
    ranked: list[PlannedLayout] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def best(self) -> PlannedLayout:
        return self.ranked[0]

    def table(self, top: int | None = 15, show_rejected: bool = True) -> str:
        """The ranked table (``top`` rows; None: all) and, below it, every rejected candidate and why."""
        lines = [
            f"{self.spec.name}: {self.spec.total_params / 1e9:.3f}B parameters, {self.spec.num_blocks} blocks, "
            f"seq {self.spec.seq_len}, global batch {self.global_batch or 'per-rank'}; "
            f"{self.world_size} x {self.device.name} "
            f"({self.devices_per_node} per node), budget {self.budget / GiB:.2f} GiB per rank",
            f"links: within a node {_link(self.device.intra_node)}; across nodes {_link(self.device.inter_node)}",
            f"{'#':>3}  {'layout':<58} {'mem GiB':>8} {'step ms':>10} {'compute':>9} {'tp':>7} {'dp':>7} "
            f"{'pp':>7} {'ep':>7} {'bubble':>8} {'host':>8}  settings",
        ]
        for i, p in enumerate(self.ranked[:top] if top else self.ranked, 1):
            t = p.time
            dims = " ".join(f"{t.exposed.get(d, 0.0) * 1e3:>7.1f}" for d in ("tp", "dp", "pp", "ep"))
            lines.append(f"{i:>3}  {p.candidate.describe():<58} {p.memory.peak / GiB:>8.2f} {t.total * 1e3:>10.1f} "
                         f"{t.compute * 1e3:>9.1f} {dims} {t.bubble * 1e3:>8.1f} "
                         f"{sum(t.overhead.values()) * 1e3:>8.1f}  {p.settings.describe()}")
        if top and len(self.ranked) > top:
            lines.append(f"     ... {len(self.ranked) - top} more layouts fit (--top 0 lists all)")
        if show_rejected and self.rejected:
            lines.append(f"rejected ({len(self.rejected)}):")
            lines += [f"  {r.layout}: {r.reason}" for r in self.rejected]
        return "\n".join(lines)


def check_inputs(world_size: int, devices_per_node: int, batch: int, constraints: Constraints) -> None:
    """Refuse contradictory inputs before any search (and long before any process group)."""
    for name, value in (("devices", world_size), ("devices_per_node", devices_per_node), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"`{name}` must be a positive integer, got {value!r}.")
    if world_size > devices_per_node and world_size % devices_per_node:
        raise PlanError(f"devices={world_size} is not a whole number of nodes of devices_per_node="
                        f"{devices_per_node}; use a multiple of {devices_per_node}.")
    fixed = [(n, v) for n, v in (("data_parallel_size", constraints.dp), ("tensor_parallel_size", constraints.tp),
                                 ("pipeline_parallel_size", constraints.pp)) if v is not None]
    product = 1
    for _, v in fixed:
        product *= v
    if world_size % product:
        sizes = " x ".join(f"{n}={v}" for n, v in fixed)
        raise PlanError(f"{sizes} = {product} does not divide the world size {world_size}; leave one of them "
                        "'auto' or choose sizes whose product divides it.")
    if len(fixed) == 3 and product != world_size:
        raise PlanError(f"data x tensor x pipeline sizes = {product} != world size {world_size}.")
    if constraints.ep is not None and constraints.dp is not None and constraints.dp % constraints.ep:
        raise PlanError(f"expert_parallel_size={constraints.ep} must divide data_parallel_size={constraints.dp}.")


def plan_layout(spec: ModelSpec, *, devices: int, devices_per_node: int, device: DeviceSpec,
                global_batch: int | None, local_batch: int | None = None, memory_budget: int | None = None,
                constraints: Constraints | None = None, precision: str = "fp32") -> PlanResult:
    """Every layout of ``devices`` ranks for ``spec``, fastest per sample first; raises PlanError if none fits.

    Give ``global_batch`` (samples per step over all replicas) or ``local_batch`` (per data-parallel rank,
    as a Lightning loader's ``batch_size``).
    """
    constraints = constraints or Constraints()
    if (global_batch is None) == (local_batch is None):
        raise PlanError("give exactly one of `global_batch` and `local_batch`.")
    check_inputs(devices, devices_per_node, global_batch or local_batch or 0, constraints)
    budget = memory_budget if memory_budget is not None else int(device.memory_bytes * BUDGET_SHARE)
    space = SearchSpace(spec, devices, min(devices_per_node, devices), global_batch, constraints,
                        local_batch=local_batch)
    result = PlanResult(spec, device, devices, devices_per_node, global_batch, budget)
    smallest: tuple[int, str] | None = None
    for c in space.candidates():
        memory = estimate(spec, c, precision)
        if memory.peak > budget:
            space.rejected.append(Rejection(c.describe(), f"predicted peak {memory.peak / GiB:.2f} GiB > "
                                                          f"budget {budget / GiB:.2f} GiB"))
            if smallest is None or memory.peak < smallest[0]:
                smallest = (memory.peak, c.describe())
            continue
        time = step_time(spec, c, device, devices_per_node, precision)
        settings = choose_settings(spec, c, memory, time, device, devices_per_node, budget, precision)
        if settings.reshard_after_forward is False:
            time = step_time(spec, c, device, devices_per_node, precision, reshard_after_forward=False)
        result.ranked.append(PlannedLayout(c, memory, time, settings))
    result.rejected = space.rejected
    if not result.ranked:
        hint = (f"; the smallest predicted peak is {smallest[0] / GiB:.2f} GiB ({smallest[1]}) against a budget of "
                f"{budget / GiB:.2f} GiB: use more devices, a smaller global batch or sequence, or a larger device"
                if smallest else "")
        reasons = sorted({r.reason for r in space.rejected})[:8]
        raise PlanError(f"No layout of {devices} devices fits {spec.name}{hint}. Reasons: {reasons}")
    # Per sample: with a per-rank batch the global batch differs between layouts.
    # At equal predicted time, fewer micro-batches first: the cost model charges accumulation no overhead
    # per micro-batch, but smaller matmuls run further from peak.
    result.ranked.sort(key=lambda p: (p.time.total / space.batch_of(p.candidate.dp), p.candidate.num_microbatches,
                                      p.memory.peak, p.candidate.describe()))
    return result


def _link(link: Link) -> str:
    return f"{link.name} ({link.bandwidth / 1e9:.2f} GB/s, {link.latency * 1e6:.0f} us)"
