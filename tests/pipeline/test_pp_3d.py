"""Full 3D parallelism on 8 processes: pp=2 x dp=2 (FSDP2 per stage) x tp=2 (DTensor inside stages)."""

from __future__ import annotations

import pytest

from picotron_lightning.testing import run_ranks
from tests.parity import RTOL, make_data, max_relative_diff
from tests.pipeline.pp_runs import reference_model, run

# Multi-process (real gloo ranks): the slow tier.
pytestmark = pytest.mark.slow

STEPS = 8
MICRO = 4


def _world8(rank: int, world: int) -> dict:
    kwargs = {"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "data_parallel_mode": "fsdp"}
    return run(world, make_data(64), MICRO, STEPS, kwargs)


def test_pp2_tp2_dp2_matches_one_process():
    results = run_ranks(_world8, 8, timeout=900)
    ref = reference_model(make_data(64), STEPS, 2 * MICRO)[1]
    # rank = (pp * dp + dp_index) * tp + tp_index: ranks 0 and 2 are the two replicas' first stage.
    replica_mean = [(a + b) / 2 for a, b in zip(results[0]["losses"], results[2]["losses"], strict=True)]
    assert max_relative_diff(replica_mean, ref) <= RTOL, (replica_mean, ref)
    for i, r in enumerate(results):  # tensor and pipeline ranks of one replica report the same loss
        replica_first = results[2] if (i // 2) % 2 else results[0]
        assert max_relative_diff(r["losses"], replica_first["losses"]) <= RTOL
