"""OOM recovery with mixture-of-experts layers, with and without expert parallelism, on real gloo ranks.

A rank that runs out of memory half-way through an MoE step leaves its peers waiting in the next token
all-to-all (ep > 1) or routing-statistics all-reduce, and the all-to-alls' sizes follow the routing, which
the failed rank cannot trace on fake tensors. Its MoE layers replay the exchange by protocol instead
(``picotron_lightning/moe/communication.py``): zero counts out, the peers' counts in, rows sized by them.
Nothing is mocked: the OOMs are ``torch.OutOfMemoryError`` raised inside the real forward and backward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from picotron_lightning.testing import run_ranks, run_script
from tests.memory.oom_runs import (
    CHOSEN_POINT_EVENTS,
    CHOSEN_STEPS,
    MOE_CONFIG,
    check_agreed_schedule,
    chosen_points,
    moe_module,
    moe_module_with_aux_loss,
    oom_fit,
    oom_fit_expect_error,
    random_plan,
)
from tests.parity import RTOL, make_data, max_relative_diff, mean_over_ranks, train_reference

pytestmark = pytest.mark.slow

MICRO = 8  # samples per data-parallel rank and step: splits 1, 2, 4, 8
SCRIPTS = Path(__file__).resolve().parents[1] / "user_path" / "scripts"


def _check_against_one_process(runs: list[dict[str, Any]], data: torch.Tensor, steps: int, ep: int,
                               tp: int = 1) -> None:
    """Every step's loss and the final weights are one process's on the global batch; replicas agree.

    Ranks are laid out (ep replica, ep, tp), tp fastest: rank r holds the experts of ep rank (r // tp) % ep.
    """
    dp = len(runs) // tp
    reference = train_reference(moe_module(), data, steps, dp * MICRO)
    assert max_relative_diff(mean_over_ranks([r["losses"] for r in runs]), reference["losses"]) <= RTOL, (
        [r["losses"] for r in runs], reference["losses"])
    final = reference["module"].state_dict()
    for rank, run in enumerate(runs):
        for name, expected in final.items():
            got = run["state"][name]
            if got.shape != expected.shape:  # an expert weight: this rank holds experts [r L, (r + 1) L)
                local = got.shape[0]
                assert expected.shape[0] == ep * local, name
                ep_rank = (rank // tp) % ep
                expected = expected[ep_rank * local:(ep_rank + 1) * local]
            assert (got - expected).abs().max().item() < 1e-3, (rank, name)
    for rank, run in enumerate(runs):  # replicas end bitwise equal (the bias-balancing buffers included)
        for name, tensor in run["state"].items():
            holder = runs[((rank // tp) % ep) * tp]  # the first rank holding the same experts
            same = holder if tensor.shape != final[name].shape else runs[0]
            assert torch.equal(tensor, same["state"][name]), (rank, name)


@pytest.mark.parametrize(("world", "ep", "tp", "dp_mode", "checkpointing"), [
    (2, 1, 1, "ddp", "none"),  # no exchange: the routing statistics' all-reduce is what a failed rank must still join
    (2, 2, 1, "ddp", "none"),
    (2, 2, 1, "ddp", "full"),  # the backward recomputes each block's exchange: the replay must send what forward sent
    (2, 2, 1, "fsdp", "none"),  # FSDP2's gathers and reduce-scatters around the exchange
    (4, 2, 2, "fsdp", "none"),  # tp=2 x FSDP2 dp=2 x ep=2: tp all-reduces too; the failed ranks 0 and 1 are a tp pair
])
def test_moe_ranks_recover_from_ooms_at_any_point_of_the_step(world: int, ep: int, tp: int, dp_mode: str,
                                                               checkpointing: str) -> None:
    steps, plan = CHOSEN_STEPS, chosen_points()
    data = make_data(world // tp * steps * MICRO)
    runs = run_ranks(oom_fit, world, data, MICRO, steps, plan, module=moe_module, dp_mode=dp_mode, monitor=False,
                     tp=tp, strategy_options={"expert_parallel_size": ep},
                     memory={"oom_retry_larger_after": 1, "activation_checkpointing": checkpointing}, timeout=600)

    assert [len(r["fired"]) for r in runs] == [3, 3] + [0] * (world - 2), [r["fired"] for r in runs]
    events = runs[0]["events"]
    assert all(r["events"] == events for r in runs)
    assert [(e["step"], e["ranks"], e["split"], e["new_split"]) for e in events] == CHOSEN_POINT_EVENTS
    # Each failure was followed by a replay; under ep the failed rank always had exchanges left to join.
    assert [len(r["replayed"]) for r in runs] == [3, 3] + [0] * (world - 2)
    if ep > 1:
        assert all(n > 0 for r in runs for n in r["replayed"]), [r["replayed"] for r in runs]
    _check_against_one_process(runs, data, steps, ep, tp)


def test_random_ooms_on_four_ranks_with_two_expert_replicas() -> None:
    """dp=4, ep=2: token exchanges within each pair, expert gradients averaged across the pairs."""
    steps = 10
    plan, expected_splits = random_plan(4, steps, 20, MICRO, retry_larger_after=1, seed=5)
    data = make_data(4 * steps * MICRO)
    runs = run_ranks(oom_fit, 4, data, MICRO, steps, plan, module=moe_module, monitor=False,
                     strategy_options={"expert_parallel_size": 2}, memory={"oom_retry_larger_after": 1},
                     timeout=900)
    check_agreed_schedule(runs, 20, expected_splits)
    _check_against_one_process(runs, data, steps, ep=2)


def test_moe_settings_a_split_step_would_change_are_refused_on_every_rank() -> None:
    """The tiny MoE's default auxiliary loss (1e-2) is a product of batch means: refused before the first step."""
    runs = run_ranks(oom_fit_expect_error, 2, make_data(2 * MICRO), MICRO, 1, [], module=moe_module_with_aux_loss,
                     strategy_options={"expert_parallel_size": 2}, monitor=False, timeout=300)
    for run in runs:
        assert "aux_loss_coeff=0.01" in run["error"] and "oom_recovery" in run["error"], run


def test_expert_parallel_ooms_are_recovered_on_the_users_path(tmp_path: Path) -> None:
    """``python train.py``: Lightning's launcher starts both ranks; the ep=2 run with an OOM on rank 1 in step 1
    ends with the losses of the same run without it."""
    ep = {"expert_parallel_size": 2}
    model = {"kind": "moe", "config": MOE_CONFIG}
    common = {"steps": 3, "micro_batch": 8, "samples": 48, "model": model}
    inject = [{"rank": 1, "step": 1, "phase": "backward", "op": 30}]
    spec = {"devices": 2, "runs": [
        {"name": "ep", "strategy": ep, **common},
        {"name": "ep_oom", "strategy": {**ep, "memory": {"oom_recovery": True}}, "monitoring": True,
         "inject_oom": inject, **common},
    ]}
    spec_path, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    result = run_script(SCRIPTS / "train.py", spec_path, out, timeout=600)
    runs = json.loads(out.read_text())
    assert runs["ep_oom"]["oom_events"] == [
        {"step": 1, "batch_idx": 1, "attempt": 1, "ranks": [1], "split": 1, "new_split": 2}], runs["ep_oom"]
    assert max_relative_diff(runs["ep_oom"]["losses"], runs["ep"]["losses"]) <= RTOL
    assert "expert_parallel_size=2" in runs["ep"]["layout"], runs["ep"]
    assert "oom_retry" in result.stdout
