"""Checks that a tensor-parallel plan will work, run on every rank before any collective.

Three layers, cheapest first:

1. **Sizes**: head counts (when the model states them) must divide by ``tensor_parallel_size``: a
   head is the unit attention cannot split. Every other sharded size (MLP widths, the vocabulary)
   may shard unevenly (``linears.local_range``) but must give each rank at least one feature. The
   message names the size, the module and the sizes that would work.
2. **Meta-device dry run**: the first block, copied to the meta device with each sharded linear
   replaced by its rank-local shape, runs on a meta input, once for each distinct set of local
   shapes (the first and the last rank). A reshape with a hard-coded head count
   (``view(b, s, 4, hd)``) fails here, and the message names the module and the fix.
3. **Numeric shard check** (small blocks with real weights): for each attention/MLP sub-layer, the
   sum over ranks of the sub-layer run on each rank's slices must equal the unsharded sub-layer
   (in float64). A fused projection split by position fails this even where shapes happen to fit.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from picotron_lightning._util import divisors, join_name
from picotron_lightning.parallel.tensor_parallel.detect import example_block_call
from picotron_lightning.parallel.tensor_parallel.linears import (
    in_features,
    is_linear_like,
    localize_attention,
    out_features,
    shard_copy,
)
from picotron_lightning.parallel.tensor_parallel.plan_types import TensorParallelPlan
from picotron_lightning.structure import find_main_block_stack
from picotron_lightning.topology import LayoutError

NUMERIC_CHECK_MAX_PARAMS = 20_000_000  # per block; above this the check costs more than it is worth
NUMERIC_RTOL = 1e-6


def _sizes(root: nn.Module, plan: TensorParallelPlan) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(what, size) pairs that must divide by tp (head counts), and those that must be at least tp."""
    heads = [(f"{key}={value}", value) for key, value in plan.head_counts.items()]
    sharded = []
    modules = dict(root.named_modules())
    for name, style in plan.styles.items():
        m = modules[name]
        if style in ("colwise", "head") and is_linear_like(m):
            parts = plan.fused.get(name, 1)
            what = f"out_features={out_features(m)} of {name!r} ({style}" + (f", {parts} fused parts)" if parts > 1
                                                                            else ")")
            sharded.append((what, out_features(m) // parts))
        elif style == "rowwise" and is_linear_like(m):
            sharded.append((f"in_features={in_features(m)} of {name!r} (rowwise)", in_features(m)))
        elif style == "embedding" and isinstance(m, nn.Embedding):
            sharded.append((f"vocabulary size {m.num_embeddings} of {name!r}", m.num_embeddings))
    return heads, sharded


def working_sizes(root: nn.Module, plan: TensorParallelPlan, works: Any = None) -> list[int]:
    """The tp sizes this plan allows: dividing every head count, at most every sharded size, passing ``works``."""
    heads, sharded = _sizes(root, plan)
    common = 0
    for _, size in heads:
        common = math.gcd(common, size)
    smallest = min((size for _, size in sharded), default=None)
    # Without stated head counts, candidates are the divisors of any sharded size (the dry run decides).
    candidates = divisors(common) if common else sorted({d for _, size in sharded for d in divisors(size)} | {1})
    working = [d for d in candidates if smallest is None or d <= smallest]
    if works is not None:
        working = [d for d in working if d == 1 or (d <= 256 and works(d))]
    return working


def check_divisibility(root: nn.Module, plan: TensorParallelPlan, tp: int, works: Any = None) -> None:
    """Raise `LayoutError` naming the first size ``tp`` cannot split, and the sizes that would work.

    Head counts must divide by ``tp``; every other sharded size only has to be at least ``tp`` (it
    shards unevenly otherwise). ``works(size) -> bool``, if given, further filters the candidate
    sizes (the meta dry run, for models that do not state their head counts).
    """
    heads, sharded = _sizes(root, plan)
    bad = [(what, size, "does not divide") for what, size in heads if size % tp]
    bad += [(what, size, "is larger than") for what, size in sharded if size < tp]
    if not bad:
        return
    working = working_sizes(root, plan, works)
    what, _, relation = bad[0]
    more = f" (and {len(bad) - 1} more size(s))" if len(bad) > 1 else ""
    raise LayoutError(
        f"tensor_parallel_size={tp} {relation} {what}{more}; every head count must be divisible by it and every "
        f"sharded size at least as large (sizes it does not divide are sharded unevenly). Sizes that would work "
        f"for this model: tensor_parallel_size in {working}."
    )


def _block_styles(plan: TensorParallelPlan, prefix: str) -> dict[str, str]:
    return {n[len(prefix):]: s for n, s in plan.styles.items() if n.startswith(prefix) and isinstance(s, str)}


def shard_module_copy(module: nn.Module, styles: dict[str, str], fused: dict[str, int], tp: int, rank: int,
                      heads: int | None, meta: bool) -> None:
    """Turn a *copy* of a block (or sub-layer) into rank ``rank``'s shard: linears sliced, attention localized.

    ``styles`` and ``fused`` are keyed by names relative to ``module``.
    """
    modules = dict(module.named_modules())
    for name, style in styles.items():
        target = modules.get(name)
        if target is not None and is_linear_like(target) and style in ("colwise", "rowwise"):
            groups = fused.get(name, 1)
            part_width = out_features(target) // groups
            shard_copy(target, style, tp, rank, groups, meta)
            parent = modules.get(name.rpartition(".")[0]) if groups > 1 else None
            if parent is not None:
                localize_attention(parent, tp, rank, part_width, heads)


def _to(obj: Any, fn) -> Any:  # noqa: ANN001
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, obj)


def dry_run_on_meta(block: nn.Module, styles: dict[str, str], tp: int, args: tuple, kwargs: dict, name: str, *,
                    fused: dict[str, int] | None = None, heads: int | None = None) -> None:
    """Run the first and the last rank's shard of ``block`` on the meta device (uneven shards differ).

    A shape error names the module and the fix.
    """
    for rank in sorted({0, tp - 1}):
        _dry_run_rank(block, styles, (tp, rank), args, kwargs, name, fused=fused or {}, heads=heads)


def _dry_run_rank(block: nn.Module, styles: dict[str, str], tp_rank: tuple[int, int], args: tuple, kwargs: dict,
                  name: str, *, fused: dict[str, int], heads: int | None) -> None:
    tp, rank = tp_rank
    shard = copy.deepcopy(block).to("meta")
    shard_module_copy(shard, styles, fused, tp, rank, heads, meta=True)
    modules = dict(shard.named_modules())
    stack: list[str] = []
    handles = []
    for mod_name, module in modules.items():
        if not mod_name:
            continue
        # Hooks must return None, or they would replace the module's inputs / outputs.
        handles.append(module.register_forward_pre_hook(lambda m, a, n=mod_name: stack.append(n) and None))  # type: ignore[func-returns-value]  # explicit None
        handles.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))
    try:
        with torch.no_grad():
            shard(*_to(args, lambda t: t.to("meta")), **_to(kwargs, lambda t: t.to("meta")))
    except (RuntimeError, ValueError, IndexError) as err:
        where = f"{name}.{stack[-1]}" if stack else name
        cls = type(dict(block.named_modules())[stack[-1]]).__name__ if stack else type(block).__name__
        fused_note = (f" Its fused projection(s) {sorted(join_name(name, n) for n in fused)} are split by position: "
                      "split them by a width the rank can know (an attribute `split_size` or `embed_dim` of the "
                      "attention module, rewritten per rank, or `-1`), not a hard-coded one." if fused else "")
        raise LayoutError(
            f"tensor_parallel_size={tp}: a dry run (meta device) of {name} with its linears sharded (rank {rank}) "
            f"failed in `{where}` ({cls}): {err}. With tensor parallelism each rank holds 1/{tp} of the heads: tp "
            "must divide the number of heads, and a reshape with a hard-coded head count or width breaks (infer "
            "the head count with -1: `x.view(batch, seq, -1, head_dim)` and `out.reshape(batch, seq, -1)`)."
            + fused_note
        ) from err
    finally:
        for h in handles:
            h.remove()


def _sublayers(block: nn.Module, styles: dict[str, str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of each sub-layer that holds exactly one row-wise linear and the column-wise ones feeding it."""
    modules = dict(block.named_modules())
    out = []
    writers = [n for n, s in styles.items() if s == "rowwise"]
    for writer in writers:
        parent = writer.rpartition(".")[0]
        if not parent:
            if len(writers) == 1:  # a flat block with one sub-layer: checked as x + f(x), see below
                out.append(("", block))
            continue
        inside = [n for n in styles if n.startswith(parent + ".")]
        if sum(styles[n] == "rowwise" for n in inside) == 1 and any(styles[n] == "colwise" for n in inside):
            out.append((parent, modules[parent]))
    return out


def numeric_shard_check(block: nn.Module, styles: dict[str, str], tp: int, args: tuple, kwargs: dict,
                        name: str, *, fused: dict[str, int] | None = None, heads: int | None = None) -> None:
    """Sum over ranks of each sharded sub-layer == the unsharded sub-layer (float64, eval mode)."""
    calls: dict[str, tuple] = {}
    subs = _sublayers(block, styles)
    handles = [
        m.register_forward_pre_hook(lambda mod, a, kw, n=n: calls.setdefault(n, (a, kw)), with_kwargs=True)
        for n, m in subs
    ]
    try:
        with torch.no_grad():
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for sub_name, sub in subs:
        a, kw = _to(calls[sub_name] if sub_name else (args, kwargs),
                    lambda t: t.double() if t.is_floating_point() else t)
        full = copy.deepcopy(sub).double().eval()
        with torch.no_grad():
            ref = _first(full(*a, **kw))
            total = torch.zeros_like(ref)
            if not sub_name:  # the whole block, x + f(x): the residual x is counted once, not tp times
                total -= (tp - 1) * (a[0] if a else kw["hidden_states"])
            local_styles = _relative(styles, sub_name)
            local_fused = _relative(fused or {}, sub_name)
            for rank in range(tp):
                part = copy.deepcopy(full)
                shard_module_copy(part, local_styles, local_fused, tp, rank, heads, meta=False)
                total += _first(part(*a, **kw))
        err = ((total - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if err > NUMERIC_RTOL:
            raise LayoutError(
                f"tensor_parallel_size={tp}: `{join_name(name, sub_name)}` gives a different result when its linears "
                f"are sharded (relative error {err:.2e}). Its projections are probably fused: one linear producing "
                "q, k and v (or gate and up) that the code splits by position, so each rank's slice mixes them. "
                "Use separate nn.Linear modules, or pass `tp_plan=` that leaves this module unsharded."
            )


def _relative(by_name: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Entries under ``prefix`` (a sub-layer's name), keyed relative to it; all of them for ``""``."""
    if not prefix:
        return dict(by_name)
    return {n[len(prefix) + 1:]: v for n, v in by_name.items() if n.startswith(prefix + ".")}


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _on_fake_tensors(block: nn.Module) -> bool:
    """Whether ``block`` is made of fake tensors (the memory estimate's trace), where only the sizes are checked.

    The dry run and the numeric check copy the block to the meta device and the CPU, which fake tensors cannot
    follow: the swap of their storages failed half-way and the half-swapped tensors crashed the process when
    freed (a segmentation fault in the next estimate). Neither is needed there: the trace runs the sharded block
    on fake tensors itself, where a wrong shape fails as in the dry run, and the run the estimate is for checks
    its real model in full.
    """
    from torch._subclasses.fake_tensor import is_fake

    return any(is_fake(p) for p in block.parameters())


def validate_plan(root: nn.Module, plan: TensorParallelPlan, tp: int) -> None:
    """All checks of the module docstring; raises `LayoutError` on every rank alike, before any collective."""
    stack = find_main_block_stack(root)
    if (stack is None or _on_fake_tensors(stack.blocks[0])
            or not any(n.startswith(stack.block_name(0) + ".") for n in plan.styles)):
        check_divisibility(root, plan, tp)
        return
    block = stack.blocks[0]
    name = stack.block_name(0)
    styles = _block_styles(plan, name + ".")
    fused = {n[len(name) + 1:]: g for n, g in plan.fused.items() if n.startswith(name + ".")}
    heads = plan.head_counts.get("num_attention_heads")
    args, kwargs = example_block_call(root, stack)

    def works(size: int) -> bool:
        try:
            dry_run_on_meta(block, styles, size, args, kwargs, name, fused=fused, heads=heads)
        except LayoutError:
            return False
        return True

    check_divisibility(root, plan, tp, None if plan.head_counts else works)
    try:
        dry_run_on_meta(block, styles, tp, args, kwargs, name, fused=fused, heads=heads)
    except LayoutError as err:
        raise LayoutError(f"{err} Sizes that would work for this model: tensor_parallel_size in "
                          f"{working_sizes(root, plan, works)}.") from err
    params = list(block.parameters())
    if any(p.is_meta for p in params) or sum(p.numel() for p in params) > NUMERIC_CHECK_MAX_PARAMS:
        return
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    numeric_shard_check(copy.deepcopy(block).cpu(), styles, tp, _to(args, cpu), _to(kwargs, cpu), name,
                        fused=fused, heads=heads)
