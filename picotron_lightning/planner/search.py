"""The search space: every layout of a world of ranks, and why each impossible one is rejected.

A candidate fixes the sizes (pp, dp, tp, ep), the data-parallel mode, activation checkpointing, the
pipeline schedule with its virtual stages and microbatch count (without pp: the gradient-accumulation
steps of one optimizer step). Hardware and model rules apply here,
before any cost is estimated: tensor parallelism stays inside a node (its collectives are on every
block's critical path), tp divides heads, kv heads, every sharded width and the vocabulary, pp does
not exceed the blocks (times virtual stages), ep divides the experts and dp, and the global batch
divides over the data-parallel ranks and the microbatches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from picotron_lightning._util import divisors
from picotron_lightning.planner.model_spec import ModelSpec, divisible

CHECKPOINTING = ("none", "selective", "full")
DP_MODES = ("ddp", "fsdp", "hsdp")


@dataclass(frozen=True)
class Constraints:
    """Sizes and choices the user fixed (``None``: the planner chooses)."""

    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    ep: int | None = None
    dp_mode: str | None = None
    checkpointing: str | None = None
    schedule: str | None = None
    num_microbatches: int | None = None
    accumulate: bool = True
    """Whether layouts without pipeline parallelism may split the local batch into accumulated micro-batches
    (gradient accumulation: ``Trainer(accumulate_grad_batches=M)`` with the loader's batch the micro-batch).
    The strategy's ``"auto"`` path passes False: there the loader's batch is already the micro-batch and the
    accumulation count is the user's."""


@dataclass(frozen=True)
class Candidate:
    """One point of the search space."""

    dp: int
    tp: int
    pp: int
    ep: int
    dp_mode: str
    checkpointing: str
    schedule: str
    virtual_stages: int
    num_microbatches: int
    micro_batch_size: int
    hsdp_shard: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def describe(self) -> str:
        mode = f"hsdp({self.dp // self.hsdp_shard}x{self.hsdp_shard})" if self.dp_mode == "hsdp" else self.dp_mode
        text = f"dp={self.dp}[{mode}] tp={self.tp} pp={self.pp}"
        if self.ep > 1:
            text += f" ep={self.ep}"
        if self.pp > 1:
            text += f" {self.schedule}" + (f"x{self.virtual_stages}" if self.virtual_stages > 1 else "")
        text += f" M={self.num_microbatches} mb={self.micro_batch_size} ckpt={self.checkpointing}"
        return text


@dataclass(frozen=True)
class Rejection:
    """A candidate (or a whole family of them) that cannot run, and why."""

    layout: str
    reason: str


@dataclass
class SearchSpace:
    """Enumerates candidates for one model, world and global batch; collects rejections on the way."""

    spec: ModelSpec
    world_size: int
    devices_per_node: int
    global_batch: int | None
    """Samples per optimizer step over all replicas; or None with ``local_batch`` (Lightning's loaders give
    each data-parallel rank its own batch, so the global batch grows with dp)."""
    constraints: Constraints = field(default_factory=Constraints)
    rejected: list[Rejection] = field(default_factory=list)
    local_batch: int | None = None

    def batch_of(self, dp: int) -> int:
        """The global batch at data-parallel size ``dp``."""
        if self.global_batch is not None:
            return self.global_batch
        assert self.local_batch is not None
        return self.local_batch * dp

    def _reject(self, layout: str, reason: str) -> None:
        self.rejected.append(Rejection(layout, reason))

    def tp_problem(self, tp: int) -> str | None:
        """Why tensor parallelism of size ``tp`` cannot work, or None."""
        s = self.spec
        if tp > self.devices_per_node or self.devices_per_node % tp:
            return f"tp={tp} would cross nodes ({self.devices_per_node} devices per node); tp stays inside a node"
        for what, n in (("heads", s.heads), ("kv heads", s.kv_heads), ("vocabulary", s.vocab), ("ffn", s.ffn)):
            if not divisible(n, tp):
                return f"tp={tp} does not divide the {what} ({n})"
        for name, width in s.dims.items():
            if ".experts." not in f".{name}" and width % tp:
                return f"tp={tp} does not divide {name}'s width {width}"
        return None

    def pp_problem(self, pp: int, virtual: int) -> str | None:
        if pp * virtual > self.spec.num_blocks:
            return f"pp={pp} x {virtual} virtual stages exceeds the {self.spec.num_blocks} blocks"
        return None

    def ep_problem(self, ep: int, dp: int) -> str | None:
        if ep > 1 and self.spec.num_experts == 0:
            return f"ep={ep} but the model has no experts"
        if self.spec.num_experts and self.spec.num_experts % ep:
            return f"ep={ep} does not divide the {self.spec.num_experts} experts"
        if dp % ep:
            return f"ep={ep} does not divide dp={dp}"
        return None

    def candidates(self) -> Iterator[Candidate]:
        c = self.constraints
        world = self.world_size
        for tp in divisors(world):
            if c.tp is not None and tp != c.tp:
                continue
            problem = self.tp_problem(tp)
            if problem:
                self._reject(f"tp={tp}", problem)
                continue
            for pp in divisors(world // tp):
                if c.pp is not None and pp != c.pp:
                    continue
                dp = world // (tp * pp)
                if c.dp is not None and dp != c.dp:
                    continue
                if self.batch_of(dp) % dp:
                    self._reject(f"dp={dp} tp={tp} pp={pp}", f"global batch {self.batch_of(dp)} does not divide "
                                 f"over dp={dp} data-parallel ranks")
                    continue
                yield from self._with_sizes(dp, tp, pp)

    def _with_sizes(self, dp: int, tp: int, pp: int) -> Iterator[Candidate]:
        c = self.constraints
        experts = divisors(dp) if self.spec.num_experts else [1]
        for ep in experts:
            if c.ep is not None and ep != c.ep:
                continue
            problem = self.ep_problem(ep, dp)
            if problem:
                self._reject(f"dp={dp} tp={tp} pp={pp} ep={ep}", problem)
                continue
            for schedule, virtual in self._schedules(pp):
                problem = self.pp_problem(pp, virtual)
                if problem:
                    self._reject(f"dp={dp} tp={tp} pp={pp} {schedule}", problem)
                    continue
                micros = self._microbatches(dp, pp)
                if not micros:
                    self._reject(f"dp={dp} tp={tp} pp={pp}", f"the local batch {self.batch_of(dp) // dp} has no "
                                 f"microbatch count >= pp={pp} that divides it (fix num_microbatches or the batch)")
                    continue
                for mode, shard in self._dp_modes(dp, tp, pp):
                    for micro in micros:
                        for ckpt in (c.checkpointing,) if c.checkpointing else CHECKPOINTING:
                            yield Candidate(dp, tp, pp, ep, mode, ckpt, schedule, virtual, micro,
                                            self.batch_of(dp) // dp // micro, shard)

    def _schedules(self, pp: int) -> list[tuple[str, int]]:
        c = self.constraints
        if pp == 1:
            return [("1f1b", 1)]
        options = [("1f1b", 1), ("interleaved_1f1b", 2)]
        return [o for o in options if c.schedule is None or o[0] == c.schedule]

    def _dp_modes(self, dp: int, tp: int, pp: int) -> list[tuple[str, int]]:
        c = self.constraints
        modes: list[tuple[str, int]] = []
        per_node = max(1, self.devices_per_node // tp)
        for mode in DP_MODES:
            if c.dp_mode not in (None, "auto") and mode != c.dp_mode:
                continue
            if mode == "ddp" and pp > 1:
                continue  # DDP's reducer cannot follow a pipeline's microbatches (options.py refuses it)
            if mode == "hsdp":
                shard = min(dp, per_node)
                if dp % shard or shard in (1, dp):
                    continue  # hsdp with one group is fsdp, with shard 1 it is ddp
                modes.append((mode, shard))
            else:
                modes.append((mode, dp if mode == "fsdp" else 1))
        return modes

    def _microbatches(self, dp: int, pp: int) -> list[int]:
        """Microbatch counts: pipeline microbatches under pp; gradient-accumulation steps without it."""
        local = self.batch_of(dp) // dp
        if pp == 1 and not self.constraints.accumulate:
            return [1]
        if self.constraints.num_microbatches is not None:
            return [self.constraints.num_microbatches] if local % self.constraints.num_microbatches == 0 else []
        if pp == 1:
            # Gradient accumulation: every split of the local batch (a smaller micro-batch holds fewer
            # activations; FSDP then gathers once per micro-batch, see comm_model.dp_collectives).
            return divisors(local)
        # Microbatch count against the bubble: the largest counts that divide the local batch.
        counts = [m for m in divisors(local) if m >= pp]
        return counts[-2:] if counts else []
