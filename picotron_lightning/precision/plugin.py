"""``AdaptivePrecision``: the Trainer plugin (``L.Trainer(plugins=[AdaptivePrecision()])``).

Lightning hook -> engine call:

* ``convert_module``/``connect``: remember the model, detect the hardware, plan, apply fp32 islands.
* ``train_step_context``: begin the step (analyzer hooks on sampled steps), then autocast.
* ``pre_backward``: scale the loss (fp16).
* ``optimizer_step``: run the closure, unscale and check on every rank, trace and promote, then
  Lightning's clipping hooks on unscaled gradients, then step or skip, then update the scale.
* ``state_dict``/``load_state_dict``: Lightning stores them in the checkpoint under the class name.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision import Precision as FabricPrecision
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor
from torch.nn import Module
from torch.optim import LBFGS

from picotron_lightning.precision.analyzer import PrecisionAnalyzer
from picotron_lightning.precision.engine import AdaptiveEngine
from picotron_lightning.precision.hardware import HardwareReport
from picotron_lightning.precision.policy import AdaptivePolicy, Mode, PrecisionPlan
from picotron_lightning.precision.promotion import PromotionManager
from picotron_lightning.precision.scaler import AdaptiveLossScaler

_LightningName = Literal["bf16-mixed", "16-mixed", "32-true"]  # a subset of Lightning's precision strings
_LIGHTNING_NAME: dict[str, _LightningName] = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}


class _AdaptiveBase(FabricPrecision):
    """Construction, autocast, state and metrics shared by the Trainer and Fabric plugins.

    Args:
        mode: ``"auto"`` (bf16 where native, else fp16 where native, else fp32), or force
            ``"bf16"``, ``"fp16"``, ``"fp32"``.
        device: autocast device type; ``None`` infers it from the model's parameters.
        fp32_islands: keep norms, softmax, routers and loss modules in fp32.
        fp32_modules: module names (exact, or prefixes ending in ``.``) always in fp32.
        fp8: ``"auto"`` or ``False``; fp8 needs fp8 hardware and ``torchao`` installed.
        analysis_interval: sample module statistics every N optimizer steps (0: only to trace overflows).
        near_overflow: in fp16, promote a module whose output reached this fraction of the fp16
            maximum on a sampled step (``None``: only after an actual overflow).
        demote_after: quiet steps after which a dynamically promoted module is tried in low
            precision again (``None``: promotions are permanent).
        max_consecutive_skips: stop with an explanation after this many skipped steps in a row.
        repair_forward: on a sampled step, recompute a module whose low-precision output turned
            non-finite in fp32 inside the same forward and keep the step (``False``: skip the step
            and promote the module afterwards, as before).
        promote_siblings: with a repaired culprit that is a child of a block in a stack
            (``layers.2.mlp``), also promote the same module in the other blocks (``layers.*.mlp``).
        retry_unsampled: Trainer only: when a step that was not sampled has non-finite gradients,
            run its closure (forward and backward of the same batch) once more with tracing, so a
            forward overflow is repaired instead of skipped. ``training_step`` then runs twice for
            that batch. Not with gradient accumulation (the earlier micro-batches' gradients are in
            ``.grad``) or manual optimization; there the step is skipped and the next one sampled.
        scaler: a configured :class:`AdaptiveLossScaler` (used in fp16 mode).
        hardware: a pre-computed :class:`HardwareReport` (skips detection).
    """

    def __init__(self, mode: Mode = "auto", *, device: str | None = None, fp32_islands: bool = True,
                 fp32_modules: list[str] | None = None, fp8: Literal["auto"] | bool = "auto",
                 analysis_interval: int = 100, near_overflow: float | None = 0.5,
                 demote_after: int | None = None,
                 max_consecutive_skips: int = 50, scaler: AdaptiveLossScaler | None = None,
                 hardware: HardwareReport | None = None, repair_forward: bool = True,
                 promote_siblings: bool = True, retry_unsampled: bool = True) -> None:
        policy = AdaptivePolicy(mode=mode, fp32_islands=fp32_islands, fp32_modules=fp32_modules, fp8=fp8)
        self._engine = AdaptiveEngine(
            policy=policy, device=device, hardware=hardware, scaler=scaler,
            analyzer=PrecisionAnalyzer(interval=analysis_interval),
            promotions=PromotionManager(device_type=device or "cpu", demote_after=demote_after),
            near_overflow=near_overflow, max_consecutive_skips=max_consecutive_skips,
            repair_forward=repair_forward, promote_siblings=promote_siblings, retry_unsampled=retry_unsampled,
        )
        self.precision = _LIGHTNING_NAME[mode] if mode != "auto" else "32-true"

    # -- what users inspect --------------------------------------------------------------------

    @property
    def plan(self) -> PrecisionPlan | None:
        """The per-module plan (after the model was set up)."""
        return self._engine.plan

    @property
    def hardware(self) -> HardwareReport | None:
        """What the detector found."""
        return self._engine.hardware

    @property
    def analyzer(self) -> PrecisionAnalyzer:
        """Sampled per-module statistics (``print(plugin.analyzer.report())``)."""
        return self._engine.analyzer

    @property
    def promotions(self) -> PromotionManager:
        """Modules running in fp32, with reasons and history."""
        return self._engine.promotions

    @property
    def scaler(self) -> AdaptiveLossScaler | None:
        """The loss scaler (disabled, scale 1, outside fp16)."""
        return self._engine.scaler

    def metrics(self) -> dict[str, float]:
        """``scale``, ``promotions`` (dynamic), ``fp32_modules``, ``skipped_steps``, ``overflow_steps``."""
        return self._engine.metrics()

    # -- set-up --------------------------------------------------------------------------------

    def _bind(self, module: Module, device_type: str | None = None) -> None:
        self._engine.bind(module)
        if device_type is not None:
            self._engine.ensure_planned(device_type)
        if self._engine.plan is not None:
            self.precision = _LIGHTNING_NAME[self._engine.plan.mode]

    def convert_module(self, module: Module) -> Module:
        """Plan for ``module`` and install the fp32 islands; parameters stay fp32 (master weights)."""
        self._bind(module)
        return module

    def fsdp_mixed_precision_policy(self, device: str | torch.device | None = None) -> Any:
        """The FSDP2 ``MixedPrecisionPolicy`` consistent with this plugin (None in fp32).

        Parameters stay fp32 and autocast picks the compute dtype per op: FSDP2 fixes
        ``param_dtype`` per module when it shards, which would make a later fp32 promotion
        impossible. Gradients are reduced in fp32, so no rank sums in 16 bits.
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if device is not None:
            self._engine.ensure_planned(torch.device(device).type)
        plan = self._engine.plan
        if plan is None:
            self._engine.ensure_planned()
            plan = self._engine.plan
        if plan is None or plan.mode == "fp32":
            return None
        return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, output_dtype=None,
                                    cast_forward_inputs=True)

    # -- forward -------------------------------------------------------------------------------

    def forward_context(self) -> AbstractContextManager:
        """Autocast in the planned dtype (promoted modules switch it off inside themselves)."""
        return self._engine.autocast()

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Scale, scaler counters, promotions with reasons, skip history, step counter."""
        return self._engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and re-apply the promotions to the model."""
        self._engine.load_state_dict(state_dict)

    def teardown(self) -> None:
        """Remove the analyzer's hooks if a run stopped mid-step."""
        self._engine.analyzer.detach()


class AdaptivePrecision(_AdaptiveBase, Precision):
    """Adaptive mixed precision for the Trainer: ``L.Trainer(plugins=[AdaptivePrecision()])``.

    Chooses bf16/fp16/fp32 from the hardware, keeps fp32 islands, promotes a module that
    overflows to fp32 by itself, scales the loss with hysteresis in fp16 and reports every
    skipped step. See ``docs/precision.md``.
    """

    def connect(
        self, model: Module, optimizers: list[Any], lr_schedulers: list[Any]
    ) -> tuple[Module, list, list]:
        """Called after the strategy moved the model: confirm the device type the plan assumed."""
        device_type = next((p.device.type for p in model.parameters() if p.device.type != "meta"), None)
        self._bind(model, device_type if self._engine.device is None else None)
        return model, optimizers, lr_schedulers

    @contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        """Begin the step (sampled analysis), then autocast."""
        self._engine.begin_step()
        with self.forward_context():
            yield

    def pre_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        """Scale the loss before Lightning's backward hooks run."""
        return super().pre_backward(self._engine.scale_loss(tensor), module)

    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        """Run the closure, then check, trace, clip, and step only on finite gradients."""
        if isinstance(optimizer, LBFGS):
            raise TypeError("AdaptivePrecision does not support LBFGS: it re-runs the closure inside step().")
        engine = self._engine
        engine.begin_step()
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            # training_step returned None: Lightning skipped backward, so there is nothing to step.
            engine.abandon_step()
            return None
        skip, reason, count = engine.after_backward(optimizer)
        trainer = getattr(model, "_trainer", None)
        accumulating = trainer is not None and trainer.accumulate_grad_batches > 1
        if skip and model.automatic_optimization and not accumulating and engine.begin_retry():
            closure_result = closure()  # zeroes the gradients, then forward and backward again, sampled
            if closure_result is None:
                engine.abandon_step()
                return None
            skip, reason, count = engine.after_backward(optimizer)
        self._after_closure(model, optimizer)  # on_before_optimizer_step + clipping, on unscaled grads
        out = None if skip else optimizer.step(**kwargs)
        engine.end_step(skip, reason, count)
        return closure_result if skip else out
