"""Per-module numerics: where values leave the fp16 range and which module first broke.

Hooks cost a Python call and a few reductions per module, so the analyzer attaches them only for
the steps it samples (every ``interval`` steps, plus any step the plugin asks to diagnose) and
removes them afterwards; the other steps run hook-free.

A forward *culprit* is the first module, in execution order, whose output is non-finite although
its inputs were finite: that module (or functional code in its own ``forward``) made the Inf/NaN.
A backward culprit is a module whose output gradient was finite but whose input or parameter
gradient was not. With a ``repair`` callback set (the plugins set one, see ``repair.py``), the
forward hook returns the callback's fp32 recompute as the culprit's output, so the forward goes on
with finite values and every culprit of the step is found.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

FP16_MAX = float(torch.finfo(torch.float16).max)
FP16_TINY = float(torch.finfo(torch.float16).tiny)  # smallest normal; below it fp16 loses precision


@dataclass
class ModuleStats:
    """What one sampled step saw in one module (maxima over the sampled steps)."""

    act_absmax: float = 0.0
    grad_absmax: float = 0.0
    act_over_fp16: int = 0  # values above the fp16 max (fp32 outputs) or Inf
    act_under_fp16: int = 0  # non-zero values below the smallest fp16 normal
    grad_over_fp16: int = 0
    grad_under_fp16: int = 0
    nonfinite_forward: int = 0  # sampled steps with a non-finite output
    nonfinite_backward: int = 0
    output_dtype: str = ""


def _tensors(obj: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    out = []
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out.append(t.to_local() if hasattr(t, "to_local") else t)
    return out


def _finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def finite_output(output: Any) -> bool:
    """True when every floating tensor in ``output`` (any nesting) is finite."""
    return _finite(_tensors(output))


def _is_fsdp_unit(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


class PrecisionAnalyzer:
    """Sampled forward/backward statistics for every submodule of a model.

    Args:
        interval: sample every ``interval``-th step (0: only when asked via :meth:`request`).
        track_backward: also hook gradients (costs autograd hooks on sampled steps).
    """

    def __init__(self, interval: int = 100, track_backward: bool = True) -> None:
        self.interval = interval
        self.track_backward = track_backward
        self.stats: dict[str, ModuleStats] = {}  # over all sampled steps
        self.step_stats: dict[str, ModuleStats] = {}  # the current/last sampled step only
        self.forward_culprits: list[str] = []  # this step, in execution order, not repaired
        self.backward_culprits: list[str] = []
        # Called with (name, module, args, kwargs) for a forward culprit; returns (replacement
        # output, None) or (None, why not). None: record culprits only (see repair.py).
        self.repair: Callable[[str, nn.Module, tuple, dict], tuple[Any, str | None]] | None = None
        self.repaired: list[str] = []  # this step: culprits whose output was replaced by an fp32 recompute
        self.unrepaired: dict[str, str] = {}  # this step: culprit -> why it could not be repaired
        self._handles: list[Any] = []
        self._names: dict[nn.Module, str] = {}
        self._requested = False
        self.active = False

    # -- when to sample ------------------------------------------------------------------------

    def request(self) -> None:
        """Sample the next step regardless of the interval (after an unexplained overflow)."""
        self._requested = True

    def should_sample(self, step: int) -> bool:
        """Whether ``step`` is a sampled step."""
        return self._requested or (self.interval > 0 and step % self.interval == 0)

    # -- attach / detach -----------------------------------------------------------------------

    def attach(self, model: nn.Module, names: dict[nn.Module, str] | None = None) -> None:
        """Hook every submodule of ``model`` for one step; ``names`` maps modules to reported names."""
        self.detach()
        self._requested = False
        self.active = True
        self.forward_culprits, self.backward_culprits = [], []
        self.repaired, self.unrepaired = [], {}
        self.step_stats = {}
        self._names = names or {m: n for n, m in model.named_modules()}
        for module, name in self._names.items():
            # Before FSDP2's post-forward hook: the parameters are still unsharded for a repair,
            # and FSDP2 registers its pre-backward hook on the (replaced) output.
            self._handles.append(module.register_forward_hook(
                self._forward_hook(name), with_kwargs=True, prepend=_is_fsdp_unit(module)))

    def detach(self) -> None:
        """Remove all hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.active = False

    # -- hooks ---------------------------------------------------------------------------------

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            outs = _tensors(output)
            if not outs:
                return None
            both = [self.stats.setdefault(name, ModuleStats()),
                    self.step_stats.setdefault(name, ModuleStats())]
            with torch.no_grad():
                culprit = not _finite(outs) and _finite(_tensors((args, kwargs)))
                if not _finite(outs):
                    for stats in both:
                        stats.nonfinite_forward += 1
            replacement = self._repair_or_record(name, module, args, kwargs) if culprit else None
            if replacement is not None:
                outs = _tensors(replacement)
            with torch.no_grad():
                for stats in both:
                    stats.output_dtype = str(outs[0].dtype).replace("torch.", "")
                    self._record(stats, outs, grad=False)
            if self.track_backward and torch.is_grad_enabled():
                self._hook_backward(name, both, args, kwargs, outs)
            return replacement

        # Statistics and repairs are Python-side bookkeeping with data-dependent branches: under compile=True
        # they run eagerly between the compiled pieces instead of being traced (and recompiled per module).
        return torch.compiler.disable(hook)

    def _repair_or_record(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.repair is not None:
            replacement, why = self.repair(name, module, args, kwargs)
            if replacement is not None:
                self.repaired.append(name)
                return replacement
            if why is not None:
                self.unrepaired[name] = why
        self.forward_culprits.append(name)
        return None

    def _hook_backward(self, name: str, both: list[ModuleStats], args: tuple, kwargs: dict,
                       outs: list[torch.Tensor]) -> None:
        # Per module and step: was the gradient at the output finite, and at the inputs?
        state = {"out_finite": True}

        def on_output_grad(grad: torch.Tensor) -> None:
            with torch.no_grad():
                g = grad.to_local() if hasattr(grad, "to_local") else grad
                finite = bool(torch.isfinite(g).all())
                state["out_finite"] = state["out_finite"] and finite
                for stats in both:
                    self._record(stats, [g], grad=True)
                    stats.nonfinite_backward += int(not finite)

        def on_input_grad(grad: torch.Tensor) -> None:
            g = grad.to_local() if hasattr(grad, "to_local") else grad
            if name in self.backward_culprits or not state["out_finite"]:
                return
            if not bool(torch.isfinite(g).all()):
                self.backward_culprits.append(name)

        for t in outs:
            if t.requires_grad:
                t.register_hook(on_output_grad)
        for t in _tensors((args, kwargs)):
            if t.requires_grad:
                t.register_hook(on_input_grad)

    @staticmethod
    def _record(stats: ModuleStats, tensors: list[torch.Tensor], grad: bool) -> None:
        absmax, over, under = 0.0, 0, 0
        for t in tensors:
            a = t.detach().abs()
            finite = torch.isfinite(a)
            if finite.any():
                absmax = max(absmax, float(a[finite].max()))
            over += int((a > FP16_MAX).sum())  # Inf counts as over
            under += int(((a > 0) & (a < FP16_TINY)).sum())
        if grad:
            stats.grad_absmax = max(stats.grad_absmax, absmax)
            stats.grad_over_fp16 += over
            stats.grad_under_fp16 += under
        else:
            stats.act_absmax = max(stats.act_absmax, absmax)
            stats.act_over_fp16 += over
            stats.act_under_fp16 += under

    # -- results -------------------------------------------------------------------------------

    def parameter_culprits(self, model: nn.Module) -> list[str]:
        """Modules with a non-finite gradient in one of their own parameters (after backward)."""
        out = []
        for name, module in model.named_modules():
            for p in module.parameters(recurse=False):
                g = p.grad
                if g is not None:
                    g = g.to_local() if hasattr(g, "to_local") else g
                    if not bool(torch.isfinite(g).all()):
                        out.append(name)
                        break
        return out

    def first_culprit(self) -> tuple[str, str] | None:
        """``(module, "forward"|"backward")`` that first produced a non-finite value this step."""
        if self.forward_culprits:
            return self.forward_culprits[0], "forward"
        if self.backward_culprits:
            return _leafmost(self.backward_culprits), "backward"
        return None

    def report(self, top: int = 20) -> str:
        """A table of the modules with the largest activations seen on sampled steps."""
        rows = sorted(self.stats.items(), key=lambda kv: kv[1].act_absmax, reverse=True)[:top]
        head = f"{'module':40s} {'dtype':9s} {'act max':>10s} {'grad max':>10s} {'>fp16':>7s} {'<fp16':>7s}"
        lines = [head]
        for name, s in rows:
            lines.append(f"{name or '<root>':40.40s} {s.output_dtype:9s} {s.act_absmax:10.3g} "
                         f"{s.grad_absmax:10.3g} {s.act_over_fp16 + s.grad_over_fp16:7d} "
                         f"{s.act_under_fp16 + s.grad_under_fp16:7d}")
        return "\n".join(lines)

    # -- offline probe -------------------------------------------------------------------------

    @torch.no_grad()
    def sensitivity(self, model: nn.Module, *inputs: Any, dtype: torch.dtype = torch.bfloat16,
                    device_type: str | None = None) -> list[tuple[str, float]]:
        """Rank modules by relative output error when run in ``dtype`` autocast on their fp32 inputs.

        One fp32 forward records each module's inputs and output; then every module is re-run
        alone on those exact inputs under autocast, so each error is the module's own, not the
        accumulated error of everything upstream. Returns ``[(name, rel_error)]``, worst first
        (``inf`` for a module whose low-precision output is non-finite).
        """
        if device_type is None:
            first = next(iter(model.parameters()), None)
            device_type = first.device.type if first is not None else "cpu"
        captured: dict[str, tuple[tuple, dict, list[torch.Tensor]]] = {}
        handles = []
        for name, module in model.named_modules():
            if not name:
                continue

            def capture(mod: nn.Module, args: tuple, kwargs: dict, output: Any, _n: str = name) -> None:
                captured.setdefault(_n, (args, kwargs, [t.float() for t in _tensors(output)]))

            handles.append(module.register_forward_hook(capture, with_kwargs=True))
        was_training = model.training
        model.eval()  # no dropout: both passes must see the same function
        try:
            model(*inputs)
        finally:
            for h in handles:
                h.remove()
        modules = dict(model.named_modules())
        ranking = []
        try:
            for name, (args, kwargs, ref) in captured.items():
                if not ref:
                    continue
                with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
                    low = _tensors(modules[name](*args, **kwargs))
                if not _finite(low):
                    ranking.append((name, float("inf")))
                    continue
                num = sum(float((lo.float() - r).norm()) ** 2 for lo, r in zip(low, ref, strict=False))
                den = sum(float(r.norm()) ** 2 for r in ref)
                ranking.append((name, (num ** 0.5) / max(den ** 0.5, 1e-30)))
        finally:
            model.train(was_training)
        ranking.sort(key=lambda kv: kv[1], reverse=True)
        return ranking


def _leafmost(names: list[str]) -> str:
    """Of nested candidates ("a", "a.b", "a.b.c"), the deepest: promoting it changes the least."""
    return max(names, key=lambda n: n.count("."))


@contextmanager
def sampled(analyzer: PrecisionAnalyzer, model: nn.Module, names: dict[nn.Module, str] | None = None
            ) -> Iterator[PrecisionAnalyzer]:
    """Attach for the duration of a block (handy in scripts and tests)."""
    analyzer.attach(model, names)
    try:
        yield analyzer
    finally:
        analyzer.detach()
