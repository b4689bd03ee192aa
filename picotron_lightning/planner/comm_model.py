"""Bytes each collective of one training step moves, per mesh dimension, for a candidate layout.

"Bytes" is the collective's whole buffer, as nccl-tests counts it: the tensor all-reduced, the
*output* of an all-gather, the *input* of a reduce-scatter or all-to-all, the tensor sent point to
point. Time on a link is then ``latency + factor(n) * bytes / bus_bandwidth`` with the ring factor
2(n-1)/n for all-reduce, (n-1)/n for all-gather, reduce-scatter and all-to-all, and 1 for p2p.

What runs, per dimension (T tokens per microbatch, d hidden, V vocabulary, 4-byte activations):

* tp (sequence parallel): per block and microbatch two all-gathers and two reduce-scatters of T*d
  in forward, the same two of each in backward; around the blocks the vocabulary-parallel
  embedding's reduce-scatter and the head's input all-gather (mirrored in backward), and the
  logits' all-gather of T*V in forward.
* dp: DDP all-reduces every gradient it holds once per step; FSDP all-gathers each unit (padded
  to a multiple of dp per parameter) in forward and again in backward when it resharded, and
  reduce-scatters the unit's gradients.
* pp: each microbatch's activation to the next stage in forward, its gradient back in backward.
* ep: per MoE block and microbatch, dispatch and combine all-to-alls of T*top_k*d in forward and
  in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from picotron_lightning.planner.hardware import DeviceSpec, Link
from picotron_lightning.planner.memory_model import blocks_per_rank, rank_params
from picotron_lightning.planner.model_spec import ModelSpec, ceil_div
from picotron_lightning.planner.search import Candidate

FACTORS = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
           "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n, "send": lambda n: 1.0}


@dataclass(frozen=True)
class Collective:
    """``count`` calls of one collective kind over a group of ``group_size`` ranks, ``nbytes`` each."""

    dim: str
    kind: str
    nbytes: int
    count: int
    group_size: int

    @property
    def total_bytes(self) -> int:
        return self.nbytes * self.count

    def seconds(self, link: Link) -> float:
        if self.group_size == 1 or self.count == 0:
            return 0.0
        return self.count * (link.latency + FACTORS[self.kind](self.group_size) * self.nbytes / link.bandwidth)


def tp_collectives(spec: ModelSpec, c: Candidate, sequence_parallel: bool = True) -> list[Collective]:
    if c.tp == 1:
        return []
    act = c.micro_batch_size * spec.seq_len * spec.hidden * 4
    per_step = c.num_microbatches * blocks_per_rank(spec, c.pp)
    out: list[Collective] = []
    if sequence_parallel:
        out += [Collective("tp", "all_gather", act, 4 * per_step, c.tp),
                Collective("tp", "reduce_scatter", act, 4 * per_step, c.tp)]
    else:
        out += [Collective("tp", "all_reduce", act, 4 * per_step, c.tp)]
    # Around the stack: embedding output (first stage) and head input (last stage), mirrored in backward,
    # and the logits' gather. With pp == 1 one rank does both ends.
    ends = c.num_microbatches * (2 if c.pp == 1 else 1)
    out += [Collective("tp", "reduce_scatter", act, ends, c.tp), Collective("tp", "all_gather", act, ends, c.tp)]
    logits = c.micro_batch_size * spec.seq_len * spec.vocab * 4
    out.append(Collective("tp", "all_gather", logits, c.num_microbatches, c.tp))
    return out


def dp_collectives(spec: ModelSpec, c: Candidate, reshard_after_forward: bool = True) -> list[Collective]:
    if c.dp == 1:
        return []
    held, unit = rank_params(spec, c)
    replicas = c.dp // c.hsdp_shard if c.dp_mode == "hsdp" else 1
    if c.dp_mode == "ddp":
        return [Collective("dp", "all_reduce", held * 4, 1, c.dp)]
    shard = c.dp if c.dp_mode == "fsdp" else c.hsdp_shard
    blocks = blocks_per_rank(spec, c.pp)
    padded_unit = ceil_div(unit, shard) * shard * 4  # whole-parameter padding is below this bound's resolution
    rest = max(held - blocks * unit, 0)
    padded_rest = ceil_div(rest, shard) * shard * 4
    gathers = 2 if reshard_after_forward else 1
    out = [Collective("dp", "all_gather", padded_unit, blocks * gathers, shard),
           Collective("dp", "all_gather", padded_rest, 1 if rest else 0, shard),
           Collective("dp", "reduce_scatter", padded_unit, blocks, shard),
           Collective("dp", "reduce_scatter", padded_rest, 1 if rest else 0, shard)]
    if replicas > 1:
        out.append(Collective("dp", "all_reduce", ceil_div(held, shard) * 4, 1, replicas))
    return out


def pp_collectives(spec: ModelSpec, c: Candidate) -> list[Collective]:
    if c.pp == 1:
        return []
    act = c.micro_batch_size * spec.seq_len * spec.hidden * 4
    # A middle rank sends every microbatch's activation forward and its gradient backward, once per virtual stage.
    return [Collective("pp", "send", act, 2 * c.num_microbatches * c.virtual_stages, 2)]


def ep_collectives(spec: ModelSpec, c: Candidate) -> list[Collective]:
    if c.ep == 1 or not spec.num_experts:
        return []
    moe_blocks = sum(1 for e in spec.block_expert_params if e) * blocks_per_rank(spec, c.pp) // spec.num_blocks
    routed = c.micro_batch_size * spec.seq_len * spec.top_k * spec.hidden * 4
    return [Collective("ep", "all_to_all", routed, 4 * c.num_microbatches * max(moe_blocks, 1), c.ep)]


def collectives(spec: ModelSpec, c: Candidate, reshard_after_forward: bool = True) -> list[Collective]:
    """Every collective of one optimizer step on the most loaded rank."""
    return (tp_collectives(spec, c) + dp_collectives(spec, c, reshard_after_forward)
            + pp_collectives(spec, c) + ep_collectives(spec, c))


def bytes_per_dim(items: list[Collective]) -> dict[str, dict[str, int]]:
    """``{dim: {kind: total bytes}}``, the shape the counting on real ranks produces."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        if item.count and item.group_size > 1:
            kinds = out.setdefault(item.dim, {})
            kinds[item.kind] = kinds.get(item.kind, 0) + item.total_bytes
    return out


def link_of(dim: str, c: Candidate, device: DeviceSpec, devices_per_node: int) -> Link:
    """Which link a dimension's group crosses: mesh order is pp, dp, tp (tp innermost)."""
    span = {"tp": c.tp, "dp": c.tp * (c.hsdp_shard if c.dp_mode == "hsdp" else c.dp), "ep": c.tp * c.ep,
            "pp": c.tp * c.dp * c.pp}[dim]
    return device.intra_node if span <= devices_per_node else device.inter_node
