"""Adaptive mixed precision: hardware detection, analysis, a per-module policy and the plugins."""

from picotron_lightning.precision.analyzer import ModuleStats, PrecisionAnalyzer
from picotron_lightning.precision.fabric import FabricAdaptivePrecision
from picotron_lightning.precision.hardware import HardwareDetector, HardwareReport
from picotron_lightning.precision.plugin import AdaptivePrecision
from picotron_lightning.precision.policy import AdaptivePolicy, ModuleDecision, PrecisionPlan
from picotron_lightning.precision.promotion import Promotion, PromotionManager
from picotron_lightning.precision.scaler import AdaptiveLossScaler, LossScaleError, SkippedStep

__all__ = [
    "AdaptiveLossScaler",
    "AdaptivePolicy",
    "AdaptivePrecision",
    "FabricAdaptivePrecision",
    "HardwareDetector",
    "HardwareReport",
    "LossScaleError",
    "ModuleDecision",
    "ModuleStats",
    "PrecisionAnalyzer",
    "PrecisionPlan",
    "Promotion",
    "PromotionManager",
    "SkippedStep",
]
