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
  reduce-scatters the unit's gradients. Under gradient accumulation (pp=1, M micro-batches, sync
  off until the last) the gathers repeat per micro-batch, the reductions run once.
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
           "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n, "send": lambda n: 1.0,
           "broadcast": lambda n: 1.0}


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


def _ends(c: Candidate, stage: int | None) -> tuple[bool, bool]:
    """(holds the embedding, holds the head) for pipeline rank ``stage`` (None: the most loaded, the last)."""
    if c.pp == 1:
        return True, True
    stage = c.pp - 1 if stage is None else stage
    return stage == 0, stage == c.pp - 1


def tp_collectives(spec: ModelSpec, c: Candidate, stage: int | None = None,
                   sequence_parallel: bool = True, act_bytes: int = 4) -> list[Collective]:
    if c.tp == 1:
        return []
    act = c.micro_batch_size * spec.seq_len * spec.hidden * act_bytes
    m = c.num_microbatches
    per_step = m * blocks_per_rank(spec, c.pp)
    out: list[Collective] = []
    if sequence_parallel:  # each of attention and MLP: gather the sequence in, reduce-scatter out; mirrored
        out += [Collective("tp", "all_gather", act, 4 * per_step, c.tp),
                Collective("tp", "reduce_scatter", act, 4 * per_step, c.tp)]
    else:
        out += [Collective("tp", "all_reduce", act, 4 * per_step, c.tp)]
    embedding, head = _ends(c, stage)
    # The vocabulary-parallel embedding all-reduces its partial output; the head gathers its input and its
    # gradient is all-reduced; each mirrored in backward by an all-gather / all-reduce of the same size.
    ends = int(embedding) + int(head)
    out += [Collective("tp", "all_reduce", act, m * ends, c.tp), Collective("tp", "all_gather", act, m * ends, c.tp)]
    if head:
        out.append(Collective("tp", "all_gather", c.micro_batch_size * spec.seq_len * spec.vocab * act_bytes, m,
                              c.tp))
    if c.pp > 1:
        # A stage's sequence-sharded output is gathered before it is sent on, and the gradient it sends
        # back is gathered too: one all-gather per pipeline send.
        out.append(Collective("tp", "all_gather", act, _pipeline_sends(c, stage), c.tp))
    if c.dp > 1 and c.dp_mode in ("fsdp", "hsdp"):
        # FSDP reduce-scatters plain shards: the blocks' replicated norm weights have tp-partial gradients,
        # all-reduced over tp first (once per step, after the last microbatch).
        norms = blocks_per_rank(spec, c.pp) * max(spec.block_norm_params) * 4
        out.append(Collective("tp", "all_reduce", norms, 1, c.tp))
    return out


def dp_collectives(spec: ModelSpec, c: Candidate, reshard_after_forward: bool = True) -> list[Collective]:
    """FSDP2 / DDP over dp; routed experts are not FSDP-sharded: they are reduced over ``ep_replicate``."""
    held, unit = rank_params(spec, c)
    blocks = blocks_per_rank(spec, c.pp)
    expert_unit = max(spec.block_expert_params) // c.ep
    dense_unit = unit - expert_unit
    dense_held = held - blocks * expert_unit
    out: list[Collective] = []
    replicas = c.dp // c.ep
    if expert_unit and replicas > 1:
        out.append(Collective("ep_replicate", "all_reduce", blocks * expert_unit * 4, 1, replicas))
    if c.dp == 1:
        return out
    if c.dp_mode == "ddp":
        return [*out, Collective("dp", "all_reduce", dense_held * 4, 1, c.dp)]
    shard = c.dp if c.dp_mode == "fsdp" else c.hsdp_shard
    rest = dense_held - blocks * dense_unit
    # Gradient accumulation (pp=1, M micro-batches, gradient sync off until the last): FSDP reshards after
    # every backward, so each micro-batch gathers again; the reduce-scatter runs once, after the last.
    gathers = (2 if reshard_after_forward else 1) * accumulation_steps(c)
    padded_unit = ceil_div(dense_unit, shard) * shard * 4  # exact when each parameter's rows divide by shard
    padded_rest = ceil_div(rest, shard) * shard * 4
    out += [Collective("dp", "all_gather", padded_unit, blocks * gathers, shard),
            Collective("dp", "all_gather", padded_rest, gathers if rest else 0, shard),
            Collective("dp", "reduce_scatter", padded_unit, blocks, shard),
            Collective("dp", "reduce_scatter", padded_rest, 1 if rest else 0, shard)]
    if c.dp_mode == "hsdp" and c.dp // shard > 1:
        out.append(Collective("dp", "all_reduce", ceil_div(dense_held, shard) * 4, 1, c.dp // shard))
    return out


def accumulation_steps(c: Candidate) -> int:
    """Forward-backward passes of one optimizer step that each gather FSDP's units again: M under gradient
    accumulation (pp=1), else 1 (under pp the model keeps one gather per step, as before; FSDP with dp > 1
    under pp has not been compared with a count)."""
    return c.num_microbatches if c.pp == 1 else 1


def _pipeline_sends(c: Candidate, stage: int | None) -> int:
    """Point-to-point sends of pipeline rank ``stage`` in one step (None: a middle rank, the most loaded)."""
    stages = c.pp * c.virtual_stages
    rank = min(1, c.pp - 1) if stage is None else stage
    own = range(rank, stages, c.pp)  # the stages this rank holds (interleaved: every pp-th)
    return sum(int(s < stages - 1) + int(s > 0) for s in own) * c.num_microbatches


def pp_collectives(spec: ModelSpec, c: Candidate, stage: int | None = None, act_bytes: int = 4) -> list[Collective]:
    """Sends of pipeline rank ``stage`` (None: a middle rank, the most loaded)."""
    if c.pp == 1:
        return []
    act = c.micro_batch_size * spec.seq_len * spec.hidden * act_bytes
    sends = _pipeline_sends(c, stage)
    # The loss goes from the last stage to the others as a pickled object (a size, then the payload).
    return [Collective("pp", "send", act, sends, 2), Collective("pp", "broadcast", 0, 2, c.pp)]


def ep_collectives(spec: ModelSpec, c: Candidate, act_bytes: int = 4) -> list[Collective]:
    """Per MoE block and microbatch: the expert-count exchange, dispatch and combine (and their backward),
    and the routing statistics' all-reduce. Received rows depend on routing: this is the ep group's mean."""
    if not spec.num_experts:
        return []
    moe_blocks = sum(1 for e in spec.block_expert_params if e) * blocks_per_rank(spec, c.pp) // spec.num_blocks
    calls = c.num_microbatches * moe_blocks
    routed = c.micro_batch_size * spec.seq_len * spec.top_k * spec.hidden * act_bytes
    stats = (2 * spec.num_experts + 4) * 4
    out = [Collective("ep", "all_reduce", stats, calls, c.ep)]
    if c.dp // c.ep > 1:
        out.append(Collective("ep_replicate", "all_reduce", stats, calls, c.dp // c.ep))
    if c.ep > 1:
        out += [Collective("ep", "all_to_all", spec.num_experts * 8, calls, c.ep),
                Collective("ep", "all_to_all", routed, 4 * calls, c.ep)]
    return out


def collectives(spec: ModelSpec, c: Candidate, reshard_after_forward: bool = True,
                stage: int | None = None, act_bytes: int = 4) -> list[Collective]:
    """Every collective of one optimizer step on pipeline rank ``stage`` (None: the most loaded).

    ``act_bytes``: 2 when activations are bf16/fp16; gradients and weights stay fp32 (the training dtype).
    """
    return (tp_collectives(spec, c, stage, act_bytes=act_bytes) + dp_collectives(spec, c, reshard_after_forward)
            + pp_collectives(spec, c, stage, act_bytes) + ep_collectives(spec, c, act_bytes))


def bytes_per_dim(items: list[Collective]) -> dict[str, dict[str, int]]:
    """``{dim: {kind: total bytes}}``, the shape the counting on real ranks produces."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        if item.count and item.group_size > 1 and item.nbytes:
            kinds = out.setdefault(item.dim, {})
            kinds[item.kind] = kinds.get(item.kind, 0) + item.total_bytes
    return out


def link_of(dim: str, c: Candidate, device: DeviceSpec, devices_per_node: int) -> Link:
    """Which link a dimension's group crosses: mesh order is pp, dp, tp (tp innermost)."""
    span = {"tp": c.tp, "dp": c.tp * (c.hsdp_shard if c.dp_mode == "hsdp" else c.dp), "ep": c.tp * c.ep,
            "ep_replicate": c.tp * c.dp, "pp": c.tp * c.dp * c.pp}[dim]
    return device.intra_node if span <= devices_per_node else device.inter_node
