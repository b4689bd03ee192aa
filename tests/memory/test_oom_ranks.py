"""OOM recovery on real gloo ranks: 100 injected OOMs over 2 and 4 ranks, the stop at one sample, the user's path.

Every run has deadlines (the strategy's collective timeout and ``run_ranks``' timeout), so a hang fails
in seconds instead of blocking; nothing is mocked: the OOMs are ``torch.OutOfMemoryError`` raised by a
dispatch mode inside the real forward and backward (``picotron_lightning.testing_memory.InjectOOM``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from picotron_lightning.testing import run_ranks, run_script
from picotron_lightning.testing_memory import OOMAt
from tests.memory.oom_runs import oom_fit, oom_fit_expect_stop, random_plan
from tests.parity import RTOL, make_data, make_module, max_relative_diff, mean_over_ranks, train_reference

pytestmark = pytest.mark.slow

MICRO = 16  # samples per rank and step: splits 1, 2, 4, 8, 16
SCRIPTS = Path(__file__).resolve().parents[1] / "user_path" / "scripts"


@pytest.mark.parametrize(("world", "steps", "seed"), [(2, 27, 3), (4, 14, 0)])
def test_fifty_injected_ooms_leave_the_run_unchanged(world: int, steps: int, seed: int) -> None:
    plan, expected_splits = random_plan(world, steps, 50, MICRO, retry_larger_after=1, seed=seed)
    data = make_data(8 * world * MICRO)
    runs = run_ranks(oom_fit, world, data, MICRO, steps, plan, memory={"oom_retry_larger_after": 1}, timeout=900)

    # Every scripted OOM fired on its rank, 50 in all, and every rank agreed on every retry.
    fired = sum(len(r["fired"]) for r in runs)
    assert fired == 50, fired
    assert sum(e.attempts for e in plan) == 50
    events = runs[0]["events"]
    assert all(r["events"] == events for r in runs)
    assert [e["new_split"] for e in events if e["new_split"] is not None]
    # Each step ended with the split the agreed schedule predicts.
    ended = {e["step"]: e["new_split"] for e in events}
    assert [ended.get(step) for step in range(steps)] == [
        s if step in ended else None for step, s in enumerate(expected_splits)]
    # Every retry was an alert and a metric.
    assert all(r["alerts"].get("oom_retry") == len(events) for r in runs)
    assert max(v[0] for v in runs[0]["metrics"].values()) == len(events)
    # The losses are the ones of one process on the whole global batch, and the replicas end bitwise equal.
    reference = train_reference(make_module(), data, steps, world * MICRO)
    assert max_relative_diff(mean_over_ranks([r["losses"] for r in runs]), reference["losses"]) <= RTOL
    for name, tensor in runs[0]["state"].items():
        assert all(torch.equal(tensor, r["state"][name]) for r in runs[1:]), name
    final = reference["module"].state_dict()
    assert max((runs[0]["state"][k] - final[k]).abs().max().item() for k in final) < 1e-3


def test_one_sample_per_micro_batch_stops_every_rank_with_the_message() -> None:
    plan = [OOMAt(rank=1, step=1, phase="backward", op=3, attempts=99)]
    runs = run_ranks(oom_fit_expect_stop, 2, make_data(64), 4, plan, timeout=300)
    for run in runs:
        assert run["stopped"], run
        assert "one sample per micro-batch" in run["message"] and "rank(s) [1]" in run["message"]
        assert "picotron_lightning.memory.estimate" in run["message"]
        assert "activation_checkpointing='selective'" in run["message"]


def test_an_injected_oom_is_recovered_on_the_users_path(tmp_path: Path) -> None:
    spec = {"devices": 2, "runs": [
        {"name": "plain", "strategy": {"data_parallel_mode": "ddp"}, "steps": 4, "micro_batch": 8, "samples": 64},
        {"name": "oom", "strategy": {"data_parallel_mode": "ddp", "memory": {"oom_recovery": True}}, "steps": 4,
         "micro_batch": 8, "samples": 64, "monitoring": True,
         "inject_oom": [{"rank": 1, "step": 1, "phase": "forward", "op": 7},
                        {"rank": 0, "step": 2, "phase": "backward", "op": 11, "attempts": 2}]},
    ]}
    spec_path, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    result = run_script(SCRIPTS / "train.py", spec_path, out, timeout=600)
    oom = json.loads(out.read_text())["oom"]
    plain = json.loads(out.read_text())["plain"]
    assert oom["oom_events"] == [
        {"step": 1, "batch_idx": 1, "attempt": 1, "ranks": [1], "split": 1, "new_split": 2},
        {"step": 2, "batch_idx": 2, "attempt": 1, "ranks": [0], "split": 2, "new_split": 4},
        {"step": 2, "batch_idx": 2, "attempt": 2, "ranks": [0], "split": 4, "new_split": 8},
    ], oom
    assert oom["alerts"].get("oom_retry") == 3 and 3.0 in oom["oom_metrics"], oom
    assert max_relative_diff(oom["losses"], plain["losses"]) <= RTOL
    assert "oom_retry" in result.stdout
