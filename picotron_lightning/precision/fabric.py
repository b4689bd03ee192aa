"""``FabricAdaptivePrecision``: the same plugin for Fabric (``L.Fabric(plugins=[...])``).

Fabric has no closure: the forward runs in ``forward_context`` (the step begins there),
``fabric.backward`` scales the loss, ``fabric.clip_gradients`` unscales through
``unscale_gradients``, and ``optimizer.step()`` lands in ``optimizer_step``, which skips the step
on non-finite gradients. Put the plugin in the state you save to keep scale and promotions:
``fabric.save(path, {"model": model, "optimizer": opt, "precision": plugin})``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any

from torch import Tensor
from torch.nn import Module
from torch.optim import LBFGS, Optimizer

from picotron_lightning.precision.plugin import _AdaptiveBase


class FabricAdaptivePrecision(_AdaptiveBase):
    """Adaptive mixed precision for Fabric; arguments as :class:`AdaptivePrecision`."""

    def forward_context(self) -> AbstractContextManager:
        """Begin the step on the first forward after a step, then autocast."""
        return self._forward()

    @contextmanager
    def _forward(self) -> Any:
        engine = self._engine
        if engine.model is not None and not engine._in_step:
            devices = (p.device.type for p in engine.model.parameters() if p.device.type != "meta")
            device_type = next(devices, None)
            if engine.device is None and device_type is not None:
                self._bind(engine.model, device_type)  # Fabric moves the model after convert_module
        engine.begin_step()
        with engine.autocast():
            yield

    def backward(self, tensor: Tensor, model: Module | None, *args: Any, **kwargs: Any) -> None:
        """Backward on the scaled loss."""
        self._engine.scale_loss(tensor).backward(*args, **kwargs)

    def unscale_gradients(self, optimizer: Optimizer) -> None:
        """Unscale (and check) before ``fabric.clip_gradients``; the step reuses the result.

        On a step that will be skipped the gradients are zeroed: ``fabric.clip_gradients`` raises
        on a non-finite norm by default, and these gradients are thrown away anyway.
        """
        skip, _, _ = self._engine.after_backward(optimizer)
        if skip:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.zero_()

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        """Step on finite gradients, skip (and report) otherwise."""
        if isinstance(optimizer, LBFGS):
            raise TypeError("FabricAdaptivePrecision does not support LBFGS.")
        engine = self._engine
        skip, reason, count = engine.after_backward(optimizer)
        out = None if skip else optimizer.step(**kwargs)
        engine.end_step(skip, reason, count)
        return out
