"""What a tensor-parallel plan is (a leaf module: plan sources, the detector and the validator all use it).

A plan maps module names (relative to the module the strategy parallelizes) to a *style*:

``"colwise"``    a linear whose output features are split (attention q/k/v, MLP gate/up);
``"rowwise"``    a linear whose input features are split and whose output is reduced (o_proj, down);
``"embedding"``  a vocabulary-parallel embedding (rows of the table split, lookups reduced);
``"head"``       the output projection: vocabulary split, logits gathered (or kept sharded for
                 loss parallelism);
``"norm"``       a norm whose output feeds column-wise linears; run sequence-parallel when enabled.

"Linear" means ``nn.Linear`` or a transposed linear (Hugging Face ``Conv1D``, see ``linears.py``).
A column-wise linear listed in ``TensorParallelPlan.fused`` produces that many equal parts side by
side (q, k and v of one projection); each rank gets its shard of every part.

A value may also be a ``torch.distributed.tensor.parallel.ParallelStyle``, applied as given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STYLES = ("colwise", "rowwise", "embedding", "head", "norm")

TENSOR_PLAN_HOOK = "tensor_parallel_plan"
"""The LightningModule method that returns a plan (``{pattern: style}``), a source of plans."""


@dataclass
class TensorParallelPlan:
    """A resolved plan: exact module names -> style, plus what the validator needs to know."""

    styles: dict[str, Any]
    source: str
    block_stack: str | None = None  # name of the repeated-block container, if known
    head_counts: dict[str, int] = field(default_factory=dict)  # e.g. {"num_attention_heads": 4}
    sequence_parallel: bool = False  # resolved from the strategy's option when the plan is validated
    fused: dict[str, int] = field(default_factory=dict)  # column-wise linear -> equal parts (3 for q|k|v)

    def modules_with(self, style: str) -> list[str]:
        """Names of the modules given ``style``."""
        return [name for name, s in self.styles.items() if s == style]
