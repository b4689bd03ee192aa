"""Mixture of experts: Router, ExpertLayer, LoadBalancer, ExpertCommunication and the composed MoELayer.

Expert parallelism (spreading experts over ranks) lives in :mod:`picotron_lightning.parallel.expert`.
"""

from picotron_lightning.moe.balancing import AuxLossInjector, LoadBalancer, update_expert_biases
from picotron_lightning.moe.communication import ExpertCommunication
from picotron_lightning.moe.experts import ExpertLayer, SharedExperts
from picotron_lightning.moe.grouped import grouped_matmul, grouped_mm_available
from picotron_lightning.moe.layer import MoELayer, moe_metrics, sort_by_expert
from picotron_lightning.moe.router import Router, RouterOutput

__all__ = [
    "AuxLossInjector",
    "ExpertCommunication",
    "ExpertLayer",
    "LoadBalancer",
    "MoELayer",
    "Router",
    "RouterOutput",
    "SharedExperts",
    "grouped_matmul",
    "grouped_mm_available",
    "moe_metrics",
    "sort_by_expert",
    "update_expert_biases",
]
