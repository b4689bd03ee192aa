"""Tensor-parallel plans: what a plan is, and where one comes from.

A plan maps module names (relative to the module the strategy parallelizes) to a *style*:

``"colwise"``    a linear whose output features are split (attention q/k/v, MLP gate/up);
``"rowwise"``    a linear whose input features are split and whose output is reduced (o_proj, down);
``"embedding"``  a vocabulary-parallel embedding (rows of the table split, lookups reduced);
``"head"``       the output projection: vocabulary split, logits gathered (or kept sharded for
                 loss parallelism);
``"norm"``       a norm whose output feeds column-wise linears; run sequence-parallel when enabled.

A value may also be a ``torch.distributed.tensor.parallel.ParallelStyle``, applied as given.

Sources, first match wins (see :func:`resolve_plan`): the strategy's ``tp_plan=`` argument; the
LightningModule hook ``tensor_parallel_plan()``; a Hugging Face model's ``_tp_plan`` /
``base_model_tp_plan``; the package's reference Llama; the data-flow detector (``tp_detect``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from picotron_lightning.parallel.structure import find_main_block_stack
from picotron_lightning.topology import LayoutError

STYLES = ("colwise", "rowwise", "embedding", "head", "norm")
PLAN_HOOK = "tensor_parallel_plan"

# Hugging Face style names -> ours. Styles that mean "fused/packed" or anything we cannot shard
# exactly are refused by name instead of being approximated.
_HF_STYLES = {
    "colwise": "colwise",
    "rowwise": "rowwise",
    "colwise_rep": "head",
    "colwise_gather_output": "head",
    "rowwise_rep": "rowwise",
    "sequence_parallel": "norm",
    "embedding_rowwise": "embedding",  # rows of the table = the vocabulary
    "replicate": None,  # left whole
}
_HF_FUSED = ("packed_colwise", "packed_rowwise", "local_packed_rowwise", "grouped_gemm")


@dataclass
class TensorParallelPlan:
    """A resolved plan: exact module names -> style, plus what the validator needs to know."""

    styles: dict[str, Any]
    source: str
    block_stack: str | None = None  # name of the repeated-block container, if known
    head_counts: dict[str, int] = field(default_factory=dict)  # e.g. {"num_attention_heads": 4}
    sequence_parallel: bool = False  # resolved from the strategy's option when the plan is validated

    def modules_with(self, style: str) -> list[str]:
        """Names of the modules given ``style``."""
        return [name for name, s in self.styles.items() if s == style]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # "*" stands for one name component (a layer index); a pattern may match any suffix of a name.
    body = r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in pattern.split("."))
    return re.compile(rf"(?:^|.*\.){body}$")


def expand_patterns(root: nn.Module, patterns: dict[str, Any], source: str) -> dict[str, Any]:
    """Turn ``{"layers.*.q_proj": "colwise"}`` into exact module names under ``root``."""
    from torch.distributed.tensor.parallel import ParallelStyle

    names = [name for name, _ in root.named_modules() if name]
    out: dict[str, Any] = {}
    for pattern, style in patterns.items():
        if not isinstance(style, ParallelStyle) and style not in STYLES:
            raise LayoutError(
                f"{source}: style {style!r} for {pattern!r} is not one of {STYLES} or a ParallelStyle instance."
            )
        regex = _pattern_regex(pattern)
        hits = [n for n in names if regex.match(n)]
        if not hits:
            raise LayoutError(f"{source}: pattern {pattern!r} matches no module of {type(root).__name__}.")
        for name in hits:
            out[name] = style
    return out


def _hf_models(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Hugging Face ``PreTrainedModel`` instances under ``root`` that are not inside another one."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if any(name.startswith(prefix + ".") or prefix == "" for prefix, _ in found):
            continue
        if any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__):
            found.append((name, module))
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def hf_plan(root: nn.Module) -> TensorParallelPlan | None:
    """Translate a Hugging Face model's own TP plan (``_tp_plan`` + ``config.base_model_tp_plan``)."""
    models = _hf_models(root)
    if not models:
        return None
    prefix, model = models[0]
    config = getattr(model, "config", None)
    raw: dict[str, str] = {}
    base_prefix = getattr(model, "base_model_prefix", "")
    base = getattr(config, "base_model_tp_plan", None) or {}
    has_base = bool(base_prefix) and hasattr(model, base_prefix)
    for pattern, style in base.items():
        raw[_join(base_prefix, pattern) if has_base else pattern] = style
    for pattern, style in (getattr(model, "_tp_plan", None) or {}).items():
        raw[pattern] = style
    if not raw:
        return None
    fused = {p: s for p, s in raw.items() if s in _HF_FUSED}
    if fused:
        raise LayoutError(
            f"{type(model).__name__} declares fused (packed) projections {fused}; sharding them column-wise "
            "would mix q/k/v (or gate/up) across ranks. Pass `tp_plan=` with those modules left out, or use "
            "tensor_parallel_size=1."
        )
    unknown = {p: s for p, s in raw.items() if s not in _HF_STYLES}
    if unknown:
        raise LayoutError(
            f"{type(model).__name__}'s TP plan uses styles picotron3d cannot translate: {unknown}. "
            f"Pass `tp_plan=` (styles {STYLES}) or define `{PLAN_HOOK}()` on the LightningModule."
        )
    patterns = {_join(prefix, p): _HF_STYLES[s] for p, s in raw.items() if _HF_STYLES[s] is not None}
    styles = expand_patterns(root, patterns, f"{type(model).__name__}._tp_plan")
    _add_norms_and_embedding(root, styles)
    heads = {}
    for key in ("num_attention_heads", "num_key_value_heads"):
        if isinstance(getattr(config, key, None), int):
            heads[key] = getattr(config, key)
    stack = find_main_block_stack(root)
    return TensorParallelPlan(styles, "huggingface", stack.name if stack else None, heads)


def reference_plan(root: nn.Module) -> TensorParallelPlan | None:
    """The plan of the package's reference :class:`~picotron_lightning.models.llama.Llama`."""
    from picotron_lightning.models.llama import Llama

    found = [(n, m) for n, m in root.named_modules() if isinstance(m, Llama)]
    if not found:
        return None
    prefix, model = found[0]
    if model.config.num_experts:
        return None  # MoE blocks: the detector / user plan decide what to do with the experts
    patterns = {
        "layers.*.attention.q_proj": "colwise", "layers.*.attention.k_proj": "colwise",
        "layers.*.attention.v_proj": "colwise", "layers.*.attention.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.attention_norm": "norm", "layers.*.mlp_norm": "norm",
        "embed_tokens": "embedding", "output": "head",
    }
    styles = expand_patterns(model, patterns, "reference Llama plan")
    styles = {_join(prefix, k): v for k, v in styles.items()}
    c = model.config
    heads = {"num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads}
    return TensorParallelPlan(styles, "reference", _join(prefix, "layers"), heads)


def _add_norms_and_embedding(root: nn.Module, styles: dict[str, Any]) -> None:
    """Complete a plan that names only linears: the norms feeding column-wise linears, the embedding.

    A norm counts if it is a parameterized module without linears, inside a block, and the block
    calls it right before the column-wise linears; found by a hook trace (see ``tp_detect``).
    """
    from picotron_lightning.parallel.tp_detect import norms_feeding

    styles.update({name: "norm" for name in norms_feeding(root, [n for n, s in styles.items() if s == "colwise"])})
    add_vocab_embedding(root, styles)


def add_vocab_embedding(root: nn.Module, styles: dict[str, Any]) -> None:
    """Mark the token embedding vocabulary-parallel when it is a top-level ``nn.Embedding`` matching the head."""
    heads = [dict(root.named_modules())[n] for n, s in styles.items() if s == "head"]
    vocab = {h.out_features for h in heads if isinstance(h, nn.Linear)}
    for name, module in root.named_modules():
        if isinstance(module, nn.Embedding) and name not in styles and (not vocab or module.num_embeddings in vocab):
            if any(isinstance(h, nn.Linear) and h.weight is module.weight for h in heads):
                continue  # tied with the head: see `untie_check` in tensor.py
            styles[name] = "embedding"
            return


def resolve_plan(root: nn.Module, user_plan: dict[str, Any] | None) -> TensorParallelPlan:
    """The plan for ``root`` from the first source that has one (see the module docstring)."""
    if user_plan:
        return TensorParallelPlan(expand_patterns(root, user_plan, "tp_plan="), "tp_plan argument",
                                  _stack_name(root))
    hook = getattr(root, PLAN_HOOK, None)
    if callable(hook):
        patterns = hook()
        if patterns:
            return TensorParallelPlan(expand_patterns(root, patterns, f"{PLAN_HOOK}()"), "module hook",
                                      _stack_name(root))
    for source in (hf_plan, reference_plan):
        plan = source(root)
        if plan is not None:
            return plan
    from picotron_lightning.parallel.tp_detect import detect_plan

    return detect_plan(root)


def _stack_name(root: nn.Module) -> str | None:
    stack = find_main_block_stack(root)
    return stack.name if stack else None
