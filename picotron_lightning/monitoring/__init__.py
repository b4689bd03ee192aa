"""Monitoring callbacks: metrics, anomaly detection, alerts and TensorBoard output.

``Trainer(callbacks=[MetricsCollector(), AnomalyDetector(), AlertManager()])`` is the whole setup;
each callback also has a small explicit API for Fabric scripts (see their module docstrings).
"""

from picotron_lightning.monitoring.alerts import Alert, AlertManager
from picotron_lightning.monitoring.anomaly import AnomalyDetector, Decision, RollingZScore
from picotron_lightning.monitoring.collector import MetricsCollector, default_batch_size
from picotron_lightning.monitoring.context import RunContext
from picotron_lightning.monitoring.flops import (
    PEAK_TABLE,
    DevicePeak,
    ModelFlops,
    lookup_peak,
    measure_cpu_peak_flops,
    model_flops_per_token,
    peak_flops,
)
from picotron_lightning.monitoring.tensorboard_output import (
    TensorBoardOutput,
    custom_layout,
    expert_load_image,
)

__all__ = [
    "PEAK_TABLE",
    "Alert",
    "AlertManager",
    "AnomalyDetector",
    "Decision",
    "DevicePeak",
    "MetricsCollector",
    "ModelFlops",
    "RollingZScore",
    "RunContext",
    "TensorBoardOutput",
    "custom_layout",
    "default_batch_size",
    "expert_load_image",
    "lookup_peak",
    "measure_cpu_peak_flops",
    "model_flops_per_token",
    "peak_flops",
]
