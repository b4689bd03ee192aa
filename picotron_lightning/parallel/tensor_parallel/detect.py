"""Finding a tensor-parallel plan for a transformer nobody described: by data flow, not by names.

One block of the main block stack runs once on a small input under a ``TorchFunctionMode`` that
tags every tensor with where it came from: the block's input (the residual stream), or the output
of a particular ``nn.Linear``. Tags flow through every torch operation. Afterwards each linear is
classified by two facts:

* it **reads the residual stream** (its input carries the block-input tag, directly or through a
  norm): a *reader*, sharded column-wise (q/k/v, gate/up);
* it **writes back to the residual stream** (its own tag reaches the block output): a *writer*,
  sharded row-wise (o_proj, down).

That is Megatron's pattern: between a group of readers and its writer everything is per-head or
per-feature, so it can run on a slice. A linear that is both, or neither, breaks the pattern and is
refused with a message rather than sharded wrongly. A reader whose whole output is split by position
into equal parts (a fused qkv / gate_up) is kept, with its number of parts, so that each rank gets
its shard of every part (``linears.py``); one split into unequal parts is refused.

The module whose output the readers consume, if it has parameters and no linears of its own, is the
block's input norm (sequence-parallel candidate). "Linear" here means ``nn.Linear`` or a transposed
linear (HF ``Conv1D``, ``linears.is_linear_like``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from picotron_lightning.parallel.tensor_parallel.linears import in_features, is_linear_like, out_features
from picotron_lightning.parallel.tensor_parallel.plan_types import TensorParallelPlan
from picotron_lightning.structure import BlockStack, find_main_block_stack
from picotron_lightning.topology import LayoutError

INPUT_TAG = "<block input>"
_SPLITS = {torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.Tensor.split, torch.Tensor.chunk,
           torch.Tensor.unbind, torch.Tensor.tensor_split, torch.Tensor.split_with_sizes}
EXAMPLE_SEQ = 8


class _BlockCallSeen(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a hook to stop a forward once the wanted call was seen."""


def _equal_parts(pieces: Any) -> int:
    """How many pieces a split produced if they are all the same size, else 0."""
    if not isinstance(pieces, (tuple, list)) or not pieces:
        return 0
    sizes = {tuple(p.shape) for p in pieces if isinstance(p, torch.Tensor)}
    return len(pieces) if len(sizes) == 1 else 0


class _TagMode(TorchFunctionMode):
    """Propagates provenance tags through every torch function; records splits of linear outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, frozenset[str]] = {}
        self.keep: list[torch.Tensor] = []  # tensor ids stay valid only while the tensors live
        self.splits: list[tuple[frozenset[str], int, int]] = []  # (tags, size of split dim, equal parts or 0)

    def tag(self, t: torch.Tensor, tags: frozenset[str]) -> None:
        self.tags[id(t)] = tags
        self.keep.append(t)

    def of(self, obj: Any) -> frozenset[str]:
        leaves, _ = tree_flatten(obj)
        out: frozenset[str] = frozenset()
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                out |= self.tags.get(id(leaf), frozenset())
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tags = self.of((args, kwargs))
        if tags:
            if func in _SPLITS and args and isinstance(args[0], torch.Tensor):
                dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
                self.splits.append((tags, args[0].shape[dim], _equal_parts(out)))
            for leaf in tree_flatten(out)[0]:
                if isinstance(leaf, torch.Tensor):
                    self.tag(leaf, tags)
        return out


@dataclass
class BlockTrace:
    """What one traced block call showed (names relative to the block)."""

    linears: list[str] = field(default_factory=list)  # in call order
    input_tags: dict[str, frozenset[str]] = field(default_factory=dict)
    input_producer: dict[str, str | None] = field(default_factory=dict)  # module that produced the input
    output_tags: frozenset[str] = frozenset()
    producer_inputs: dict[str, frozenset[str]] = field(default_factory=dict)  # module -> tags of its input
    fused: dict[str, int] = field(default_factory=dict)  # linear split by position -> equal parts (0: unequal)


def _first_tensor(obj: Any) -> torch.Tensor | None:
    for leaf in tree_flatten(obj)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def trace_block(block: nn.Module, args: tuple, kwargs: dict) -> BlockTrace:
    """Run ``block(*args, **kwargs)`` once (no grad) and record the data flow of its linears.

    ``args[0]`` (or ``kwargs["hidden_states"]``) is the residual-stream input.
    """
    mode = _TagMode()
    trace = BlockTrace()
    producer: dict[int, str] = {}
    handles = []
    modules = dict(block.named_modules())

    def pre(name: str):  # noqa: ANN202
        def hook(module: nn.Module, a: tuple, kw: dict) -> None:
            x = _first_tensor((a, kw))
            if is_linear_like(module):
                trace.linears.append(name)
                trace.input_tags[name] = mode.of(x) if x is not None else frozenset()
                trace.input_producer[name] = producer.get(id(x)) if x is not None else None
            elif x is not None:
                trace.producer_inputs.setdefault(name, mode.of(x))
        return hook

    def post(name: str):  # noqa: ANN202
        def hook(module: nn.Module, a: tuple, kw: dict, out: Any) -> None:
            for leaf in tree_flatten(out)[0]:
                if isinstance(leaf, torch.Tensor):
                    producer.setdefault(id(leaf), name)  # innermost module wins (hooks run inner first)
                    if is_linear_like(module):
                        mode.tag(leaf, frozenset({name}))
        return hook

    for name, module in modules.items():
        if name:
            handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post(name), with_kwargs=True))
    try:
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with torch.no_grad(), mode:
            mode.tag(x, frozenset({INPUT_TAG}))
            out = block(*args, **kwargs)
        first = _first_tensor(out)
        trace.output_tags = mode.of(first) if first is not None else frozenset()
    finally:
        for h in handles:
            h.remove()
    for tags, size, parts in mode.splits:
        if len(tags) == 1:
            (name,) = tags
            module = modules.get(name)
            if module is not None and is_linear_like(module) and size == out_features(module):
                trace.fused[name] = parts if parts > 1 else 0
    return trace


def _is_norm_like(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.dim() == 1 for p in params) and not any(
        is_linear_like(m) for m in module.modules()
    )


def classify_block(block: nn.Module, trace: BlockTrace, block_name: str = "block") -> dict[str, str]:
    """Styles (``colwise`` / ``rowwise`` / ``norm``) of a block's modules from its trace; raises if ambiguous."""
    modules = dict(block.named_modules())
    readers = [n for n in trace.linears if INPUT_TAG in trace.input_tags[n]]
    writers = [n for n in trace.linears if n in trace.output_tags]
    both = sorted(set(readers) & set(writers))
    if both:
        raise LayoutError(
            f"{block_name}: linear(s) {both} both read the residual stream and write straight back to it, so "
            "they cannot be split column- or row-wise. Pass `tp_plan=` or define `tensor_parallel_plan()`."
        )
    neither = [n for n in trace.linears if n not in readers and n not in writers]
    if neither:
        raise LayoutError(
            f"{block_name}: linear(s) {neither} neither read the block input nor write to the residual "
            "stream (e.g. a middle layer of a deeper MLP); the Megatron split does not cover them. Pass `tp_plan=`."
        )
    unequal = sorted(n for n in readers if trace.fused.get(n) == 0)
    if unequal:
        raise LayoutError(
            f"{block_name}: the output of {unequal} is split by position into parts of different sizes (a fused "
            "projection, e.g. q with fewer k/v heads). Each rank would need its share of every part, which is only "
            "implemented for equal parts. Split it into separate nn.Linear modules, or pass `tp_plan=` leaving "
            "this block unsharded, or use tensor_parallel_size=1."
        )
    for w in writers:
        foreign = trace.input_tags[w] - set(readers)
        if foreign:
            raise LayoutError(
                f"{block_name}: the input of {w!r} depends on {sorted(foreign)} besides the column-wise "
                "projections, so it would mix sharded and full activations. Pass `tp_plan=`."
            )
    leaking = sorted(set(readers) & trace.output_tags)
    unused = [r for r in readers if not any(r in trace.input_tags[w] for w in writers)]
    if leaking or unused:
        raise LayoutError(
            f"{block_name}: the output of {leaking or unused} reaches the residual stream without a row-wise "
            "projection; it cannot be sharded. Pass `tp_plan=`."
        )
    styles = {n: "colwise" for n in readers} | {n: "rowwise" for n in writers}
    for r in readers:
        norm = trace.input_producer.get(r)
        if norm and norm in modules and _is_norm_like(modules[norm]) and INPUT_TAG in trace.producer_inputs.get(
            norm, frozenset()
        ):
            styles[norm] = "norm"
    return styles


def example_block_call(root: nn.Module, stack: BlockStack) -> tuple[tuple, dict]:
    """Arguments for one call of the first block: captured from a model forward, or a synthetic input."""
    block = stack.blocks[0]
    param = next(block.parameters())
    captured: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["call"] = (args, kwargs)
        raise _BlockCallSeen

    hf = hf_models(root)
    if hf:
        handle = block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                # No KV cache: the captured call is replayed several times (dry run, numeric check).
                hf[0][1](input_ids=torch.zeros(1, EXAMPLE_SEQ, dtype=torch.long, device=param.device),
                         use_cache=False)
        except _BlockCallSeen:
            pass
        finally:
            handle.remove()
        if "call" in captured:
            return captured["call"]
    hidden = hidden_size(root, block)
    # A block that passes several streams (``forward(x, memory)``) gets each required positional
    # argument as a hidden-state-shaped tensor; the first one is the residual stream.
    shape = (1, EXAMPLE_SEQ, hidden)
    return tuple(torch.randn(shape, device=param.device, dtype=param.dtype)
                 for _ in range(_required_positional(block))), {}


def _required_positional(block: nn.Module) -> int:
    """How many positional arguments without a default ``block.forward`` takes (at least one)."""
    try:
        params = inspect.signature(block.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return max(1, sum(p.kind in positional and p.default is inspect.Parameter.empty for p in params))


def hidden_size(root: nn.Module, block: nn.Module) -> int:
    """Width of the residual stream: the token embedding's, else the most common linear input width."""
    widths = [in_features(m) for m in block.modules() if is_linear_like(m)]
    for m in root.modules():
        if isinstance(m, nn.Embedding) and m.embedding_dim in widths:
            return m.embedding_dim
    if not widths:
        raise LayoutError(f"{type(block).__name__} has no linear layers; there is nothing to shard.")
    return max(set(widths), key=widths.count)


def _main_stack(root: nn.Module) -> BlockStack:
    stack = find_main_block_stack(root)
    if stack is None:
        raise LayoutError(
            f"tensor parallelism found no stack of repeated blocks (an nn.ModuleList of identical layers) in "
            f"{type(root).__name__}, so it cannot tell which layers to shard. Pass `tp_plan=` to the strategy "
            "or define `tensor_parallel_plan()` on the LightningModule (see docs/tensor_parallel.md)."
        )
    return stack


def norms_feeding(root: nn.Module, colwise: list[str]) -> list[str]:
    """Names of the block norms whose outputs feed the given column-wise linears (all blocks)."""
    stack = find_main_block_stack(root)
    if stack is None:
        return []
    args, kwargs = example_block_call(root, stack)
    trace = trace_block(stack.blocks[0], args, kwargs)
    prefix0 = stack.block_name(0) + "."
    modules = dict(stack.blocks[0].named_modules())
    local_colwise = {n[len(prefix0):] for n in colwise if n.startswith(prefix0)}
    norms = set()
    for r in local_colwise:
        norm = trace.input_producer.get(r)
        if norm and _is_norm_like(modules[norm]) and INPUT_TAG in trace.producer_inputs.get(norm, frozenset()):
            norms.add(norm)
    return [f"{stack.name}.{key}.{n}" for key in stack.keys for n in sorted(norms)]


def detect_plan(root: nn.Module) -> TensorParallelPlan:
    """A plan for an unseen transformer from the data flow of its first block (see module docstring)."""
    stack = _main_stack(root)
    args, kwargs = example_block_call(root, stack)
    block_name = f"{stack.block_name(0)} ({stack.block_class.__name__})"
    trace = trace_block(stack.blocks[0], args, kwargs)
    styles_local = classify_block(stack.blocks[0], trace, block_name)
    if not any(s == "colwise" for s in styles_local.values()):
        raise LayoutError(f"{block_name}: no linear reads the block input; nothing to shard. Pass `tp_plan=`.")
    styles: dict[str, Any] = {
        f"{stack.name}.{key}.{n}": s for key in stack.keys for n, s in styles_local.items()
    }
    fused = {f"{stack.name}.{key}.{n}": trace.fused[n] for key in stack.keys for n, s in styles_local.items()
             if s == "colwise" and trace.fused.get(n, 0) > 1}
    head = _find_head(root, stack)
    if head is not None:
        styles[head] = "head"
    add_vocab_embedding(root, styles)
    return TensorParallelPlan(styles, "detected", stack.name, _hf_head_counts(root), fused=fused)


def _hf_head_counts(root: nn.Module) -> dict[str, int]:
    """Head counts a Hugging Face model's config states (they must divide by tp), else none."""
    models = hf_models(root)
    config = getattr(models[0][1], "config", None) if models else None
    heads = {}
    for key in ("num_attention_heads", "num_key_value_heads"):
        if isinstance(getattr(config, key, None), int):
            heads[key] = getattr(config, key)
    return heads


def _find_head(root: nn.Module, stack: BlockStack) -> str | None:
    """The output projection: the last-registered top-level linear outside the blocks, wider than it is tall."""
    inside = {id(m) for m in stack.container.modules()}
    candidates = [
        n for n, m in root.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in inside and m.out_features > m.in_features
    ]
    return candidates[-1] if candidates else None


def hf_models(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Hugging Face ``PreTrainedModel`` instances under ``root`` that are not inside another one."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if any(name.startswith(prefix + ".") or prefix == "" for prefix, _ in found):
            continue
        if any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__):
            found.append((name, module))
    return found


def add_vocab_embedding(root: nn.Module, styles: dict[str, Any]) -> None:
    """Mark the token embedding vocabulary-parallel when it is a top-level ``nn.Embedding`` matching the head."""
    heads = [dict(root.named_modules())[n] for n, s in styles.items() if s == "head"]
    vocab = {h.out_features for h in heads if isinstance(h, nn.Linear)}
    for name, module in root.named_modules():
        if isinstance(module, nn.Embedding) and name not in styles and (not vocab or module.num_embeddings in vocab):
            if any(isinstance(h, nn.Linear) and h.weight is module.weight for h in heads):
                continue  # tied with the head: see `_untie` in sharding.py
            styles[name] = "embedding"
            return
