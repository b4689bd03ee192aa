"""Every plan the planner predicts to fit an injected per-rank budget runs under it, on real gloo ranks.

The planner plans the tiny model for 2 ranks under a budget that rejects about half of the layouts. Its
choice and, for each of dp=2, tp=2 and pp=2, the accepted layout closest to the budget (the one an
optimistic memory model would let through first) run with ``Trainer.fit`` and the strategy's own
arguments; ``PeakProbe`` measures each rank's live tensor bytes of a whole step (the last micro-batch of
an accumulated step, where FSDP holds every unsharded gradient). Each must stay under the budget.
"""

from __future__ import annotations

from typing import Any

import pytest

from picotron_lightning.planner import Constraints, build_on_meta, describe_model, device_spec, plan_layout
from picotron_lightning.testing import run_ranks
from tests.planner.budget_runs import LOCAL_BATCH, SEQ, build_module, measure_plans

WORLD = 2


def _plan(budget: int | None):  # noqa: ANN202
    spec = describe_model(build_on_meta(build_module), SEQ, "tiny-4")
    return plan_layout(spec, devices=WORLD, devices_per_node=WORLD, device=device_spec("cpu"), global_batch=None,
                       local_batch=LOCAL_BATCH, memory_budget=budget, constraints=Constraints())


def _plans_near_the_budget():  # noqa: ANN202
    """(budget, the planner's choice, the accepted layout with the highest predicted peak per (dp, tp, pp))."""
    peaks = sorted(p.memory.peak for p in _plan(None).ranked)
    budget = peaks[len(peaks) // 2]  # about half of the layouts are predicted not to fit
    result = _plan(budget)
    assert any("> budget" in r.reason for r in result.rejected)
    nearest: dict[tuple[int, int, int], Any] = {}
    for p in sorted(result.ranked, key=lambda p: -p.memory.peak):
        nearest.setdefault((p.candidate.dp, p.candidate.tp, p.candidate.pp), p)
    assert set(nearest) == {(2, 1, 1), (1, 2, 1), (1, 1, 2)}, nearest.keys()  # each family has a fitting layout
    return budget, result.best, nearest


def _measure_under(budget: int, plans: list[Any]) -> list[tuple[str, int, int]]:
    measured = run_ranks(measure_plans, WORLD, [(p.candidate, p.settings.reshard_after_forward) for p in plans],
                         timeout=900)
    rows = [(p.candidate.describe(), p.memory.peak, max(r[i] for r in measured)) for i, p in enumerate(plans)]
    for layout, predicted, real in rows:
        assert predicted <= budget
        assert real <= budget, (f"{layout}: measured peak {real} > budget {budget} (predicted {predicted})", rows)
    return rows


@pytest.mark.slow
def test_every_plan_predicted_to_fit_runs_under_the_budget() -> None:
    """The planner's choice and the fullest accepted dp=2 and tp=2 layouts (with accumulation) run under it."""
    budget, chosen, nearest = _plans_near_the_budget()
    # The fullest pp=2 layout runs in its own test below; the choice runs here whatever its layout (with the
    # host costs in the cost model, the fixed CPU table now picks pp=2 interleaved for this model).
    plans = [chosen, *[p for key, p in nearest.items() if key != (1, 1, 2) and p is not chosen]]
    rows = _measure_under(budget, plans)
    # The budget is tight enough to matter: the fullest accepted layout uses most of it.
    assert max(real for _, _, real in rows) > budget * 3 // 4, rows


@pytest.mark.slow
def test_pipeline_plan_predicted_to_fit_runs_under_the_budget() -> None:
    """The fullest accepted pp=2 layout runs under the budget on both stages (docs/planner.md: the first
    stage was underestimated until hidden states of the tiny model's hidden == seq were counted and the
    previous step's gradients, alive through the schedule, were charged)."""
    budget, _, nearest = _plans_near_the_budget()
    _measure_under(budget, [nearest[(1, 1, 2)]])
