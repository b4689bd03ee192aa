"""The picotron3d strategies for the Trainer and for Fabric, and the steps they apply."""

from picotron_lightning.strategies.checkpoint import CheckpointError
from picotron_lightning.strategies.fabric import Picotron3DFabricStrategy
from picotron_lightning.strategies.trainer import Picotron3DStrategy

__all__ = ["CheckpointError", "Picotron3DFabricStrategy", "Picotron3DStrategy"]
