"""Checks that a tensor-parallel plan will work, run on every rank before any collective.

Three layers, cheapest first:

1. **Divisibility**: head counts (when the model states them), the feature sizes of every sharded
   linear and the vocabulary must divide by ``tensor_parallel_size``. The message names the size,
   the module and the sizes that would work.
2. **Meta-device dry run**: the first block, copied to the meta device with each sharded linear
   replaced by its rank-local shape, runs on a meta input. A reshape with a hard-coded head count
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
from picotron_lightning.parallel.tensor_parallel.plan_types import TensorParallelPlan
from picotron_lightning.structure import find_main_block_stack
from picotron_lightning.topology import LayoutError

NUMERIC_CHECK_MAX_PARAMS = 20_000_000  # per block; above this the check costs more than it is worth
NUMERIC_RTOL = 1e-6


def _sizes(root: nn.Module, plan: TensorParallelPlan) -> list[tuple[str, int]]:
    """(what, size) pairs that must divide by tp, head counts first."""
    out = [(f"{key}={value}", value) for key, value in plan.head_counts.items()]
    modules = dict(root.named_modules())
    for name, style in plan.styles.items():
        m = modules[name]
        if style in ("colwise", "head") and isinstance(m, nn.Linear):
            out.append((f"out_features={m.out_features} of {name!r} ({style})", m.out_features))
        elif style == "rowwise" and isinstance(m, nn.Linear):
            out.append((f"in_features={m.in_features} of {name!r} (rowwise)", m.in_features))
        elif style == "embedding" and isinstance(m, nn.Embedding):
            out.append((f"vocabulary size {m.num_embeddings} of {name!r}", m.num_embeddings))
    return out


def check_divisibility(root: nn.Module, plan: TensorParallelPlan, tp: int, works: Any = None) -> None:
    """Raise `LayoutError` naming the first size that ``tp`` does not divide, and the sizes that would.

    ``works(size) -> bool``, if given, further filters the candidate sizes (the meta dry run, for
    models that do not state their head counts).
    """
    sizes = _sizes(root, plan)
    bad = [(what, size) for what, size in sizes if size % tp]
    if not bad:
        return
    common = 0
    for _, size in sizes:
        common = math.gcd(common, size)
    working = divisors(common) if common else [1]
    if works is not None:
        working = [d for d in working if d == 1 or (d <= 256 and works(d))]
    what, _ = bad[0]
    more = f" (and {len(bad) - 1} more size(s))" if len(bad) > 1 else ""
    raise LayoutError(
        f"tensor_parallel_size={tp} does not divide {what}{more}; every head count and sharded size must be "
        f"divisible. Sizes that would work for this model: tensor_parallel_size in {working}."
    )


def _shard_linear(linear: nn.Linear, style: str, tp: int, rank: int, device: str | torch.device | None) -> None:
    """Replace ``linear``'s parameters by rank ``rank``'s slice (on ``device``: "meta" for shapes only)."""
    w = linear.weight
    if style in ("colwise", "head"):
        rows = w.shape[0] // tp
        new_w = w[rank * rows:(rank + 1) * rows]
        new_b = linear.bias[rank * rows:(rank + 1) * rows] if linear.bias is not None else None
    else:
        cols = w.shape[1] // tp
        new_w = w[:, rank * cols:(rank + 1) * cols]
        # The bias of a row-wise layer is added once, after the reduction.
        new_b = linear.bias if (linear.bias is not None and rank == 0) else (
            torch.zeros_like(linear.bias) if linear.bias is not None else None)
    to = (lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")) if device == "meta" else (
        lambda t: t.detach().clone())
    linear.weight = nn.Parameter(to(new_w), requires_grad=False)
    if new_b is not None:
        linear.bias = nn.Parameter(to(new_b), requires_grad=False)
    linear.in_features, linear.out_features = linear.weight.shape[1], linear.weight.shape[0]


def _block_styles(plan: TensorParallelPlan, prefix: str) -> dict[str, str]:
    return {n[len(prefix):]: s for n, s in plan.styles.items() if n.startswith(prefix) and isinstance(s, str)}


def _to(obj: Any, fn) -> Any:  # noqa: ANN001
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, obj)


def dry_run_on_meta(block: nn.Module, styles: dict[str, str], tp: int, args: tuple, kwargs: dict, name: str) -> None:
    """Run rank 0's shard of ``block`` on the meta device; a shape error names the module and the fix."""
    shard = copy.deepcopy(block).to("meta")
    modules = dict(shard.named_modules())
    for mod_name, style in styles.items():
        if isinstance(modules.get(mod_name), nn.Linear) and style in ("colwise", "rowwise"):
            _shard_linear(modules[mod_name], style, tp, 0, "meta")
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
        raise LayoutError(
            f"tensor_parallel_size={tp}: a dry run (meta device) of {name} with its linears sharded failed in "
            f"`{where}` ({cls}): {err}. With tensor parallelism each rank holds 1/{tp} of the heads, so a "
            "reshape with a hard-coded head count or width breaks. Infer the head count with -1: "
            "`x.view(batch, seq, -1, head_dim)` and `out.reshape(batch, seq, -1)`."
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
                        name: str) -> None:
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
            for rank in range(tp):
                part = copy.deepcopy(full)
                mods = dict(part.named_modules())
                for mod_name, style in styles.items():
                    local = mod_name if not sub_name else (
                        mod_name[len(sub_name) + 1:] if mod_name.startswith(sub_name + ".") else None)
                    if local and isinstance(mods.get(local), nn.Linear):
                        _shard_linear(mods[local], style, tp, rank, None)
                total += _first(part(*a, **kw))
        err = ((total - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if err > NUMERIC_RTOL:
            raise LayoutError(
                f"tensor_parallel_size={tp}: `{join_name(name, sub_name)}` gives a different result when its linears "
                f"are sharded (relative error {err:.2e}). Its projections are probably fused: one linear producing "
                "q, k and v (or gate and up) that the code splits by position, so each rank's slice mixes them. "
                "Use separate nn.Linear modules, or pass `tp_plan=` that leaves this module unsharded."
            )


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def validate_plan(root: nn.Module, plan: TensorParallelPlan, tp: int) -> None:
    """All checks of the module docstring; raises `LayoutError` on every rank alike, before any collective."""
    stack = find_main_block_stack(root)
    if stack is None or not any(n.startswith(stack.block_name(0) + ".") for n in plan.styles):
        check_divisibility(root, plan, tp)
        return
    block = stack.blocks[0]
    name = stack.block_name(0)
    styles = _block_styles(plan, name + ".")
    args, kwargs = example_block_call(root, stack)

    def works(size: int) -> bool:
        try:
            dry_run_on_meta(block, styles, size, args, kwargs, name)
        except LayoutError:
            return False
        return True

    check_divisibility(root, plan, tp, None if plan.head_counts else works)
    dry_run_on_meta(block, styles, tp, args, kwargs, name)
    params = list(block.parameters())
    if any(p.is_meta for p in params) or sum(p.numel() for p in params) > NUMERIC_CHECK_MAX_PARAMS:
        return
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    numeric_shard_check(copy.deepcopy(block).cpu(), styles, tp, _to(args, cpu), _to(kwargs, cpu), name)
