"""Time of one optimizer step: compute, the communication each dimension leaves exposed, and the bubble.

* compute: the rank's FLOPs (exact per block, from ``FlopCounterMode``; divided by tp, by the blocks
  it holds; recomputed forwards added: whole blocks under full
  checkpointing, everything but the nn.Linear layers under selective) over the device's achievable FLOP/s.
* exposed communication: tp's collectives and pipeline sends sit on the critical path (no overlap);
  DDP's all-reduce overlaps backward except for its last bucket; FSDP's gathers overlap the compute
  of the previous unit (prefetch) except for the first unit, and its reduce-scatters overlap backward.
  Whatever does not fit under the compute it overlaps with is exposed.
* overhead (``overhead.py``): host costs that are neither FLOPs nor communication: per-op dispatch,
  the optimizer's per-tensor loop and passes over memory, FSDP's buffer copies. Zero on GPUs.
* bubble: (pp - 1) / (v * M) of the pipeline's compute and dispatch (1F1B and interleaved 1F1B).
* more processes than cores (CPU): compute and overhead are stretched by ``DeviceSpec.sharing_factor``.

With a block calibration (``DeviceSpec.calibration``, CPU, ``plan --calibrate``) a candidate whose style was
measured is composed from the measured block costs instead (``calibration.compose_step``): compute is the
measured forward + backward (its tp and dp collectives and host work inside), overhead the measured
optimizer step, exposed communication only the pipeline's sends over the probed link.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from picotron_lightning.planner.calibration import compose_step, style_of
from picotron_lightning.planner.comm_model import Collective, accumulation_steps, collectives, link_of
from picotron_lightning.planner.hardware import DeviceSpec
from picotron_lightning.planner.memory_model import blocks_per_rank, rank_params
from picotron_lightning.planner.model_spec import ModelSpec
from picotron_lightning.planner.overhead import overheads
from picotron_lightning.planner.search import Candidate

DDP_BUCKET_BYTES = 25 << 20


def rank_flops(spec: ModelSpec, c: Candidate) -> float:
    """FLOPs of one optimizer step on the most loaded rank (forward + backward + recomputation)."""
    blocks = blocks_per_rank(spec, c.pp)
    block = max(spec.block_flops)
    # Under ep a rank's experts serve ep times the tokens of 1/ep of the experts: on average (balanced
    # routing) the same FLOPs per rank as without ep, so ``block`` stays.
    recompute = {"none": 0.0, "full": max(spec.block_forward_flops),
                 "selective": max(f - lin for f, lin in zip(spec.block_forward_flops, spec.block_linear_forward_flops,
                                                            strict=True))}[c.checkpointing]
    samples = c.micro_batch_size * c.num_microbatches
    # The last stage carries the head too (the splitter gives it no fewer blocks when they divide evenly).
    return samples * (blocks * (block + recompute) + spec.outer_flops) / c.tp


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one optimizer step on the most loaded rank."""

    compute: float
    exposed: dict[str, float] = field(default_factory=dict)
    bubble: float = 0.0
    overhead: dict[str, float] = field(default_factory=dict)
    """Host costs (``overhead.py``): dispatch, optimizer, copies."""

    @property
    def total(self) -> float:
        return self.compute + sum(self.exposed.values()) + self.bubble + sum(self.overhead.values())


def calibrated_step_time(spec: ModelSpec, c: Candidate, device: DeviceSpec, devices_per_node: int,
                         precision: str = "fp32") -> StepTime | None:
    """The step composed from the device's measured block costs, or None where its style was not measured."""
    calibration = device.calibration
    cost = calibration.cost(style_of(c)) if calibration is not None else None
    if calibration is None or cost is None:
        return None
    processes = min(devices_per_node, c.world_size)
    # The probe ran `calibration.processes` processes at once; scale to this run's sharing of the cores.
    scale = device.sharing_factor(processes)
    per_core = max(1.0, processes / device.cores) if device.cores else 1.0
    composed = compose_step(cost, c, blocks_per_rank(spec, c.pp), per_core)
    exposed: dict[str, float] = {"tp": 0.0, "dp": 0.0}  # measured inside the style's forward and backward
    if c.pp > 1:
        link = link_of("pp", c, device, devices_per_node)
        act_bytes = 2 if precision in ("bf16", "fp16") else 4
        exposed["pp"] = sum(i.seconds(link) for i in collectives(spec, c, act_bytes=act_bytes) if i.dim == "pp")
    return StepTime(composed.compute * scale, exposed, composed.bubble * scale,
                    {"dispatch": 0.0, "optimizer": composed.optimizer * scale, "copies": 0.0})


def step_time(spec: ModelSpec, c: Candidate, device: DeviceSpec, devices_per_node: int, precision: str = "fp32",
              reshard_after_forward: bool = True, ddp_bucket_bytes: int = DDP_BUCKET_BYTES) -> StepTime:
    calibrated = calibrated_step_time(spec, c, device, devices_per_node, precision)
    if calibrated is not None:
        return calibrated
    sharing = device.sharing_factor(min(devices_per_node, c.dp * c.tp * c.pp))  # processes on one node
    compute = rank_flops(spec, c) / device.flops_per_second(precision) * sharing
    forward = compute / 3.0
    backward = compute - forward
    exposed: dict[str, float] = {}
    items = collectives(spec, c, reshard_after_forward, act_bytes=2 if precision in ("bf16", "fp16") else 4)
    by_dim: dict[str, list[Collective]] = {}
    for item in items:
        by_dim.setdefault(item.dim, []).append(item)
    for dim, dim_items in by_dim.items():
        link = link_of(dim, c, device, devices_per_node)
        seconds = sum(i.seconds(link) for i in dim_items)
        if dim == "dp" and c.dp_mode == "ddp":
            held, _ = rank_params(spec, c)
            last_bucket = min(ddp_bucket_bytes, held * 4) / max(held * 4, 1)
            exposed[dim] = max(seconds - backward, 0.0) + seconds * last_bucket
        elif dim == "dp":
            _, unit = rank_params(spec, c)
            first = sum(i.seconds(link) / max(i.count, 1) for i in dim_items if i.kind == "all_gather" and i.count)
            # The first unit's gather of every forward-backward pass (each accumulation micro-batch) is exposed.
            exposed[dim] = max(seconds - compute, 0.0) + first * accumulation_steps(c)
        else:
            exposed[dim] = seconds
    overhead = {k: v * sharing for k, v in overheads(spec, c, device, by_dim.get("dp", [])).items()}
    bubble = 0.0
    if c.pp > 1:
        # A stage's idle time is (pp - 1) of its per-microbatch work, host dispatch included.
        bubble = (compute + overhead["dispatch"]) * (c.pp - 1) / (c.virtual_stages * c.num_microbatches)
    return StepTime(compute, exposed, bubble, overhead)
