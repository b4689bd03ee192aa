"""The layout planner: which (dp, tp, pp, ep) layout, schedule, checkpointing and communication settings
to train a model with on a given set of devices, from analytic memory and cost models.

``python -m picotron_lightning.plan --model pkg.module:Class --devices 64 --devices-per-node 8
--device "NVIDIA H100 80GB HBM3"`` prints the ranked table; the strategy calls :func:`plan_layout`
when sizes are ``"auto"``. See docs/planner.md.
"""

from picotron_lightning.planner.hardware import DeviceSpec, Link, device_spec, known_devices
from picotron_lightning.planner.model_spec import ModelSpec, build_on_meta, describe_model
from picotron_lightning.planner.ranking import PlanError, PlannedLayout, PlanResult, plan_layout
from picotron_lightning.planner.search import Candidate, Constraints

__all__ = [
    "Candidate", "CommSettings", "Constraints", "DeviceSpec", "Link", "ModelSpec", "PlanError", "PlanResult",
    "PlannedLayout", "build_on_meta", "describe_model", "device_spec", "known_devices", "plan_layout",
]
from picotron_lightning.planner.settings import CommSettings  # noqa: E402
