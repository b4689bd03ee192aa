"""The model description and candidate builder the planner's cost tests share (``tiny``, 4 blocks)."""

from __future__ import annotations

from picotron_lightning.models import CausalLMModule
from picotron_lightning.planner import build_on_meta, describe_model
from picotron_lightning.planner.model_spec import ModelSpec
from picotron_lightning.planner.search import Candidate

SEQ = 64


def tiny_spec() -> ModelSpec:
    """The ``tiny`` reference model with 4 blocks, described on meta tensors at sequence :data:`SEQ`."""
    return describe_model(build_on_meta(lambda: CausalLMModule("tiny", config={"num_layers": 4})), SEQ, "tiny")


def candidate(dp: int = 1, tp: int = 1, pp: int = 1, mode: str = "fsdp", ckpt: str = "none", micro: int = 1,
              mb: int = 8) -> Candidate:
    """A candidate layout with the 1F1B schedule, ep=1 and ``dp`` data-parallel replicas."""
    return Candidate(dp, tp, pp, 1, mode, ckpt, "1f1b", 1, micro, mb, dp)
