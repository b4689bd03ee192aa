"""The selector: from hardware facts (and optional analysis) to a per-module dtype plan.

The plan has one compute dtype for autocast (bf16 where the hardware is native, fp16 with loss
scaling where only fp16 is, fp32 where neither is), plus exceptions per module:

* fp32 islands for the modules where low precision is known to hurt: normalisations, softmax,
  MoE routers (a flipped top-k choice changes which expert learns) and loss modules. Functional
  ``softmax``/``layer_norm``/``cross_entropy`` calls are already kept in fp32 by autocast's own
  op lists; the islands cover the *modules* autocast cannot see into, such as a hand-written RMSNorm.
* fp32 for modules the sensitivity probe ranks above ``sensitivity_threshold``.
* fp8 for large linears, only when the hardware has fp8 *and* an fp8 library is importable.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import nn

from picotron_lightning.precision.hardware import HardwareReport

Mode = Literal["auto", "bf16", "fp16", "fp32"]
_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
               nn.modules.instancenorm._InstanceNorm)
_SOFTMAX_TYPES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
# Only libraries the plugin knows how to apply (transformer_engine has its own Lightning plugin).
_FP8_LIBRARIES = ("torchao",)


@dataclass
class ModuleDecision:
    """Where one module deviates from the plan's compute dtype, and why."""

    dtype: str  # "fp32" or "fp8"
    reason: str


@dataclass
class PrecisionPlan:
    """The outcome of :meth:`AdaptivePolicy.plan`."""

    mode: str  # "bf16" | "fp16" | "fp32"
    reason: str
    modules: dict[str, ModuleDecision] = field(default_factory=dict)
    fp8_library: str | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype autocast runs in, or None for plain fp32."""
        return _DTYPE[self.mode]

    @property
    def loss_scaling(self) -> bool:
        """fp16 needs loss scaling; bf16 has fp32's exponent range and does not."""
        return self.mode == "fp16"

    def fp32_modules(self) -> list[str]:
        """Names planned as fp32 islands."""
        return [n for n, d in self.modules.items() if d.dtype == "fp32"]

    def fp8_modules(self) -> list[str]:
        """Names planned for fp8."""
        return [n for n, d in self.modules.items() if d.dtype == "fp8"]

    def __str__(self) -> str:
        lines = [f"compute dtype: {self.mode} ({self.reason})"]
        lines += [f"  {name or '<root>'}: {d.dtype} ({d.reason})" for name, d in sorted(self.modules.items())]
        return "\n".join(lines)


def is_norm(module: nn.Module) -> bool:
    """Built-in norms, and any module whose class name says it normalises (RMSNorm, T5LayerNorm...)."""
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def is_router(name: str, module: nn.Module) -> bool:
    """MoE routers/gates: by class name, or a module named ``router``/``gate`` (not ``gate_proj``)."""
    leaf = name.rsplit(".", 1)[-1]
    return "router" in type(module).__name__.lower() or leaf in ("router", "gate")


def available_fp8_library() -> str | None:
    """The first installed fp8 training library, or None."""
    for lib in _FP8_LIBRARIES:
        if importlib.util.find_spec(lib) is not None:
            return lib
    return None


class AdaptivePolicy:
    """Chooses the compute dtype and the per-module exceptions.

    Args:
        mode: ``"auto"`` decides from the hardware; ``"bf16"``/``"fp16"``/``"fp32"`` force it.
        fp32_islands: keep norms, softmax, routers and loss modules in fp32.
        fp32_modules: extra module names (exact, or a prefix ending in ``.``) forced to fp32.
        fp8: ``"auto"`` uses fp8 for large linears when hardware and library allow; ``False`` never.
        fp8_min_features: smallest in/out feature count of a linear worth fp8 (small ones lose
            more to the scaling overhead than they gain).
        sensitivity_threshold: relative error above which a probed module is kept in fp32.
        min_speedup: with a benchmarked report, low precision must be at least this much faster
            than fp32 in matmul throughput to be chosen by ``"auto"``.
    """

    def __init__(self, mode: Mode = "auto", fp32_islands: bool = True, fp32_modules: list[str] | None = None,
                 fp8: Literal["auto"] | bool = "auto", fp8_min_features: int = 1024,
                 sensitivity_threshold: float = 0.05, min_speedup: float = 1.0) -> None:
        if mode not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"AdaptivePolicy(mode={mode!r}): choose 'auto', 'bf16', 'fp16' or 'fp32'.")
        self.mode = mode
        self.fp32_islands = fp32_islands
        self.fp32_modules = list(fp32_modules or [])
        self.fp8 = fp8
        self.fp8_min_features = fp8_min_features
        self.sensitivity_threshold = sensitivity_threshold
        self.min_speedup = min_speedup

    def choose_mode(self, hw: HardwareReport) -> tuple[str, str]:
        """``(mode, reason)`` for the compute dtype."""
        if self.mode != "auto":
            native = hw.supports(_DTYPE[self.mode] or torch.float32)
            return self.mode, "requested" + ("" if native else f" (not native on this {hw.device_type})")
        for name in ("bf16", "fp16"):
            if not hw.supports(cast(torch.dtype, _DTYPE[name])):  # bf16/fp16 map to a dtype
                continue
            speedup = hw.speedup(name)
            if speedup is not None and speedup < self.min_speedup:
                continue  # native on paper, but measured slower than fp32 here
            measured = f", measured {speedup:.2f}x fp32 matmul" if speedup is not None else ""
            how = "bf16 autocast" if name == "bf16" else "fp16 autocast with loss scaling (no native bf16)"
            return name, f"{how}: native on {hw.name}{measured}"
        return "fp32", f"no native bf16 or fp16 on {hw.name}: low precision would be emulated and slower"

    def plan(self, model: nn.Module, hw: HardwareReport,
             sensitivity: list[tuple[str, float]] | None = None) -> PrecisionPlan:
        """The per-module plan for ``model`` on ``hw`` (``sensitivity`` from the analyzer's probe)."""
        mode, reason = self.choose_mode(hw)
        plan = PrecisionPlan(mode=mode, reason=reason)
        if mode == "fp32":
            return plan  # nothing runs in low precision, so there is nothing to except
        for name, module in model.named_modules():
            if not name:
                continue
            if any(name == p or (p.endswith(".") and name.startswith(p)) for p in self.fp32_modules):
                plan.modules[name] = ModuleDecision("fp32", "requested by the user")
            elif self.fp32_islands:
                island = _island_reason(name, module)
                if island:
                    plan.modules[name] = ModuleDecision("fp32", island)
        for name, err in sensitivity or []:
            if err > self.sensitivity_threshold and name not in plan.modules:
                plan.modules[name] = ModuleDecision(
                    "fp32", f"sensitivity probe: relative error {err:.3g} > {self.sensitivity_threshold:g}")
        self._plan_fp8(model, hw, plan)
        return plan

    def _plan_fp8(self, model: nn.Module, hw: HardwareReport, plan: PrecisionPlan) -> None:
        if self.fp8 is False or not hw.fp8:
            return
        library = available_fp8_library()
        if library is None:
            return  # fp8 is an optional extra; without a library the plan stays bf16/fp16
        plan.fp8_library = library
        fp32_prefixes = tuple(n + "." for n in plan.fp32_modules())
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or name in plan.modules or name.startswith(fp32_prefixes):
                continue
            if min(module.in_features, module.out_features) < self.fp8_min_features:
                continue
            if module.in_features % 16 or module.out_features % 16:
                continue  # fp8 GEMMs need 16-aligned shapes
            shape = f"{module.in_features}x{module.out_features}"
            why = f"large linear ({shape}) on fp8 hardware, via {library}"
            plan.modules[name] = ModuleDecision("fp8", why)


def _island_reason(name: str, module: nn.Module) -> str | None:
    if is_norm(module):
        return "fp32 island: normalisation (mean of squares loses too much in 16 bits)"
    if isinstance(module, _SOFTMAX_TYPES):
        return "fp32 island: softmax (exp overflows fp16, sums lose precision)"
    if is_router(name, module):
        return "fp32 island: router logits (rounding flips top-k expert choices)"
    if isinstance(module, nn.modules.loss._Loss):
        return "fp32 island: loss"
    return None
