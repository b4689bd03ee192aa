"""picotron-lightning: 3D and expert parallelism for PyTorch Lightning.

Importing the package registers the strategy name ``"picotron3d"`` with both the Trainer and
Fabric, so ``Trainer(strategy="picotron3d")`` and ``Fabric(strategy="picotron3d")`` work.
"""

from picotron_lightning.monitoring import AlertManager, AnomalyDetector, MetricsCollector
from picotron_lightning.precision import AdaptivePrecision, FabricAdaptivePrecision
from picotron_lightning.strategies import CheckpointError, Picotron3DFabricStrategy, Picotron3DStrategy
from picotron_lightning.strategies.fabric_steps import evaluate, forward_backward
from picotron_lightning.topology import LayoutError, ParallelLayout

__version__ = "0.1.0"


def _register() -> None:
    from lightning.fabric.strategies import STRATEGY_REGISTRY
    from lightning.pytorch.strategies import StrategyRegistry

    if Picotron3DStrategy.strategy_name not in StrategyRegistry:
        Picotron3DStrategy.register_strategies(StrategyRegistry)
    if Picotron3DFabricStrategy.strategy_name not in STRATEGY_REGISTRY:
        Picotron3DFabricStrategy.register_strategies(STRATEGY_REGISTRY)


_register()

__all__ = [
    "AdaptivePrecision",
    "AlertManager",
    "AnomalyDetector",
    "CheckpointError",
    "FabricAdaptivePrecision",
    "MetricsCollector",
    "LayoutError",
    "ParallelLayout",
    "Picotron3DFabricStrategy",
    "Picotron3DStrategy",
    "__version__",
    "evaluate",
    "forward_backward",
]
