"""``memory_budget``: the cheapest memory policy that fits, chosen before training; every policy keeps the numbers.

The choice is a pure function of the estimates (tested first, fast). On real gloo ranks, every
policy trains to the one-process losses (offload included: on CPU its hooks run and move nothing),
and with a budget between two policies' measured peaks the strategy picks the cheaper one that
fits, whose measured peak is under the budget while every cheaper policy's is over it.
"""

from __future__ import annotations

import dataclasses

import pytest

from picotron_lightning.memory.cuda_allocator import block_size, cuda_memory
from picotron_lightning.memory.options import MemoryOptions
from picotron_lightning.memory.policy import (
    POLICIES,
    MemoryBudgetError,
    PolicyEstimate,
    choose_policy,
    resolve_budget,
    skip_reason,
)
from picotron_lightning.testing import run_ranks
from tests.memory.budget_runs import MICRO, SCRIPT_STEPS, STEPS, build_module, fit_each, sample_batch
from tests.parity import RTOL, make_data, max_relative_diff, mean_over_ranks, train_reference

MIB = 1 << 20
BY_NAME = {p.name: p for p in POLICIES}


def _estimates(peaks: dict[str, int | None], skipped: dict[str, str] | None = None) -> list[PolicyEstimate]:
    skipped = skipped or {}
    return [PolicyEstimate(p, peaks.get(p.name), skipped=skipped.get(p.name, "")) for p in POLICIES]


def test_choice_is_the_first_policy_that_fits() -> None:
    peaks = {"none": 9 * MIB, "selective": 8 * MIB, "every_2nd_block": 7 * MIB, "full": 6 * MIB,
             "activation_offload": 4 * MIB, "cpu_offload": 3 * MIB}
    chosen, reason = choose_policy(_estimates(peaks), 7 * MIB + 1)
    assert chosen.policy.name == "every_2nd_block"
    assert "none needs 9.00 MiB" in reason and "selective needs 8.00 MiB" in reason
    assert choose_policy(_estimates(peaks), 100 * MIB)[0].policy.name == "none"
    # A cheaper policy that does not apply is passed over, with its reason.
    skipped = {"activation_offload": "the device is host memory", "cpu_offload": "the device is host memory"}
    with pytest.raises(MemoryBudgetError) as error:
        choose_policy(_estimates(peaks, skipped), 5 * MIB)
    message = str(error.value)
    assert "5.00 MiB" in message and all(name in message for name in BY_NAME), message
    assert "the device is host memory" in message
    assert choose_policy(_estimates(peaks), 3 * MIB)[0].policy.name == "cpu_offload"


def test_budget_resolution_and_skips() -> None:
    assert resolve_budget(123, "cpu", None) == 123
    assert resolve_budget(0.5, "cuda", 80 * MIB) == 40 * MIB
    with pytest.raises(ValueError, match=r"memory_budget=0.5.*device_memory"):
        resolve_budget(0.5, "cpu", None)
    assert skip_reason(BY_NAME["activation_offload"], "cpu", "fsdp")
    assert not skip_reason(BY_NAME["activation_offload"], "cuda", "ddp")
    assert "fsdp" in skip_reason(BY_NAME["cpu_offload"], "cuda", "ddp")
    assert not skip_reason(BY_NAME["full"], "cpu", "ddp")


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"memory_budget": 1.5}, "memory_budget=1.5"),
    ({"memory_budget": -3}, "memory_budget=-3"),
    ({"memory_budget": "1GB"}, "memory_budget='1GB'"),
    ({"memory_budget": 1 << 30, "activation_checkpointing": "full"}, "either a budget"),
    ({"cpu_offload": "yes"}, "cpu_offload"),
])
def test_bad_budget_options_name_the_argument(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        MemoryOptions(**kwargs)


def test_policy_applies_its_fields_and_drops_the_budget() -> None:
    memory = BY_NAME["cpu_offload"].applied_to(MemoryOptions(memory_budget=1 << 30))
    assert memory.memory_budget is None and memory.cpu_offload and memory.activation_offload
    every = BY_NAME["every_2nd_block"].applied_to(MemoryOptions())
    assert (every.activation_checkpointing, every.checkpoint_every) == ("full", 2)


def test_cuda_allocator_rounding() -> None:
    assert block_size(1) == 512 and block_size(513) == 1024 and block_size(0) == 512
    small = cuda_memory([1000] * 3)  # three 1 KiB blocks in one 2 MiB small segment
    assert (small.requested, small.active, small.reserved) == (3000, 3 * 1024, 2 * MIB)
    medium = cuda_memory([3 * MIB, 3 * MIB])  # 1-10 MiB blocks share 20 MiB segments
    assert medium.reserved == 20 * MIB and medium.active == 6 * MIB
    large = cuda_memory([11 * MIB + 1])  # >= 10 MiB: a segment of its own, rounded to 2 MiB
    assert large.reserved == 12 * MIB and large.active == 11 * MIB + 512
    mixed = [1000, 3 * MIB, 11 * MIB + 1]
    assert cuda_memory(mixed).reserved == 2 * MIB + 20 * MIB + 12 * MIB
    expandable = cuda_memory(mixed, expandable_segments=True)  # pools grow in 2 MiB pages
    assert expandable.reserved == 2 * MIB + 16 * MIB and expandable.active == cuda_memory(mixed).active


def test_estimate_counts_offload_costs() -> None:
    """Fake-tensor trace: recompute FLOPs grow with checkpointing, offload moves bytes and lowers the device peak."""
    from picotron_lightning.memory.estimate import estimate_policies
    from picotron_lightning.options import Picotron3DOptions
    from picotron_lightning.parallel.data import DataParallelOptions
    from picotron_lightning.topology import ParallelLayout

    options = Picotron3DOptions(data_parallel=DataParallelOptions(mode="fsdp"))
    results = {e.policy.name: e for e in estimate_policies(
        build_module, sample_batch(), ParallelLayout(2, 1, 1, 1), options=options, device_type="cuda",
        policies=[BY_NAME[n] for n in ("none", "full", "activation_offload", "cpu_offload")])}
    assert results["none"].recompute_flops == 0 and results["full"].recompute_flops > 0
    assert results["activation_offload"].bytes_moved > 0 and results["none"].bytes_moved == 0
    assert results["activation_offload"].peak < results["none"].peak
    assert results["cpu_offload"].peak < results["activation_offload"].peak
    assert results["cpu_offload"].bytes_moved > results["activation_offload"].bytes_moved
    cuda = results["none"].ranks[0].cuda
    assert cuda is not None and cuda.reserved >= cuda.active >= results["none"].ranks[0].traced_peak


POLICY_RUNS = {
    "selective": {"activation_checkpointing": "selective"},
    "every_2nd_block": {"activation_checkpointing": "full", "checkpoint_every": 2},
    "full": {"activation_checkpointing": "full"},
    "activation_offload": {"activation_offload": True},
    "cpu_offload": {"activation_offload": True, "cpu_offload": True},
}


@pytest.mark.slow
def test_every_policy_trains_like_one_process() -> None:
    """2 ranks, FSDP2: each policy's losses equal one process's at 1e-4, and the policy was really applied."""
    runs = run_ranks(fit_each, 2, list(POLICY_RUNS.values()), timeout=900)
    reference = train_reference(build_module(), make_data(128), STEPS, 2 * MICRO)["losses"]
    for index, name in enumerate(POLICY_RUNS):
        per_rank = [runs[r][index] for r in range(2)]
        losses = mean_over_ranks([r["losses"] for r in per_rank])
        assert max_relative_diff(losses, reference) <= RTOL, (name, losses, reference)
        evidence = per_rank[0]
        blocks = {"selective": 4, "every_2nd_block": 2, "full": 4}.get(name, 0)
        assert evidence["checkpointed_blocks"] == blocks, (name, evidence)
        assert (evidence["offloaded_activation_bytes"] > 0) == ("offload" in name), (name, evidence)
        assert evidence["cpu_offload"] == (name == "cpu_offload"), (name, evidence)


@pytest.mark.slow
def test_budget_picks_the_cheapest_policy_whose_measured_peak_fits() -> None:
    """Measure every checkpointing policy on real ranks; a budget under `none` picks the next policy, which fits."""
    order = ["none", "selective", "every_2nd_block", "full"]
    memories = [dataclasses.asdict(BY_NAME[n]) for n in order]
    for memory in memories:
        memory.pop("name")
    # Estimated (fake tensors) and measured alike: none 9.04, selective 6.64 MiB.
    budget = 8 * MIB + MIB // 4
    runs = run_ranks(fit_each, 2, memories, timeout=900)
    measured = {name: max(runs[r][i]["peak"] for r in range(2)) for i, name in enumerate(order)}
    # In ranks of their own: the budget's estimate needs a process without a process group yet.
    budget_run = [r[0] for r in run_ranks(fit_each, 2, [{"memory_budget": budget}], timeout=600)]
    chosen = {r["chosen"] for r in budget_run}
    assert chosen == {"selective"}, (chosen, measured)  # every rank applies the same (rank 0's)
    assert budget_run[0]["applied"] == {"activation_checkpointing": "selective", "checkpoint_every": 1,
                                        "activation_offload": False, "cpu_offload": False}
    assert "'selective'" in budget_run[0]["reason"] and "none needs" in budget_run[0]["reason"]
    assert measured["selective"] <= budget < measured["none"], (budget, measured)
    assert max(r["peak"] for r in budget_run) <= budget, (budget, budget_run)
    # And it trains like one process.
    reference = train_reference(build_module(), make_data(128), STEPS, 2 * MICRO)["losses"]
    assert max_relative_diff(mean_over_ranks([r["losses"] for r in budget_run]), reference) <= RTOL


# Model-parallel layouts: strategy arguments, ranks, and whether the choice is made on the process group by a real
# step (pp: the fake trace cannot follow the pipeline schedule) or before launch on fake tensors (tp, FSDP2 x tp).
MODEL_PARALLEL_LAYOUTS = {
    "tp2": ({"tensor_parallel_size": 2}, 2, False),
    "pp2": ({"pipeline_parallel_size": 2}, 2, True),
    "dp2_tp2": ({"tensor_parallel_size": 2, "data_parallel_mode": "fsdp"}, 4, False),
}
# tp=2, worst rank, measured on 2026-11-30: none 5.62 MiB, selective 4.52 MiB.
TP2_BUDGET = 5 * MIB + MIB // 16


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODEL_PARALLEL_LAYOUTS))
def test_budget_with_tensor_or_pipeline_parallelism_picks_the_cheapest_policy_that_fits(name: str) -> None:
    """tp=2, pp=2 (2 ranks) or FSDP2 dp=2 x tp=2 (4 ranks): with a budget between `none`'s and `selective`'s measured
    peaks (worst rank), the strategy picks `selective` on every rank; its measured peak fits, `none`'s does not;
    losses as one process (which a fake trace's cached DTensor shardings once broke: see fake_process_group)."""
    layout, world, on_process_group = MODEL_PARALLEL_LAYOUTS[name]
    order = ["none", "selective"]
    memories = [dataclasses.asdict(BY_NAME[n]) for n in order]
    for memory in memories:
        memory.pop("name")
    runs = run_ranks(fit_each, world, memories, layout, timeout=900)
    measured = {policy: max(run[i]["peak"] for run in runs) for i, policy in enumerate(order)}
    assert measured["selective"] < measured["none"], measured
    budget = (measured["none"] + measured["selective"]) // 2
    print(f"{name}: measured none {measured['none'] / MIB:.3f}, selective {measured['selective'] / MIB:.3f} MiB "
          f"(worst rank); budget {budget / MIB:.3f} MiB")
    budget_run = [r[0] for r in run_ranks(fit_each, world, [{"memory_budget": budget}], layout, timeout=900)]
    assert all(r["traced_on_process_group"] is on_process_group for r in budget_run), budget_run
    assert {r["chosen"] for r in budget_run} == {"selective"}, (budget, measured, budget_run[0]["reason"])
    assert budget_run[0]["applied"]["activation_checkpointing"] == "selective"
    assert max(r["peak"] for r in budget_run) <= budget < measured["none"], (budget, measured, budget_run)
    print(f"{name}: chose {budget_run[0]['chosen']}, measured peak {max(r['peak'] for r in budget_run) / MIB:.3f} MiB;"
          f" {budget_run[0]['reason']}")
    dp = world // 2  # each layout has one model-parallel dimension of 2
    reference = train_reference(build_module(), make_data(128), STEPS, dp * MICRO)["losses"]
    assert max_relative_diff(mean_over_ranks([r["losses"] for r in budget_run]), reference) <= RTOL


@pytest.mark.slow
def test_budget_below_every_policy_fails_before_training() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)smaller than every memory policy.*none.*full.*budget"):
        run_ranks(fit_each, 2, [{"memory_budget": 1 * MIB}], timeout=600)


@pytest.mark.slow
def test_user_script_with_a_budget_picks_a_policy_and_trains_like_one_process(tmp_path) -> None:
    """``python train_budget.py``: Lightning's launcher starts 2 ranks, nothing in the environment."""
    import json
    from pathlib import Path

    from picotron_lightning.testing import run_script

    script = Path(__file__).resolve().parents[1] / "user_path" / "scripts" / "train_budget.py"
    budget = 8 * MIB + MIB // 4  # estimated: none 9.04, selective 6.64 MiB -> selective
    output = run_script(script, str(budget), str(tmp_path / "out.json"), cwd=tmp_path, timeout=600).stdout
    result = json.loads((tmp_path / "out.json").read_text())
    assert (result["policy"], result["checkpointing"]) == ("selective", "selective"), result
    assert "memory policy 'selective'" in output and "none needs" in output, output[-3000:]
    reference = train_reference(build_module(), make_data(128), SCRIPT_STEPS, 2 * MICRO)["losses"]
    assert max_relative_diff(result["losses"], reference) <= RTOL, (result["losses"], reference)


@pytest.mark.slow
def test_user_script_with_a_budget_under_tensor_parallelism(tmp_path) -> None:
    """``python train_budget.py BUDGET OUT tp2``: Lightning's launcher starts 2 tensor-parallel ranks, which chose
    before launch on fake tensors (as they would on CUDA ranks, where no real trace can choose for them)."""
    import json
    from pathlib import Path

    from picotron_lightning.testing import run_script

    script = Path(__file__).resolve().parents[1] / "user_path" / "scripts" / "train_budget.py"
    output = run_script(script, str(TP2_BUDGET), str(tmp_path / "out.json"), "tp2", cwd=tmp_path, timeout=900).stdout
    result = json.loads((tmp_path / "out.json").read_text())
    assert (result["policy"], result["checkpointing"]) == ("selective", "selective"), result
    assert "memory policy 'selective'" in output and "none needs" in output, output[-3000:]
    assert "estimated with fake tensors" in output, output[-3000:]
    reference = train_reference(build_module(), make_data(128), SCRIPT_STEPS, MICRO)["losses"]  # dp=1: one micro-batch
    assert max_relative_diff(result["losses"], reference) <= RTOL, (result["losses"], reference)


@pytest.mark.slow
def test_budget_with_data_not_readable_before_the_data_hooks_names_the_fix() -> None:
    """The choice reads one batch before Lightning's data hooks; a datamodule's `setup('fit')` is run first (the
    example config pretrain_memory_budget.yaml needs it), and data that only `prepare_data` would provide fails
    with a message naming the hooks, the user's error and the way out, before any training."""
    from tests.memory.budget_runs import fit_with_unreadable_data

    message = run_ranks(fit_with_unreadable_data, 1, timeout=300)[0]
    assert "before Lightning runs the data hooks" in message, message
    assert "FileNotFoundError: corpus.bin" in message and "even after `setup('fit')`" in message, message
    assert "memory=" in message and "--policies" in message, message


def test_fabric_budget_without_choosing_names_the_call() -> None:
    """A Fabric script cannot choose at launch (the model and a batch come later): launching with a budget but
    without `choose_memory_policy` stops before the process group, naming the call and where it goes."""
    from tests.memory.budget_runs import fabric_launch_without_choosing

    message = run_ranks(fabric_launch_without_choosing, 1, timeout=300)[0]
    assert "fabric.strategy.choose_memory_policy(model, batch)" in message, message
    assert "before `fabric.launch()`" in message and "memory=" in message, message
