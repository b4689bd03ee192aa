"""Tensor-parallel plans: where one comes from (what a plan is: ``plan_types.py``).

Sources, first match wins (see :func:`resolve_plan`): the strategy's ``tp_plan=`` argument; the
LightningModule hook ``tensor_parallel_plan()``; a Hugging Face model's ``_tp_plan`` /
``base_model_tp_plan``; the package's reference Llama; the data-flow detector (``detect.py``).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from picotron_lightning._util import join_name
from picotron_lightning.parallel.tensor_parallel.detect import (
    add_vocab_embedding,
    detect_plan,
    hf_models,
    norms_feeding,
)
from picotron_lightning.parallel.tensor_parallel.plan_types import STYLES, TENSOR_PLAN_HOOK, TensorParallelPlan
from picotron_lightning.structure import find_main_block_stack
from picotron_lightning.topology import LayoutError

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


def hf_plan(root: nn.Module) -> TensorParallelPlan | None:
    """Translate a Hugging Face model's own TP plan (``_tp_plan`` + ``config.base_model_tp_plan``)."""
    models = hf_models(root)
    if not models:
        return None
    prefix, model = models[0]
    config = getattr(model, "config", None)
    raw: dict[str, str] = {}
    base_prefix = getattr(model, "base_model_prefix", "")
    base = getattr(config, "base_model_tp_plan", None) or {}
    has_base = bool(base_prefix) and hasattr(model, base_prefix)
    for pattern, style in base.items():
        raw[join_name(base_prefix, pattern) if has_base else pattern] = style
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
            f"Pass `tp_plan=` (styles {STYLES}) or define `{TENSOR_PLAN_HOOK}()` on the LightningModule."
        )
    patterns = {join_name(prefix, p): _HF_STYLES[s] for p, s in raw.items() if _HF_STYLES[s] is not None}
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
    styles = {join_name(prefix, k): v for k, v in styles.items()}
    c = model.config
    heads = {"num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads}
    return TensorParallelPlan(styles, "reference", join_name(prefix, "layers"), heads)


def _add_norms_and_embedding(root: nn.Module, styles: dict[str, Any]) -> None:
    """Complete a plan that names only linears: the norms feeding column-wise linears, the embedding.

    A norm counts if it is a parameterized module without linears, inside a block, and the block
    calls it right before the column-wise linears; found by a hook trace (see ``detect.py``).
    """
    styles.update({name: "norm" for name in norms_feeding(root, [n for n, s in styles.items() if s == "colwise"])})
    add_vocab_embedding(root, styles)


def resolve_plan(root: nn.Module, user_plan: dict[str, Any] | None) -> TensorParallelPlan:
    """The plan for ``root`` from the first source that has one (see the module docstring)."""
    if user_plan:
        return TensorParallelPlan(expand_patterns(root, user_plan, "tp_plan="), "tp_plan argument",
                                  _stack_name(root))
    hook = getattr(root, TENSOR_PLAN_HOOK, None)
    if callable(hook):
        patterns = hook()
        if patterns:
            return TensorParallelPlan(expand_patterns(root, patterns, f"{TENSOR_PLAN_HOOK}()"), "module hook",
                                      _stack_name(root))
    for source in (hf_plan, reference_plan):
        plan = source(root)
        if plan is not None:
            return plan
    return detect_plan(root)


def _stack_name(root: nn.Module) -> str | None:
    stack = find_main_block_stack(root)
    return stack.name if stack else None
