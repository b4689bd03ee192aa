"""A loss scaler that says what it does.

Compared with ``torch.amp.GradScaler``: it backs off only after ``hysteresis`` consecutive
overflows (one spike no longer halves the scale), never goes below ``min_scale``, stops the run
with an explanation when the scale sits at the floor and keeps overflowing, and records every
skipped optimizer step with its reason. The found-inf flag is all-reduced over the process group,
so every rank skips the same steps even when gradients are sharded (FSDP2) and differ per rank.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("picotron_lightning.precision")


class LossScaleError(RuntimeError):
    """Raised when training cannot continue in low precision; the message says why and what to try."""


@dataclass
class SkippedStep:
    """One optimizer step that was not applied."""

    step: int
    reason: str
    scale: float


def local_grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of ``params`` as plain local tensors (DTensor shards unwrapped)."""
    grads = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if hasattr(g, "to_local"):  # DTensor: check and scale the local shard only
            g = g.to_local()
        grads.append(g)
    return grads


def all_reduce_max(flag: torch.Tensor) -> torch.Tensor:
    """MAX over the default process group when one is running (so all ranks agree)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # gloo cannot reduce on CUDA tensors; a one-element copy costs nothing.
        backend = dist.get_backend()
        work = flag if backend != "gloo" else flag.cpu()
        dist.all_reduce(work, op=dist.ReduceOp.MAX)
        return work.to(flag.device)
    return flag


class AdaptiveLossScaler:
    """Dynamic loss scaling with hysteresis, a growth interval, a floor and a stop condition.

    Args:
        init_scale: starting scale (``2**16`` like GradScaler).
        growth_factor, backoff_factor: multipliers after ``growth_interval`` clean steps / on back-off.
        growth_interval: clean steps before the scale grows.
        hysteresis: consecutive overflowing steps before the scale backs off.
        min_scale, max_scale: floor and ceiling.
        max_floor_overflows: overflowing steps tolerated *at the floor* before :class:`LossScaleError`.
        enabled: ``False`` turns the scaler into an overflow detector with scale 1 (bf16/fp32).
    """

    def __init__(self, init_scale: float = 2.0**16, *, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, hysteresis: int = 2, min_scale: float = 1.0,
                 max_scale: float = 2.0**24, max_floor_overflows: int = 20, enabled: bool = True) -> None:
        if not 0.0 < backoff_factor < 1.0 or growth_factor <= 1.0:
            raise ValueError(f"Need 0 < backoff_factor < 1 < growth_factor, got {backoff_factor}, "
                             f"{growth_factor}.")
        if hysteresis < 1 or growth_interval < 1:
            raise ValueError(f"hysteresis and growth_interval must be >= 1, got {hysteresis}, "
                             f"{growth_interval}.")
        if not 0.0 < min_scale <= init_scale <= max_scale:
            raise ValueError(f"Need 0 < min_scale <= init_scale <= max_scale, got {min_scale}, {init_scale}, "
                             f"{max_scale}.")
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.max_floor_overflows = max_floor_overflows
        self._clean_steps = 0  # since the last growth or overflow
        self._consecutive_overflows = 0
        self._floor_overflows = 0
        self.skipped: list[SkippedStep] = []
        self.overflow_steps = 0

    # -- the three calls of a step -------------------------------------------------------------

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` (unchanged when disabled)."""
        return loss * self.scale if self.enabled and self.scale != 1.0 else loss

    def unscale_and_check(self, params: Iterable[torch.Tensor]) -> bool:
        """Divide gradients by the scale in place; True when any gradient on any rank is non-finite."""
        return self.unscale_check_share(params)[0]

    def unscale_check_share(self, params: Iterable[torch.Tensor], flags: Sequence[float] = ()
                            ) -> tuple[bool, list[float]]:
        """:meth:`unscale_and_check`, with ``flags`` reduced (MAX over ranks) in the same all-reduce.

        The plugin sends "this rank has findings to exchange" this way, so the ranks decide together
        whether an exchange follows, without a collective of its own on every step.
        """
        grads = local_grads(params)
        device = grads[0].device if grads else torch.device("cpu")
        found_inf = torch.zeros(1, device=device)
        groups: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        for (dev, _), group in groups.items():
            found_inf = torch.maximum(found_inf, self._unscale_group(group, dev).to(device))
        if flags:
            found_inf = torch.cat([found_inf, torch.tensor(list(flags), dtype=found_inf.dtype, device=device)])
        reduced = all_reduce_max(found_inf).tolist()
        return reduced[0] > 0, reduced[1:]

    def _unscale_group(self, group: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        if device.type == "cuda":
            # The fused AMP kernel: one pass that unscales and flags non-finite values.
            flag = torch.zeros(1, device=device)
            inv = torch.full((1,), 1.0 / self.scale, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, flag, inv)
            return flag
        # Elsewhere that kernel is a slow scalar loop (about 100 ms for 3M values on CPU); a
        # vectorised multiply plus per-tensor norms is ~20x faster. A norm is non-finite exactly
        # when a value is (or when a finite gradient is so large its norm overflows fp32, which
        # is as broken for clipping and the optimizer).
        if self.scale != 1.0:
            torch._foreach_mul_(group, 1.0 / self.scale)
        norms = torch._foreach_norm(group)
        return (~torch.isfinite(torch.stack(norms))).any().float().reshape(1)

    def update(self, found_inf: bool, step: int, reason: str | None = None,
               count_overflow: bool = True) -> None:
        """Adjust the scale after a step; record and report the step when ``found_inf``.

        ``count_overflow=False`` records the skip without touching the scale: used when the
        overflow was traced to a module and fixed by promoting it, which says nothing about the scale.
        """
        if not found_inf:
            self._consecutive_overflows = 0
            self._floor_overflows = 0
            self._clean_steps += 1
            if self.enabled and self._clean_steps >= self.growth_interval:
                self.scale = min(self.scale * self.growth_factor, self.max_scale)
                self._clean_steps = 0
            return
        self.overflow_steps += 1
        self._clean_steps = 0
        why = reason or "non-finite gradients"
        self.skipped.append(SkippedStep(step=step, reason=why, scale=self.scale))
        log.warning("picotron_lightning: skipped optimizer step %d (%s); loss scale %g",
                    step, why, self.scale)
        if not count_overflow or not self.enabled:
            return
        self._consecutive_overflows += 1
        if self.scale <= self.min_scale:
            self._floor_overflows += 1
            if self._floor_overflows >= self.max_floor_overflows:
                raise LossScaleError(
                    f"The loss scale is stuck at its floor min_scale={self.min_scale:g} and gradients kept "
                    f"overflowing for {self._floor_overflows} steps (last: step {step}, {why}). "
                    "The overflow is not fixed by scaling: use bf16 (AdaptivePrecision(mode='bf16')) if "
                    "the hardware has it, lower the learning rate, clip gradients, or mark the offending "
                    "module fp32 with AdaptivePrecision(fp32_modules=[...])."
                )
        if self._consecutive_overflows >= self.hysteresis:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self._consecutive_overflows = 0

    # -- state ---------------------------------------------------------------------------------

    @property
    def skipped_steps(self) -> int:
        """How many optimizer steps were skipped so far."""
        return len(self.skipped)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: scale, counters and the skip history."""
        return {
            "scale": self.scale,
            "clean_steps": self._clean_steps,
            "consecutive_overflows": self._consecutive_overflows,
            "floor_overflows": self._floor_overflows,
            "overflow_steps": self.overflow_steps,
            "skipped": [asdict(s) for s in self.skipped],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.scale = float(state["scale"])
        self._clean_steps = int(state.get("clean_steps", 0))
        self._consecutive_overflows = int(state.get("consecutive_overflows", 0))
        self._floor_overflows = int(state.get("floor_overflows", 0))
        self.overflow_steps = int(state.get("overflow_steps", 0))
        self.skipped = [SkippedStep(**s) for s in state.get("skipped", [])]
