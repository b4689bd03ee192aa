"""Host-side costs of a step that are not FLOPs or communication: what dominates small models on CPU.

* dispatch: every aten operation costs the host ``op_seconds`` (``dtensor_op_seconds`` on DTensors) on
  top of its arithmetic. The step runs the blocks' counted operations once per forward-backward pass
  (each pipeline microbatch or accumulation micro-batch: a fixed cost per microbatch), plus the
  recomputed forwards under checkpointing. Under tensor parallelism the blocks' operations run on
  DTensors (sharded weights, sequence-parallel norms), so they are charged at the DTensor rate.
* optimizer: AdamW's per-tensor loop (its operations counted on a real one-element step) at the
  plain or the DTensor rate (FSDP and tp parameters are DTensors), plus each of those operations
  passing over the rank's parameters once at the copy bandwidth.
* copies: FSDP copies each all-gather's shard into the gather buffer and the gathered buffer out into
  the parameters, and each reduce-scatter's gradients in and its shard out; DDP divides its
  all-reduced bucket once. Their bytes are the dp collectives' bytes, at the copy bandwidth.

All three are zero on devices whose table sets the rates to 0 (GPUs: see ``hardware.DeviceSpec``).
"""

from __future__ import annotations

from functools import lru_cache

from picotron_lightning.planner.comm_model import Collective
from picotron_lightning.planner.hardware import DeviceSpec
from picotron_lightning.planner.memory_model import blocks_per_rank, rank_params
from picotron_lightning.planner.model_spec import ModelSpec
from picotron_lightning.planner.search import Candidate


def rank_ops(spec: ModelSpec, c: Candidate) -> int:
    """aten operations the most loaded rank dispatches in its forward-backward passes of one optimizer step."""
    if not spec.block_ops:
        return 0
    blocks = blocks_per_rank(spec, c.pp)
    forward = max(spec.block_forward_ops)
    recompute = {"none": 0, "full": forward,
                 "selective": forward - max(spec.block_linear_forward_ops)}[c.checkpointing]
    return c.num_microbatches * (blocks * (max(spec.block_ops) + recompute) + spec.outer_ops)


@lru_cache(maxsize=1)
def adamw_ops_per_tensor() -> float:
    """aten operations ``torch.optim.AdamW.step`` runs per parameter tensor (counted on a real CPU step)."""
    import torch

    from picotron_lightning.memory.flops import FlopCount

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(4)]
    for p in params:
        p.grad = torch.zeros(1)
    optimizer = torch.optim.AdamW(params)
    optimizer.step()  # the first step creates the state; count a steady one
    counter = FlopCount()
    with counter:
        optimizer.step()
    return counter.ops / len(params)


def rank_param_tensors(spec: ModelSpec, c: Candidate) -> int:
    """Parameter tensors the most loaded rank's optimizer steps (its blocks, and everything outside them)."""
    if not spec.block_param_tensors:
        return 0
    return blocks_per_rank(spec, c.pp) * max(spec.block_param_tensors) + spec.outer_param_tensors


def params_are_dtensors(c: Candidate) -> bool:
    """FSDP/HSDP shards (dp > 1) and tp's sharded weights are DTensors; DDP and plain pp stages are not."""
    return c.tp > 1 or (c.dp > 1 and c.dp_mode in ("fsdp", "hsdp"))


def copy_bytes(c: Candidate, dp_items: list[Collective]) -> float:
    """Bytes FSDP (or DDP) copies around its dp collectives in one step (see the module docstring)."""
    total = 0.0
    for item in dp_items:
        if item.dim != "dp" or item.group_size == 1:
            continue
        if item.kind in ("all_gather", "reduce_scatter"):
            # the whole buffer one way (gathered out / gradients in), the rank's shard the other way
            total += item.total_bytes * (1 + 1 / item.group_size)
        elif item.kind == "all_reduce" and c.dp_mode == "ddp":
            total += item.total_bytes  # the averaged bucket: one pass over it
    return total


def overheads(spec: ModelSpec, c: Candidate, device: DeviceSpec, dp_items: list[Collective]) -> dict[str, float]:
    """Seconds of dispatch, optimizer and copies on the most loaded rank (before core sharing)."""
    op = device.dtensor_op_seconds if c.tp > 1 else device.op_seconds
    out = {"dispatch": rank_ops(spec, c) * op}
    optimizer_ops = rank_param_tensors(spec, c) * adamw_ops_per_tensor() if device.op_seconds else 0.0
    optimizer_op = device.dtensor_op_seconds if params_are_dtensors(c) else device.op_seconds
    held, _ = rank_params(spec, c)
    shard = {"fsdp": c.dp, "hsdp": c.hsdp_shard}.get(c.dp_mode, 1) if c.dp > 1 else 1
    passes = adamw_ops_per_tensor() * held / shard * 4  # each operation passes over the rank's fp32 shard once
    out["optimizer"] = optimizer_ops * optimizer_op + (passes / device.copy_bandwidth if device.copy_bandwidth else 0.0)
    out["copies"] = copy_bytes(c, dp_items) / device.copy_bandwidth if device.copy_bandwidth else 0.0
    return out
