"""The step logic shared by the Trainer and Fabric plugins.

One object owns the hardware report, the plan, the analyzer, the promotions and the scaler, and
exposes the moments of a training step: ``begin_step`` (before the forward), ``scale_loss``,
``after_backward`` (unscale, detect, trace, promote) and ``end_step`` (scale update, demotion,
bookkeeping). The plugins only map Lightning's and Fabric's hooks onto these calls.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from picotron_lightning.precision.analyzer import FP16_MAX, PrecisionAnalyzer, finite_output
from picotron_lightning.precision.hardware import HardwareDetector, HardwareReport
from picotron_lightning.precision.policy import AdaptivePolicy, PrecisionPlan
from picotron_lightning.precision.promotion import PromotionManager
from picotron_lightning.precision.repair import recompute_in_fp32, repair_blocker, structural_siblings
from picotron_lightning.precision.scaler import AdaptiveLossScaler, LossScaleError

log = logging.getLogger("picotron_lightning.precision")
STATE_VERSION = 1
_CULPRIT_TAGS = ("forward", "backward", "fp32")  # details of a traced culprit in the ranks' exchange


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / Lightning / Fabric wrappers (names stay stable across them)."""
    while True:
        inner = getattr(model, "_forward_module", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


class AdaptiveEngine:
    """State and per-step logic of adaptive mixed precision (see :class:`AdaptivePrecision`)."""

    def __init__(self, *, policy: AdaptivePolicy, device: str | None, hardware: HardwareReport | None,
                 scaler: AdaptiveLossScaler | None, analyzer: PrecisionAnalyzer, promotions: PromotionManager,
                 near_overflow: float | None, max_consecutive_skips: int, repair_forward: bool = True,
                 promote_siblings: bool = True, retry_unsampled: bool = True) -> None:
        self.policy = policy
        self.device = device
        self.hardware = hardware
        self._scaler_arg = scaler
        self.scaler: AdaptiveLossScaler | None = None
        self.analyzer = analyzer
        self.promotions = promotions
        self.near_overflow = near_overflow
        self.max_consecutive_skips = max_consecutive_skips
        self.repair_forward = repair_forward
        self.promote_siblings = promote_siblings
        self.retry_unsampled = retry_unsampled
        self.retried: list[int] = []  # steps whose closure ran a second time, sampled
        self._unsampled_overflow = False  # this step: non-finite gradients and no rank had sampled
        self._sample_next = True  # the first step is always sampled
        self._not_precision: set[str] = set()  # this step: culprits that overflow in fp32 too
        self.analyzer.repair = self._repair if repair_forward else None
        self.plan: PrecisionPlan | None = None
        self.model: nn.Module | None = None
        self.step = 0
        self.consecutive_skips = 0
        self._device_type: str | None = None
        self._in_step = False
        self._checked: tuple[bool, str | None, bool] | None = None  # result of after_backward this step
        self._pending_state: dict[str, Any] | None = None

    # -- setup ---------------------------------------------------------------------------------

    def bind(self, model: nn.Module) -> None:
        """Remember the user's module (first call wins) and plan as far as the device is known."""
        if self.model is None:
            self.model = unwrap(model)
        self.ensure_planned()

    def _guess_device_type(self) -> str:
        if self.device is not None:
            return torch.device(self.device).type
        if self.model is not None:
            for p in self.model.parameters():
                if p.device.type != "meta":
                    # Parameters still on CPU before the strategy moves them: CUDA is the likely target.
                    if p.device.type == "cpu" and torch.cuda.is_available():
                        return "cuda"
                    return p.device.type
        return "cuda" if torch.cuda.is_available() else "cpu"

    def ensure_planned(self, actual_device_type: str | None = None) -> None:
        """Plan once; re-plan if the device turned out to be another type than first guessed."""
        device_type = actual_device_type or self._device_type or self._guess_device_type()
        if self.plan is not None and device_type == self._device_type:
            return
        if self.plan is not None:
            log.info("picotron_lightning: precision re-planned for %s (first guess was %s)",
                     device_type, self._device_type)
        self._device_type = device_type
        if self.hardware is None or self.hardware.device_type != device_type:
            self.hardware = HardwareDetector(device_type).detect()
        self.plan = self.policy.plan(self.model if self.model is not None else nn.Module(), self.hardware)
        if self.scaler is None or self.scaler.enabled != self.plan.loss_scaling:
            self.scaler = self._scaler_arg or AdaptiveLossScaler(enabled=self.plan.loss_scaling)
            self.scaler.enabled = self.plan.loss_scaling
            if not self.plan.loss_scaling:
                self.scaler.scale = 1.0
        self.promotions.device_type = device_type
        if self.model is not None:
            self.promotions.bind(self.model)
            for name in self.plan.fp32_modules():
                self.promotions.promote(name, self.plan.modules[name].reason, self.step, source="plan")
            self._apply_fp8()
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def _apply_fp8(self) -> None:
        names = set(self.plan.fp8_modules()) if self.plan is not None else set()
        if not names or getattr(self.model, "_picotron_fp8_applied", False):
            return
        assert self.model is not None  # the only caller, ensure_planned, checks it
        from torchao.float8 import convert_to_float8_training  # optional extra, planned only if importable

        convert_to_float8_training(self.model, module_filter_fn=lambda mod, fqn: fqn in names)
        self.model._picotron_fp8_applied = True  # type: ignore[assignment]  # torch types attrs as Tensor | Module

    @property
    def device_type(self) -> str:
        """The autocast device type."""
        if self._device_type is None:
            self.ensure_planned()
        return self._device_type  # type: ignore[return-value]

    # -- the step ------------------------------------------------------------------------------

    def autocast(self) -> AbstractContextManager:
        """The forward context: autocast in the planned dtype, or nothing for fp32."""
        dtype = self.plan.autocast_dtype if self.plan is not None else None
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=dtype, cache_enabled=False)

    def begin_step(self) -> None:
        """Before the first forward of an optimizer step: attach the analyzer on sampled steps.

        Besides every ``analysis_interval``-th step, the first step (of the run, after a resume,
        after a demotion) and the step after one that repaired something are always sampled, so an
        overflow there is repaired in the forward instead of costing an unsampled skip.
        """
        if self._in_step:
            return
        self._in_step = True
        self._checked = None
        low_precision = self.plan is not None and self.plan.mode != "fp32"
        if self.model is not None and (self.analyzer.should_sample(self.step)
                                       or (self._sample_next and low_precision)):
            self.analyzer.attach(self.model)
            self._sample_next = False

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the current scale (fp16), or unchanged."""
        return self.scaler.scale_loss(loss) if self.scaler is not None else loss

    def _repair(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, str | None]:
        """The analyzer's repair callback: an fp32 recompute of a forward culprit (see repair.py)."""
        if name in self.promotions.promotions:
            self._not_precision.add(name)
            return None, "it already runs in fp32"
        why = repair_blocker(name, module, self.device_type)
        if why is not None:
            if why.startswith("it already runs in fp32"):
                self._not_precision.add(name)
            return None, why
        output = recompute_in_fp32(module, args, kwargs, self.device_type)
        if not finite_output(output):
            self._not_precision.add(name)
            return None, "its output is non-finite in fp32 too"
        self.promotions.run_in_fp32_now(name, module)
        return output, None

    def after_backward(self, optimizer: Any) -> tuple[bool, str | None, bool]:
        """Unscale gradients, detect overflow on any rank, agree on findings, promote.

        Returns ``(skip, reason, count_for_scale)``. Idempotent within a step (Fabric may unscale
        for clipping and again at the step). The found-inf all-reduce also carries two flags (some
        rank has findings; some rank sampled), so the ranks exchange findings only on steps where
        there is something to exchange, and all of them or none take part.
        """
        if self._checked is not None:
            return self._checked
        assert self.scaler is not None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        sampled = self.analyzer.active
        local = [(name, "repaired") for name in self.analyzer.repaired]
        if sampled and self.near_overflow is not None and self.plan is not None and self.plan.mode == "fp16":
            local += self._near_overflow_findings()
        found_inf, (anyone_found, anyone_sampled) = self.scaler.unscale_check_share(
            params, (float(bool(local)), float(sampled)))
        traced = found_inf and anyone_sampled > 0
        self._unsampled_overflow = found_inf and not traced  # the same on every rank: both flags are global
        if traced and sampled:
            local += self._local_culprits()
        found = _agree(local) if anyone_found > 0 or traced else []
        repaired = self._promote_found(found)
        reason, count = None, True
        if traced:
            reason, count = self._explain([(n, d) for n, d in found if d.split(":")[0] in _CULPRIT_TAGS])
        elif found_inf:
            reason = "non-finite gradients; the next step traces which module"
            self.analyzer.request()
        self._promote_near_overflow(found)  # after the culprits: a culprit's reason is its overflow
        if repaired:
            self._sample_next = True  # overflows come in waves early in training: look again next step
        self._checked = (found_inf, reason, count)
        return self._checked

    def _near_overflow_findings(self) -> list[tuple[str, str]]:
        assert self.near_overflow is not None  # the only caller, after_backward, checks it
        limit = self.near_overflow * FP16_MAX
        return [(name, f"near:{stats.act_absmax:.3g}") for name, stats in self.analyzer.step_stats.items()
                if name and stats.output_dtype == "float16" and stats.act_absmax > limit]

    def _local_culprits(self) -> list[tuple[str, str]]:
        """This rank's culprit of a non-finite step: forward (not repaired) first, else backward."""
        culprit = self.analyzer.first_culprit()
        if culprit is None and self.model is not None:
            params = self.analyzer.parameter_culprits(self.model)
            culprit = (params[-1], "backward") if params else None
        if culprit is None:
            return []
        name, where = culprit
        if where == "forward" and name in self._not_precision:
            return [(name, "fp32")]
        why = self.analyzer.unrepaired.get(name)
        return [(name, f"forward:{why}" if where == "forward" and why else where)]

    def _promote_found(self, found: list[tuple[str, str]]) -> list[str]:
        """Promote what the ranks agreed on: repaired culprits (and their siblings), near overflows."""
        mode = _dtype_name(self.plan)
        repaired = [name for name, detail in found if detail == "repaired"]
        for name in repaired:
            self.promotions.promote(
                name, f"non-finite {mode} output in forward at step {self.step}; recomputed in fp32 in the "
                      "same forward (step kept)", self.step, elsewhere=True)
        if self.promote_siblings and self.model is not None:
            for name in repaired:
                stack, siblings = structural_siblings(self.model, name)
                kind = type(self.model.get_submodule(name)).__name__ if siblings else ""
                for sibling in siblings:
                    self.promotions.promote(
                        sibling, f"structural sibling of {name} (same {kind} at the "
                                 f"same place in each block of {stack}), promoted with it at step {self.step}",
                        self.step)
        self.promotions.drop_provisional()  # repairs no rank reported (cannot happen) do not linger
        return repaired

    def _promote_near_overflow(self, found: list[tuple[str, str]]) -> None:
        for name, detail in found:
            if detail.startswith("near:"):
                self.promotions.promote(name, f"near overflow: fp16 output reached {detail[5:]} "
                                              f"> {self.near_overflow:g} x fp16 max", self.step)

    def _explain(self, culprits: list[tuple[str, str]]) -> tuple[str, bool]:
        """The reason of a skipped, sampled step, promoting what can be promoted."""
        assert self.scaler is not None  # the only caller, after_backward, asserts it
        if not culprits:
            return f"non-finite gradients at scale {self.scaler.scale:g}, no module traced", True
        not_precision = [name for name, detail in culprits if detail == "fp32"]
        forward = [(name, detail.partition(":")[2]) for name, detail in culprits if detail.startswith("forward")]
        if forward:
            promoted = [(n, why) for n, why in forward if self.promotions.promote(
                n, f"non-finite {_dtype_name(self.plan)} output in forward at step {self.step}"
                   + (f" (not repaired in place: {why})" if why else ""), self.step, elsewhere=True)]
            if promoted:
                where = ", ".join(n for n, _ in promoted)
                return f"forward overflow in {where} (promoted to fp32; not repaired in place)", False
        if not_precision or forward:
            where = ", ".join(not_precision + [n for n, _ in forward])
            return (f"forward produced Inf/NaN in {where} although it runs in fp32: "
                    "not a precision problem (check inputs, learning rate, the module's maths)"), True
        names = [name for name, _ in culprits]
        if self.scaler.enabled and self.scaler.scale <= self.scaler.min_scale:
            promoted_names = [n for n in names if self.promotions.promote(
                n, f"backward overflow at the floor loss scale {self.scaler.scale:g}", self.step)]
            if promoted_names:
                where = ", ".join(promoted_names)
                return f"backward overflow in {where} at the floor scale (promoted to fp32)", False
        return f"gradient overflow at scale {self.scaler.scale:g} (traced to {', '.join(names)})", True

    def begin_retry(self) -> bool:
        """After an unsampled step with non-finite gradients: sample a second run of the same step.

        True when the caller should run the step's closure again (then call :meth:`after_backward`
        again). The decision rests on all-reduced flags, so all ranks retry together or none does.
        """
        if not (self.retry_unsampled and self._unsampled_overflow and self.model is not None):
            return False
        self._unsampled_overflow = False
        self._checked = None
        self.analyzer.attach(self.model)
        self.retried.append(self.step)
        log.info("picotron_lightning: step %d: non-finite gradients on an unsampled step; running it again "
                 "with tracing", self.step)
        return True

    def abandon_step(self) -> None:
        """The step ended without a backward (``training_step`` returned None): forget its findings."""
        self.analyzer.detach()
        self.promotions.drop_provisional()
        self._in_step = False

    def end_step(self, skipped: bool, reason: str | None, count_for_scale: bool) -> None:
        """After the optimizer step (or its skip): update the scale, demote, count, detach."""
        assert self.scaler is not None
        self.analyzer.detach()
        self.promotions.drop_provisional()
        self._not_precision = set()
        self._unsampled_overflow = False
        self.scaler.update(skipped, self.step, reason, count_overflow=count_for_scale)
        events = len(self.promotions.events)
        self.promotions.end_step(self.step, skipped)
        if any(e["event"] == "demote" for e in self.promotions.events[events:]):
            self._sample_next = True  # a demoted module may overflow again at once: trace that step
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        self.step += 1
        self._in_step = False
        self._checked = None
        if self.consecutive_skips >= self.max_consecutive_skips:
            recent = "; ".join(f"step {s.step}: {s.reason}" for s in self.scaler.skipped[-3:])
            raise LossScaleError(
                f"{self.consecutive_skips} optimizer steps in a row were skipped for non-finite gradients "
                f"(last ones: {recent}). Promotions so far: {sorted(self.promotions.promotions) or 'none'}. "
                "Look at the model's numerics (PrecisionAnalyzer.report()), lower the learning rate or train "
                "in fp32 (AdaptivePrecision(mode='fp32')).")

    # -- state and metrics ---------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Numbers for the monitoring callbacks."""
        scaler = self.scaler
        return {
            "scale": float(scaler.scale) if scaler is not None else 1.0,
            "promotions": float(self.promotions.dynamic_count()),
            "fp32_modules": float(len(self.promotions.promotions)),
            "skipped_steps": float(scaler.skipped_steps) if scaler is not None else 0.0,
            "overflow_steps": float(scaler.overflow_steps) if scaler is not None else 0.0,
            "retried_steps": float(len(self.retried)),
        }

    def state_dict(self) -> dict[str, Any]:
        """Scale, counters, promotions and their history."""
        return {
            "version": STATE_VERSION,
            "mode": self.plan.mode if self.plan is not None else None,
            "step": self.step,
            "consecutive_skips": self.consecutive_skips,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "promotions": self.promotions.state_dict(),
            "retried": list(self.retried),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; deferred until the model is known if needed."""
        if self.plan is None or self.model is None:
            self._pending_state = state
            return
        self.step = int(state.get("step", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self._sample_next = True  # the first step after a resume is sampled
        self.retried = [int(s) for s in state.get("retried", [])]
        if state.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
            if not self.scaler.enabled:
                self.scaler.scale = 1.0  # resumed in bf16/fp32 from an fp16 run: no scaling
        self.promotions.load_state_dict(state["promotions"])
        # Planned islands of this run stay, even if the saved run planned differently.
        for name in self.plan.fp32_modules():
            self.promotions.promote(name, self.plan.modules[name].reason, self.step, source="plan")


def _dtype_name(plan: PrecisionPlan | None) -> str:
    return plan.mode if plan is not None else "low-precision"


def _agree(local: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Union over ranks of ``(module, detail)`` findings, so all ranks promote the same modules."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    seen: list[tuple[str, str]] = []
    for items in gathered:
        for item in items:
            if tuple(item) not in seen:
                seen.append(tuple(item))
    return seen
