"""OOM recovery under FSDP2, and FSDP2 with tensor parallelism, on real gloo ranks.

FSDP2 gathers parameters inside forward and backward and reduce-scatters gradients in backward; a rank
that runs out of memory half-way would leave its peers blocked in the next all-gather. With
``memory.oom_recovery`` it resets FSDP2's iteration state, traces the attempt on fake tensors, issues
the collectives it skipped (``picotron_lightning.memory.replay``), and every rank redoes the step in twice
as many micro-batches. Nothing is mocked: the OOMs are ``torch.OutOfMemoryError`` raised by a dispatch
mode inside the real forward and backward.
"""

from __future__ import annotations

import pytest
import torch

from picotron_lightning.testing import run_ranks
from picotron_lightning.testing_memory import OOMAt
from tests.memory.oom_runs import (
    CHOSEN_POINT_EVENTS,
    CHOSEN_STEPS,
    check_agreed_schedule,
    chosen_points,
    oom_fit,
    random_plan,
)
from tests.parity import RTOL, make_data, make_module, max_relative_diff, mean_over_ranks, train_reference

pytestmark = pytest.mark.slow

MICRO = 8  # samples per data-parallel rank and step: splits 1, 2, 4, 8


def test_fsdp_ranks_recover_from_ooms_at_any_point_of_the_step() -> None:
    steps, plan = CHOSEN_STEPS, chosen_points(last_phase="backward")
    data = make_data(2 * steps * MICRO)
    runs = run_ranks(oom_fit, 2, data, MICRO, steps, plan, dp_mode="fsdp", memory={"oom_retry_larger_after": 1},
                     timeout=600)

    assert [len(r["fired"]) for r in runs] == [3, 3], [r["fired"] for r in runs]
    events = runs[0]["events"]
    assert runs[1]["events"] == events
    assert [(e["step"], e["ranks"], e["split"], e["new_split"]) for e in events] == CHOSEN_POINT_EVENTS
    assert all(r["replayed"] and all(n > 0 for n in r["replayed"]) for r in runs), [r["replayed"] for r in runs]
    reference = train_reference(make_module(), data, steps, 2 * MICRO)
    assert max_relative_diff(mean_over_ranks([r["losses"] for r in runs]), reference["losses"]) <= RTOL
    final = reference["module"].state_dict()
    for name, tensor in runs[0]["state"].items():  # whole tensors, gathered from the shards
        assert torch.equal(tensor, runs[1]["state"][name]), name
    # (Adam's first steps turn float-rounding differences in tiny gradients into differences of up to lr; the
    # DDP recovery test uses the same bound.)
    assert max((runs[0]["state"][k] - final[k]).abs().max().item() for k in final) < 1e-3


def test_random_ooms_on_tensor_and_fully_sharded_ranks_leave_the_run_unchanged() -> None:
    """4 ranks, tp=2 x FSDP2 dp=2: collectives on two groups, each failed rank replays both."""
    steps = 14
    plan, expected_splits = random_plan(4, steps, 20, MICRO, retry_larger_after=1, seed=0, max_op=200)
    data = make_data(2 * steps * MICRO)
    runs = run_ranks(oom_fit, 4, data, MICRO, steps, plan, tp=2, dp_mode="fsdp",
                     memory={"oom_retry_larger_after": 1}, monitor=False, timeout=900)
    check_agreed_schedule(runs, 20, expected_splits)
    reference = train_reference(make_module(), data, steps, 2 * MICRO)
    assert max_relative_diff(mean_over_ranks([r["losses"] for r in runs]), reference["losses"]) <= RTOL
    for name, tensor in runs[0]["state"].items():
        assert all(torch.equal(tensor, r["state"][name]) for r in runs[1:]), name


def test_hsdp_ranks_recover_from_ooms() -> None:
    """4 ranks, HSDP (2 replicas of 2 shards): gathers and reduce-scatters per shard group, all-reduces across."""
    steps = 4
    plan = [
        OOMAt(rank=3, step=0, phase="forward", op=40),
        OOMAt(rank=0, step=1, phase="backward", op=25),
        OOMAt(rank=1, step=2, phase="forward", op=10),  # two ranks of different replicas and shards
        OOMAt(rank=2, step=2, phase="backward", op=70),
    ]
    data = make_data(4 * steps * MICRO)
    runs = run_ranks(oom_fit, 4, data, MICRO, steps, plan, dp_mode="hsdp", strategy_options={"hsdp_shard_size": 2},
                     memory={"oom_retry_larger_after": 1}, monitor=False, timeout=900)
    events = runs[0]["events"]
    assert all(r["events"] == events for r in runs)
    assert [(e["step"], e["ranks"], e["new_split"]) for e in events] == [
        (0, [3], 2), (1, [0], 2), (2, [1, 2], 2)], events
    reference = train_reference(make_module(), data, steps, 4 * MICRO)
    assert max_relative_diff(mean_over_ranks([r["losses"] for r in runs]), reference["losses"]) <= RTOL
    for name, tensor in runs[0]["state"].items():
        assert all(torch.equal(tensor, r["state"][name]) for r in runs[1:]), name
