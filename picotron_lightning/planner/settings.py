"""The communication settings the planner chooses for a layout (the "communication optimizer").

Each choice follows from the cost and memory models, with its reason kept for the printed plan:

* FSDP ``reshard_after_forward``: False (one all-gather per unit instead of two) when the extra
  unsharded copy of this rank's parameters still fits the budget; True otherwise.
* FSDP prefetch: one unit ahead in forward and backward (FSDP2's implicit prefetch), enough when a
  unit's gather is shorter than its compute; two when the gathers are exposed.
* DDP bucket size: large enough that a bucket's latency is under 5% of its transfer, small enough
  that the last bucket (never overlapped) is under 1/8 of the gradients; 1-100 MiB.
* gradient reduce dtype: fp32, unless the step computes in bf16 and dp's exposed time exceeds 5% of
  the step, where bf16 halves it.
* microbatches: chosen in the search (the larger counts shrink the bubble (pp-1)/(v*M)).
* EP all-to-all overlaps the shared expert's compute when the model has shared experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from picotron_lightning.planner.comm_model import link_of
from picotron_lightning.planner.cost_model import StepTime
from picotron_lightning.planner.hardware import DeviceSpec
from picotron_lightning.planner.memory_model import MemoryBreakdown, rank_params
from picotron_lightning.planner.model_spec import ModelSpec, ceil_div
from picotron_lightning.planner.search import Candidate

MiB = 1 << 20


@dataclass(frozen=True)
class CommSettings:
    """Communication settings for one layout, each with why."""

    reshard_after_forward: bool | None
    prefetch: int | None
    ddp_bucket_bytes: int | None
    reduce_dtype: str
    reasons: tuple[str, ...]

    def describe(self) -> str:
        parts = []
        if self.reshard_after_forward is not None:
            parts.append(f"reshard_after_forward={self.reshard_after_forward} prefetch={self.prefetch}")
        if self.ddp_bucket_bytes is not None:
            parts.append(f"ddp_bucket={self.ddp_bucket_bytes / MiB:.0f}MiB")
        parts.append(f"reduce_dtype={self.reduce_dtype}")
        return " ".join(parts)


def choose_settings(spec: ModelSpec, c: Candidate, memory: MemoryBreakdown, time: StepTime, device: DeviceSpec,
                    devices_per_node: int, budget: int, precision: str) -> CommSettings:
    reasons: list[str] = []
    held, _ = rank_params(spec, c)
    reshard: bool | None = None
    prefetch: int | None = None
    bucket: int | None = None
    if c.dp_mode in ("fsdp", "hsdp") and c.dp > 1:
        shard = c.dp if c.dp_mode == "fsdp" else c.hsdp_shard
        extra = (held - ceil_div(held, shard)) * 4
        reshard = memory.peak + extra > budget
        reasons.append("reshard_after_forward=True: keeping gathered weights would need "
                       f"{(memory.peak + extra) / MiB:.0f} MiB > budget" if reshard else
                       f"reshard_after_forward=False: +{extra / MiB:.0f} MiB fits and saves one all-gather per unit")
        prefetch = 2 if time.exposed.get("dp", 0.0) > 0.05 * time.total else 1
        reasons.append(f"prefetch={prefetch}: dp exposed {time.exposed.get('dp', 0.0) * 1e3:.1f} ms")
    if c.dp_mode == "ddp" and c.dp > 1:
        link = link_of("dp", c, device, devices_per_node)
        floor = 20 * link.latency * link.bandwidth
        bucket = int(min(max(floor, held * 4 / 8, MiB), 100 * MiB))
        reasons.append(f"ddp bucket {bucket / MiB:.0f} MiB: latency < 5% of a bucket, last bucket <= 1/8 of grads")
    reduce_dtype = "fp32"
    if precision == "bf16" and time.exposed.get("dp", 0.0) > 0.05 * time.total:
        reduce_dtype = "bf16"
        reasons.append("reduce_dtype=bf16: dp communication exposed > 5% of the step")
    return CommSettings(reshard, prefetch, bucket, reduce_dtype, tuple(reasons))
