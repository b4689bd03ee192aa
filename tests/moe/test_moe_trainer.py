"""The tiny-moe LightningModule under ``Picotron3DStrategy`` trains like one process.

Unchanged user code (``CausalLMModule``, AdamW, the aux losses injected by the MoE layers), the
Trainer's own sampler, and the plain one-process reference loop of ``tests/parity.py``. One spawn
per world size runs its layouts in sequence.
"""

from __future__ import annotations

import pytest

from picotron_lightning.testing import run_ranks
from tests.parity import RTOL, make_data, max_relative_diff, mean_over_ranks, reference_losses, trainer_run

# Multi-process (real gloo ranks): the slow tier.
pytestmark = pytest.mark.slow

STEPS = 8
MICRO = 2

LAYOUTS = {
    2: {"dp2-ep1": {}, "dp2-ep2": {"expert_parallel_size": 2}},
    4: {"dp4-ep2": {"expert_parallel_size": 2},
        "dp2-ep2-tp2": {"expert_parallel_size": 2, "tensor_parallel_size": 2},
        "dp2-ep2-pp2": {"expert_parallel_size": 2, "pipeline_parallel_size": 2}},
}


def _dp(world: int, kwargs: dict) -> int:
    return world // kwargs.get("tensor_parallel_size", 1) // kwargs.get("pipeline_parallel_size", 1)


def _run(rank: int, world: int) -> dict:
    out = {}
    for name, kwargs in LAYOUTS[world].items():
        dp = _dp(world, kwargs)
        result = trainer_run(world, make_data(STEPS * MICRO * dp), MICRO, STEPS, kwargs, preset="tiny-moe")
        out[name] = result
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def world_results(request) -> tuple[int, list[dict]]:
    return request.param, run_ranks(_run, request.param, timeout=600)


def test_moe_layouts_match_one_process(world_results) -> None:
    world, results = world_results
    for name, kwargs in LAYOUTS[world].items():
        dp = _dp(world, kwargs)
        data = make_data(STEPS * MICRO * dp)
        # A pipeline splits each rank's MICRO samples into MICRO microbatches; the MoE auxiliary
        # loss is per microbatch, so the reference accumulates over the same chunks.
        chunks = MICRO if kwargs.get("pipeline_parallel_size", 1) > 1 else 1
        ref = reference_losses(data, STEPS, MICRO * dp, preset="tiny-moe", chunks=chunks)["losses"]
        by_dp: dict[int, list[float]] = {r[name]["dp_rank"]: r[name]["losses"] for r in results}
        assert len(by_dp) == dp
        got = mean_over_ranks(list(by_dp.values()))
        assert max_relative_diff(got, ref) <= RTOL, (name, got, ref)
