"""``memory_budget`` with an MoE model (tiny-moe: 2 layers, 4 experts, top-2) on 2 gloo ranks.

The fake-tensor trace cannot follow MoE routing (data-dependent shapes), so the ranks choose with one real
step per policy on their process group. For DDP at ep=1 and for FSDP2 at ep=2: every checkpointing policy is
measured under ``Trainer.fit`` (``PeakProbe``, worst rank); with a budget under every cheaper policy's
measured peak and over the target policy's, the strategy picks that policy on every rank, its measured peak
fits, and the run trains to the one-process losses.
"""

from __future__ import annotations

import dataclasses

import pytest

from picotron_lightning.memory.policy import POLICIES
from picotron_lightning.testing import run_ranks
from tests.memory.budget_runs import MICRO, STEPS, build_module, fit_each
from tests.parity import RTOL, make_data, max_relative_diff, mean_over_ranks, train_reference

MIB = 1 << 20
BY_NAME = {p.name: p for p in POLICIES}
ORDER = ["none", "selective", "every_2nd_block", "full"]  # the checkpointing policies, cheapest first
# ep=2: the estimate traces the loader's first batch on every rank; the tokens a rank's experts receive
# follow each step's routing, and on 2026-11-30 the measured step's worst rank exceeded the budget the
# estimate said selective fits (measured none 5.344, selective 3.542, every 2nd block 4.033, full 3.284 MiB;
# budget 3.413; estimated selective 3.34, none 5.11). Not fixed in this version: see docs/memory.md.
ROUTING_GAP = pytest.mark.xfail(strict=True, reason="ep=2: one batch's routing is not a bound on a later step's")
MOE_LAYOUTS = {
    # name: (strategy arguments, the data-parallel mode the strategy must apply)
    "ddp_ep1": ({"data_parallel_mode": "ddp"}, "ddp"),
    "fsdp_ep2": ({"expert_parallel_size": 2}, "fsdp"),
}


def budget_between(measured: dict[str, int]) -> tuple[str, int]:
    """The policy with the smallest measured peak and a budget halfway between it and the smallest measured
    peak of the policies before it in the list (every one of those is over the budget, it is under)."""
    target = min(ORDER, key=lambda name: measured[name])
    cheaper = ORDER[: ORDER.index(target)]
    assert cheaper, f"`none` has the smallest peak: no budget can make the strategy choose ({measured})"
    return target, (measured[target] + min(measured[name] for name in cheaper)) // 2


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=[ROUTING_GAP, pytest.mark.large]) if n == "fsdp_ep2" else n
                                  for n in MOE_LAYOUTS])
def test_budget_with_a_moe_model_picks_the_cheapest_policy_that_fits(name: str) -> None:
    layout, dp_mode = MOE_LAYOUTS[name]
    memories = [dataclasses.asdict(BY_NAME[n]) for n in ORDER]
    for memory in memories:
        memory.pop("name")
    runs = run_ranks(fit_each, 2, memories, layout, "tiny-moe", timeout=900)
    measured = {policy: max(runs[r][i]["peak"] for r in range(2)) for i, policy in enumerate(ORDER)}
    assert {runs[r][0]["dp_mode"] for r in range(2)} == {dp_mode}
    target, budget = budget_between(measured)
    print(f"{name}: measured (worst rank) " + ", ".join(f"{p} {measured[p] / MIB:.3f}" for p in ORDER)
          + f" MiB; budget {budget / MIB:.3f} MiB")
    budget_run = [r[0] for r in run_ranks(fit_each, 2, [{"memory_budget": budget}], layout, "tiny-moe",
                                          timeout=900)]
    print(f"{name}: chose {budget_run[0]['chosen']}, measured peak {max(r['peak'] for r in budget_run) / MIB:.3f}"
          f" MiB; {budget_run[0]['reason']}")
    assert all(r["traced_on_process_group"] for r in budget_run), budget_run  # MoE: not the fake trace
    assert {r["chosen"] for r in budget_run} == {target}, (budget, measured, budget_run[0]["reason"])
    chosen = BY_NAME[target]
    assert budget_run[0]["applied"]["activation_checkpointing"] == chosen.activation_checkpointing
    assert budget_run[0]["applied"]["checkpoint_every"] == chosen.checkpoint_every
    # The chosen policy runs under the budget; no cheaper policy of the list would have.
    assert max(r["peak"] for r in budget_run) <= budget, (budget, measured, budget_run)
    assert all(measured[p] > budget for p in ORDER[: ORDER.index(target)]), (budget, measured)
    reference = train_reference(build_module("tiny-moe"), make_data(128), STEPS, 2 * MICRO)["losses"]
    losses = mean_over_ranks([r["losses"] for r in budget_run])
    assert max_relative_diff(losses, reference) <= RTOL, (losses, reference)


# ddp_ep1, worst rank, measured on 2026-11-30: none 6.395, selective 4.558, every 2nd block 4.924, full 4.300 MiB.
DDP_EP1_BUDGET = 4 * MIB + 439 * MIB // 1000  # 4.439 MiB: only `full` fits


@pytest.mark.slow
def test_user_script_with_a_budget_and_a_moe_model(tmp_path) -> None:
    """``python train_budget.py BUDGET OUT moe-ddp``: Lightning's launcher starts 2 DDP ranks of tiny-moe, nothing in
    the environment; the fake trace cannot follow MoE routing, so the ranks choose with a real step on their
    process group, and the run trains like one process."""
    import json
    from pathlib import Path

    from picotron_lightning.testing import run_script

    script = Path(__file__).resolve().parents[1] / "user_path" / "scripts" / "train_budget.py"
    output = run_script(script, str(DDP_EP1_BUDGET), str(tmp_path / "out.json"), "moe-ddp", cwd=tmp_path,
                        timeout=900).stdout
    result = json.loads((tmp_path / "out.json").read_text())
    assert (result["policy"], result["checkpointing"], result["data_parallel_mode"]) == ("full", "full", "ddp"), result
    assert "memory policy 'full'" in output and "selective needs" in output, output[-3000:]
    assert "estimated with a real step on the process group" in output, output[-3000:]
    reference = train_reference(build_module("tiny-moe"), make_data(128), STEPS, 2 * MICRO)["losses"]
    assert max_relative_diff(result["losses"], reference) <= RTOL, (result["losses"], reference)
