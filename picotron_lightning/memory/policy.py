"""Budget-driven memory policy: the cheapest policy whose estimated peak fits ``memory_budget``.

The policies, in the order of what they cost per step (the order is fixed; the cost is counted and
shown so the reason for a choice can be read):

=====================  ==================================================  =============================
policy                 what it does                                        what it costs
=====================  ==================================================  =============================
``none``               nothing                                             nothing
``selective``          keep matmul outputs, recompute the rest per block  elementwise recompute
``every_2nd_block``    recompute every other block whole                   half a forward's matmuls
``full``               recompute every block whole                         a forward's block matmuls
``activation_offload`` saved tensors to host and back (``save_on_cpu``)    2x saved bytes over the link
``cpu_offload``        + FSDP2 ``CPUOffloadPolicy`` (params, grads, Adam)  shards over the link, CPU step
=====================  ==================================================  =============================

Recompute FLOPs are counted with :class:`~picotron_lightning.memory.flops.FlopCount` in a step after the
measured one (the formulas of ``torch.utils.flop_counter``, matmuls and attention:
selective recompute's elementwise ops count 0 there), bytes moved from the trace. Offload saves
nothing where the device is the host (CPU runs); those policies are then skipped, with that reason.

This module is pure: :func:`choose_policy` decides from estimates made by
:func:`picotron_lightning.memory.estimate.estimate_policies`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from picotron_lightning.memory.options import MemoryOptions


@dataclass(frozen=True)
class MemoryPolicy:
    """One memory policy: the fields of :class:`MemoryOptions` it sets."""

    name: str
    activation_checkpointing: str = "none"
    checkpoint_every: int = 1
    activation_offload: bool = False
    cpu_offload: bool = False

    @property
    def offloads(self) -> bool:
        return self.activation_offload or self.cpu_offload

    def applied_to(self, memory: MemoryOptions) -> MemoryOptions:
        """``memory`` with this policy's fields (and no budget left to choose with)."""
        return dataclasses.replace(memory, memory_budget=None, activation_checkpointing=self.activation_checkpointing,
                                   checkpoint_every=self.checkpoint_every, activation_offload=self.activation_offload,
                                   cpu_offload=self.cpu_offload)


POLICIES = (
    MemoryPolicy("none"),
    MemoryPolicy("selective", activation_checkpointing="selective"),
    MemoryPolicy("every_2nd_block", activation_checkpointing="full", checkpoint_every=2),
    MemoryPolicy("full", activation_checkpointing="full"),
    MemoryPolicy("activation_offload", activation_offload=True),
    MemoryPolicy("cpu_offload", activation_offload=True, cpu_offload=True),
)
"""Every policy, cheapest first."""


@dataclass(frozen=True)
class PolicyEstimate:
    """One policy's estimate over the ranks of a layout (the worst rank counts)."""

    policy: MemoryPolicy
    peak: int | None  # device bytes of the worst rank; None when the policy does not apply
    recompute_flops: int = 0  # extra FLOPs per step over ``none`` (worst rank)
    bytes_moved: int = 0  # device <-> host bytes per step (worst rank)
    skipped: str = ""  # why the policy does not apply here ("" when it does)
    ranks: tuple[Any, ...] = ()  # every estimated rank's RankEstimate (memory/estimate.py)

    @property
    def routing(self) -> str:
        """The MoE routing charged (``"worst case"``, ``"measured"``), or "" where routing does not matter."""
        return next((r.routing for r in self.ranks if getattr(r, "routing", "")), "")


class MemoryBudgetError(ValueError):
    """No policy's estimated peak fits the budget."""


def resolve_budget(budget: int | float, device_type: str, device_memory: int | None) -> int:
    """The budget in bytes: an int as is; a fraction of ``device_memory`` (required unless the device is CUDA)."""
    if isinstance(budget, int):
        return budget
    if device_memory is None:
        raise ValueError(
            f"`memory_budget={budget!r}` is a fraction of the device's memory, but a {device_type} run has no device "
            "memory of its own to take it of (the ranks share the host); pass bytes (an int), or the total as "
            "`memory={'memory_budget': ..., 'device_memory': <bytes>}`."
        )
    return int(budget * device_memory)


def skip_reason(policy: MemoryPolicy, device_type: str, data_parallel_mode: str) -> str:
    """Why ``policy`` cannot help here ("" when it can)."""
    if policy.offloads and device_type == "cpu":
        return "the device is host memory: offloading to the host frees nothing"
    if policy.cpu_offload and data_parallel_mode not in ("fsdp", "hsdp"):
        return f"FSDP2 CPU offload needs data_parallel_mode fsdp or hsdp, not {data_parallel_mode!r}"
    return ""


def choose_policy(estimates: Sequence[PolicyEstimate], budget: int) -> tuple[PolicyEstimate, str]:
    """The first (cheapest) applicable policy whose peak fits ``budget``, and the reason in words.

    Raises :class:`MemoryBudgetError` naming every policy's estimate and the budget when none fits.
    """
    rejected: list[str] = []
    for estimate in estimates:
        if estimate.skipped:
            rejected.append(f"{estimate.policy.name} skipped ({estimate.skipped})")
            continue
        assert estimate.peak is not None
        if estimate.peak <= budget:
            before = "; ".join(rejected) if rejected else "it is the first policy"
            routing = f", MoE routing charged: {estimate.routing}" if estimate.routing else ""
            reason = (f"memory policy {estimate.policy.name!r}: estimated peak {_mib(estimate.peak)} <= budget "
                      f"{_mib(budget)} per rank{routing}, cost {_cost(estimate)}; cheaper: {before}")
            return estimate, reason
        rejected.append(f"{estimate.policy.name} needs {_mib(estimate.peak)}")
    raise MemoryBudgetError(
        f"`memory_budget` of {_mib(budget)} per rank is smaller than every memory policy's estimated peak:\n"
        + format_policy_table(estimates, budget)
        + "\nRaise the budget, use more ranks (tensor or pipeline parallelism, FSDP), or a smaller micro-batch."
    )


def format_policy_table(estimates: Sequence[PolicyEstimate], budget: int | None = None) -> str:
    """One row per policy: estimated peak (worst rank), recompute FLOPs, bytes moved; readable in a terminal."""
    lines = [f"{'policy':<20} {'peak MiB':>10} {'recompute GFLOP':>16} {'moved MiB':>10}  note"]
    for e in estimates:
        peak = "-" if e.peak is None else f"{e.peak / 2**20:.3f}"
        note = e.skipped or ("" if budget is None else "fits" if e.peak is not None and e.peak <= budget else
                             "over budget")
        lines.append(f"{e.policy.name:<20} {peak:>10} {e.recompute_flops / 1e9:>16.4f} "
                     f"{e.bytes_moved / 2**20:>10.3f}  {note}")
    if budget is not None:
        lines.append(f"(budget {budget / 2**20:.3f} MiB per rank)")
    routing = next((e.routing for e in estimates if e.routing), "")
    if routing:
        lines.append(f"(MoE routing charged: {routing}; memory.moe_routing chooses)")
    return "\n".join(lines)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def _cost(estimate: PolicyEstimate) -> str:
    if not estimate.recompute_flops and not estimate.bytes_moved:
        return "no recompute, nothing moved" if estimate.policy.name == "none" else (
            "recompute of elementwise ops only (0 matmul FLOPs)")
    return f"{estimate.recompute_flops / 1e9:.4f} GFLOP recomputed, {_mib(estimate.bytes_moved)} moved"
