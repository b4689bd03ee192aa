"""Analytic per-rank peak memory of one training step of a candidate layout.

Built from the :class:`ModelSpec`'s exact parameter counts and saved-activation bytes (one sample,
measured on the meta device), divided the way each dimension divides them:

* parameters, gradients, AdamW's two moments: the most loaded pipeline rank's blocks (plus the
  embedding on the first stage, the head on the last), tp shards every matrix but 1-D weights, ep
  shards routed experts; FSDP shards all of it over dp (HSDP over its shard group); DDP keeps
  gradients whole (as bucket views, alive the whole run); FSDP under gradient accumulation (pp=1,
  M > 1, sync off until the last micro-batch) holds the unsharded gradients too, DDP its accumulated
  gradients next to its bucket; under pp the previous step's gradients stay alive through the schedule
  (set aside by the runtime until Lightning zeroes them).
* activations: saved bytes per block per sample (none), block inputs and matmul outputs (selective)
  or block inputs only (full, plus one block recomputed), divided by tp (sequence parallelism shards
  what tp does not), times the micro-batch size, times the blocks this rank holds, times the
  microbatches the schedule keeps in flight on the first stage.
* transients: a block's activation gradients in its backward (half its saved bytes), FSDP's
  gathered units (the running one and the prefetched one) and one unit's unsharded gradients; the
  logits' gradient on the last stage; AdamW's foreach temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass

from picotron_lightning.planner.model_spec import ModelSpec, ceil_div
from picotron_lightning.planner.search import Candidate

BYTES = 4  # fp32 master weights, gradients and moments (the project's training dtype)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted bytes on the most loaded rank."""

    params: int
    grads: int
    optimizer: int
    activations: int
    transient: int

    @property
    def peak(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.transient


def blocks_per_rank(spec: ModelSpec, pp: int) -> int:
    """Blocks on the most loaded pipeline rank (the splitter gives the first ranks the extra ones)."""
    return ceil_div(spec.num_blocks, pp)


def inflight_microbatches(c: Candidate) -> float:
    """Microbatch-stages whose activations the first pipeline rank holds at once, in units of its blocks."""
    if c.pp == 1:
        return 1.0
    if c.schedule == "gpipe":
        return float(c.num_microbatches)
    if c.virtual_stages == 1:
        return float(min(c.pp, c.num_microbatches))
    # Interleaved 1F1B: (v-1)*pp + 2*(pp-1) + 1 chunk forwards before the first backward, each chunk 1/v.
    chunks = min(c.num_microbatches * c.virtual_stages, (c.virtual_stages - 1) * c.pp + 2 * (c.pp - 1) + 1)
    return chunks / c.virtual_stages


def rank_params(spec: ModelSpec, c: Candidate) -> tuple[int, int]:
    """(elements held before dp sharding, largest FSDP unit's elements) on the most loaded rank."""
    n = blocks_per_rank(spec, c.pp)
    block = max(spec.block_params)
    experts = max(spec.block_expert_params)
    norms = max(spec.block_norm_params)
    per_block = (block - experts - norms) // c.tp + norms + experts // c.ep
    first = n * per_block + spec.embed_params // c.tp
    last = n * per_block + spec.head_params // c.tp + spec.other_params
    held = first + spec.head_params // c.tp + spec.other_params if c.pp == 1 else max(first, last)
    return held, per_block


def estimate(spec: ModelSpec, c: Candidate, precision: str = "fp32") -> MemoryBreakdown:
    """Predicted peak bytes of the most loaded rank of candidate ``c``.

    ``precision`` "bf16"/"fp16" halves the activations (measured in fp32); weights, gradients and AdamW
    moments stay fp32 (mixed precision keeps fp32 masters).
    """
    held, unit = rank_params(spec, c)
    shard = {"fsdp": c.dp, "hsdp": c.hsdp_shard}.get(c.dp_mode, 1)
    params = ceil_div(held, shard) * BYTES
    optimizer = 2 * params
    grads = params
    if c.pp == 1 and c.num_microbatches > 1 and (shard > 1 or (c.dp_mode == "ddp" and c.dp > 1)):
        # Gradient accumulation with gradient sync off: FSDP keeps every unsharded gradient between
        # micro-batches (and the sharded ones after the last reduce-scatter); DDP accumulates into fresh
        # .grad tensors (Lightning's zero_grad set them to None) next to its always-allocated flat bucket,
        # and copies them into it only in the synced backward, so it holds both then.
        grads += held * BYTES
    if c.pp > 1:
        # The pipeline runs forward and backward inside Lightning's training_step and sets the previous
        # step's gradients aside meanwhile (runtime._hold_gradients); Lightning frees them (zero_grad) only
        # after training_step returns, so during the schedule each rank holds two sets of gradients.
        grads += params
    mb = c.micro_batch_size
    per_sample = {
        "none": max(spec.block_saved_bytes),
        "selective": spec.block_input_bytes + max(spec.block_matmul_out_bytes),
        "full": spec.block_input_bytes,
    }[c.checkpointing]
    blocks = blocks_per_rank(spec, c.pp)
    activations = int(per_sample * mb * blocks * inflight_microbatches(c) / c.tp)
    if c.checkpointing != "none":  # one block's forward is recomputed at a time in backward
        activations += int(max(spec.block_saved_bytes) * mb / c.tp)
    last_stage = spec.outer_saved_bytes * mb + 2 * spec.logits_bytes * mb  # logits' grad and softmax
    activations += last_stage
    if precision in ("bf16", "fp16"):
        activations //= 2
    transient = unit * BYTES  # AdamW's foreach temporaries over one parameter group's largest tensors
    # A block's backward holds gradients of its activations next to them: about half its saved bytes.
    transient += int(max(spec.block_saved_bytes) * mb / c.tp) // 2
    if c.dp_mode in ("fsdp", "hsdp") and shard > 1:
        transient += 3 * unit * BYTES  # two gathered units (running + prefetched) + one unit's full gradients
    return MemoryBreakdown(params, grads, optimizer, activations, transient)
