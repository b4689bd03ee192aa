"""Options of the tensor-parallel step (a leaf module: no torch.distributed import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, kw_only=True)
class TensorParallelOptions:
    """How the blocks are sharded over the ``tp`` ranks (see docs/tensor_parallel.md)."""

    plan: dict[str, Any] | None = field(default=None, metadata={"flat": "tp_plan"})
    """``{"module.name.pattern": style}`` with styles ``"colwise"``, ``"rowwise"``, ``"embedding"``, ``"head"``,
    ``"norm"`` or a ``ParallelStyle``; ``*`` matches one name part. ``None``: the LightningModule's
    ``tensor_parallel_plan()`` hook, the Hugging Face model's own plan, the reference Llama's, or one
    detected from the blocks' data flow."""

    sequence_parallel: bool | Literal["auto"] = "auto"
    """Split norms (and the residual stream) along the sequence between the tp ranks; ``"auto"`` turns it
    on for pre-norm blocks (off for MoE models). Needs the sequence length divisible by tp."""

    loss_parallel: bool = False
    """Keep the logits sharded over the vocabulary and compute ``F.cross_entropy`` on the shards. Opt-in:
    the step must pass the logits straight to ``F.cross_entropy``/``F.nll_loss``."""

    def __post_init__(self) -> None:
        if self.sequence_parallel not in (True, False, "auto"):
            raise ValueError(f"`sequence_parallel` must be True, False or 'auto', got {self.sequence_parallel!r}.")
        if self.plan is not None and not isinstance(self.plan, dict):
            raise ValueError(
                f"`tp_plan` must be a dict of module-name pattern -> style, got {type(self.plan).__name__}."
            )
        if not isinstance(self.loss_parallel, bool):
            raise ValueError(f"`loss_parallel` must be True or False, got {self.loss_parallel!r}.")
