"""Run chosen modules in fp32 inside an autocast region, and keep the record of why.

A promoted module gets a forward pre-hook that disables autocast and casts its low-precision
floating inputs to fp32, and an ``always_call`` forward hook that restores autocast (also when
the forward raises). Hooks rather than a replaced ``forward`` keep ``deepcopy`` and FSDP2 wrappers
correct, and removing the hooks is the whole of a demotion. Backward follows automatically: the
saved tensors are fp32, so the module's backward runs in fp32 too.

Demotion: with ``demote_after=N``, a module promoted for an overflow is watched; if its fp32
output stayed below ``demote_margin * fp16_max`` for N consecutive steps it goes back to low
precision. A module that overflows again after a demotion waits twice as long next time.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from picotron_lightning.precision.analyzer import FP16_MAX

log = logging.getLogger("picotron_lightning.precision")


@dataclass
class Promotion:
    """One module running in fp32, since when and why."""

    module: str
    reason: str
    step: int
    source: str  # "plan" (fp32 island, user, probe) or "dynamic" (overflow/NaN traced to it)
    demotions: int = 0  # times it was tried in low precision again and overflowed again
    quiet_steps: int = 0


def _to_fp32(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


class _ForwardWrapper:
    """Installs ``wrapper`` as ``module.forward``; ``remove()`` puts the previous forward back (a hook-like handle)."""

    def __init__(self, module: nn.Module, wrapper: Any) -> None:
        self.module, self.wrapper = module, wrapper
        self.previous = module.__dict__.get("forward")  # None: the class's forward
        module.forward = wrapper  # type: ignore[method-assign]

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is not self.wrapper:
            return  # removed already, or wrapped again since: leave the newer wrapper in place
        if self.previous is None:
            del self.module.forward
        else:
            self.module.forward = self.previous  # type: ignore[method-assign]


class _Fp32Forward:
    """A promoted module's forward: autocast off, floating inputs cast to fp32, then the forward it replaced.

    An object holding the module, not a closure over its bound ``forward``: ``copy.deepcopy(module)`` then
    gives the copy a wrapper that calls the copy (the tensor-parallel dry run deep-copies blocks to the meta
    device; a closure kept calling the original, on CPU tensors).
    """

    def __init__(self, module: nn.Module, device_type: str, previous: Any) -> None:
        self.module, self.device_type = module, device_type
        self.previous = previous  # the forward set on the instance before this one, or None: the class's

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inner = self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)
        with torch.autocast(self.device_type, enabled=False):
            return inner(*tree_map(_to_fp32, args), **tree_map(_to_fp32, kwargs))


class PromotionManager:
    """Applies, records and (optionally) reverts fp32 promotions on one model.

    Args:
        device_type: the autocast device type to disable inside promoted modules.
        demote_after: quiet steps before a dynamic promotion is tried in low precision again
            (None: promotions are permanent).
        demote_margin: "quiet" means fp32 output absmax below ``demote_margin * fp16 max``.
    """

    def __init__(self, device_type: str = "cpu", demote_after: int | None = None,
                 demote_margin: float = 0.5) -> None:
        self.device_type = device_type
        self.demote_after = demote_after
        self.demote_margin = demote_margin
        self.promotions: dict[str, Promotion] = {}
        self.demoted: dict[str, int] = {}  # name -> demotion count, kept for the back-off
        self.events: list[dict[str, Any]] = []
        self._model: nn.Module | None = None
        self._handles: dict[str, list[Any]] = {}
        self._provisional: dict[str, list[Any]] = {}  # run_in_fp32_now, not yet agreed
        self._absmax: dict[str, torch.Tensor] = {}

    # -- model binding -------------------------------------------------------------------------

    def bind(self, model: nn.Module) -> None:
        """Attach to ``model`` and (re-)apply every recorded promotion to it."""
        if self._model is model:
            return
        self._remove_all_hooks()
        self._model = model
        modules = dict(model.named_modules())
        for name in list(self.promotions):
            if name in modules:
                self._install(name, modules[name])
            # A name missing here lives on another pipeline stage; keep the record for the checkpoint.

    @property
    def model(self) -> nn.Module | None:
        """The bound model."""
        return self._model

    # -- promote / demote ----------------------------------------------------------------------

    def promote(self, name: str, reason: str, step: int, source: str = "dynamic", elsewhere: bool = False) -> bool:
        """Run ``name`` in fp32 from now on; False when it already is (or is not in this model).

        ``elsewhere=True`` records a module another rank found even where this rank's model does
        not hold it (another pipeline stage), so every rank's checkpoint state lists it.
        """
        if name in self.promotions:
            return False
        module = dict(self._model.named_modules()).get(name) if self._model is not None else None
        if self._model is not None and module is None and not elsewhere:
            return False
        demotions = self.demoted.pop(name, 0)
        self.promotions[name] = Promotion(name, reason, step, source, demotions=demotions)
        for h in self._provisional.pop(name, []):
            h.remove()
        if module is not None:
            self._install(name, module)
        self.events.append({"step": step, "event": "promote", "module": name, "reason": reason})
        if source == "dynamic":
            log.warning("picotron_lightning: step %d: module %r now runs in fp32 (%s)", step, name, reason)
        return True

    def run_in_fp32_now(self, name: str, module: nn.Module) -> None:
        """Run ``module`` in fp32 from its next call on, before the ranks agreed to promote it.

        Used by the in-forward repair: later calls of the module in the same step (pipeline
        microbatches, a shared module) then need no repair. :meth:`promote` makes it permanent,
        :meth:`drop_provisional` undoes what was not promoted.
        """
        if name not in self.promotions and name not in self._provisional:
            self._provisional[name] = self._fp32_hooks(module)

    def drop_provisional(self) -> None:
        """Remove the hooks of :meth:`run_in_fp32_now` that no :meth:`promote` confirmed."""
        for handles in self._provisional.values():
            for h in handles:
                h.remove()
        self._provisional = {}

    def demote(self, name: str, step: int, reason: str) -> None:
        """Return ``name`` to the autocast dtype."""
        promo = self.promotions.pop(name)
        self.demoted[name] = promo.demotions + 1
        for h in self._handles.pop(name, []):
            h.remove()
        self._absmax.pop(name, None)
        self.events.append({"step": step, "event": "demote", "module": name, "reason": reason})
        log.info("picotron_lightning: step %d: module %r back in low precision (%s)", step, name, reason)

    def end_step(self, step: int, skipped: bool) -> None:
        """Advance the quiet windows; demote modules whose window passed without large values."""
        if self.demote_after is None or skipped:
            return
        for name in [n for n, p in self.promotions.items() if p.source == "dynamic"]:
            promo = self.promotions[name]
            peak = self._absmax.get(name)
            if peak is None:
                continue
            # One host sync per watched module per step; only promoted modules are watched.
            if float(peak) < self.demote_margin * FP16_MAX:
                promo.quiet_steps += 1
            else:
                promo.quiet_steps = 0
            peak.zero_()
            if promo.quiet_steps >= self.demote_after * (2 ** promo.demotions):
                self.demote(name, step, f"quiet for {promo.quiet_steps} steps below "
                                        f"{self.demote_margin:g} x fp16 max")

    # -- hooks ---------------------------------------------------------------------------------

    def _install(self, name: str, module: nn.Module) -> None:
        handles = self._fp32_hooks(module)
        if self.demote_after is not None and self.promotions[name].source == "dynamic":
            handles.append(module.register_forward_hook(self._watch(name)))
        self._handles[name] = handles

    def _fp32_hooks(self, module: nn.Module) -> list[Any]:
        # A wrapper around the module's forward rather than a pre-hook entering autocast and a post-hook
        # leaving it: one `with` block is traceable by torch.compile (compile=True compiles blocks that
        # contain promoted modules), a context entered in one hook and left in another is not.
        return [_ForwardWrapper(module, _Fp32Forward(module, self.device_type, module.__dict__.get("forward")))]

    def _watch(self, name: str) -> Any:
        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                with torch.no_grad():
                    peak = output.detach().abs().amax().float()
                    prev = self._absmax.get(name)
                    self._absmax[name] = peak if prev is None else torch.maximum(prev, peak)

        return torch.compiler.disable(hook)  # bookkeeping: run eagerly under compile=True

    def _remove_all_hooks(self) -> None:
        for handles in self._handles.values():
            for h in handles:
                h.remove()
        self._handles = {}
        self.drop_provisional()

    # -- state ---------------------------------------------------------------------------------

    def dynamic_count(self) -> int:
        """Promotions made during training (not the planned islands)."""
        return sum(p.source == "dynamic" for p in self.promotions.values())

    def state_dict(self) -> dict[str, Any]:
        """Promotions, demotion counts and the event history."""
        return {"promotions": [asdict(p) for p in self.promotions.values()], "demoted": dict(self.demoted),
                "events": list(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the record and re-apply it to the bound model (or at the next :meth:`bind`)."""
        self._remove_all_hooks()
        self.promotions = {p["module"]: Promotion(**p) for p in state.get("promotions", [])}
        self.demoted = {k: int(v) for k, v in state.get("demoted", {}).items()}
        self.events = list(state.get("events", []))
        model, self._model = self._model, None
        if model is not None:
            self.bind(model)
