"""OOM recovery's decisions as pure functions, and the injection tooling on one process (fast tier).

The multi-rank behaviour (agreement, redo, stop, user's path) is in ``test_oom_ranks.py``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from picotron_lightning.memory.oom import (
    CollectiveGuard,
    ExpertLayerFacts,
    SplitSchedule,
    batch_size_of,
    check_recovery_layout,
    exhausted_message,
    memory_history_kwargs,
    snapshot_path,
    split_batch,
)
from picotron_lightning.memory.options import MemoryOptions
from picotron_lightning.monitoring import MetricsCollector
from picotron_lightning.testing_memory import BudgetOOM, OOMAt, ScriptedOOM, current_phase


def test_split_doubles_on_oom_stops_at_one_sample_and_tries_larger_after_clean_steps() -> None:
    schedule = SplitSchedule(retry_larger_after=2)
    assert schedule.split == 1
    assert schedule.on_oom(batch_size=6) == 2
    assert schedule.on_oom(batch_size=6) == 4
    assert schedule.on_oom(batch_size=6) == 6  # capped at one sample per micro-batch
    assert schedule.on_oom(batch_size=6) is None  # nothing smaller left
    schedule.on_success()
    assert schedule.split == 6
    schedule.on_success()
    assert schedule.split == 3  # two clean steps: half as many micro-batches again
    schedule.on_success()
    schedule.on_success()
    assert schedule.split == 1
    schedule.on_success()
    assert schedule.split == 1
    kept = SplitSchedule(retry_larger_after=0)
    kept.on_oom(8)
    for _ in range(100):
        kept.on_success()
    assert kept.split == 2


def test_split_batch_cuts_dim0_and_weights_by_samples() -> None:
    batch = {"ids": torch.arange(10).reshape(5, 2), "mask": torch.ones(5, 3), "name": "x"}
    parts = split_batch(batch, 2)
    assert [p["ids"].size(0) for p, _ in parts] == [3, 2]
    assert [w for _, w in parts] == [0.6, 0.4]
    assert torch.equal(torch.cat([p["ids"] for p, _ in parts]), batch["ids"])
    assert all(p["name"] == "x" for p, _ in parts)
    assert len(split_batch(torch.zeros(4, 7), 4)) == 4
    with pytest.raises(ValueError, match="same dim 0"):
        batch_size_of((torch.zeros(3), torch.zeros(4)))
    with pytest.raises(ValueError, match="cannot split"):
        split_batch(torch.zeros(2, 1), 3)


def test_weighted_pieces_give_the_whole_batch_gradient() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x, y = torch.randn(7, 4), torch.randn(7, 3)
    torch.nn.functional.mse_loss(layer(x), y).backward()
    whole = layer.weight.grad.clone()
    layer.weight.grad = None
    for (xs, ys), weight in split_batch((x, y), 4):
        (torch.nn.functional.mse_loss(layer(xs), ys) * weight).backward()
    torch.testing.assert_close(layer.weight.grad, whole, rtol=1e-5, atol=1e-6)


def test_collective_guard_stops_before_a_collective_runs() -> None:
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        t = torch.ones(2)
        with CollectiveGuard():
            (t * 2).sum()  # computation is fine
            with pytest.raises(RuntimeError, match=r"oom_recovery=True.*c10d\.allreduce_"):
                dist.all_reduce(t)
        assert torch.equal(t, torch.ones(2))  # it did not run
    finally:
        dist.destroy_process_group()


MOE_OK = ExpertLayerFacts("model.layers.1.mlp", records_exchange=True)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"pp": 4, "dp": 2, "ep": 2, "experts": [MOE_OK], "pipeline_schedule": "zbv", "activation_checkpointing": "full"},
     "MoE layer.s. at expert_parallel_size=2 under pipeline_schedule='zbv' with activation_checkpointing='full'"),
    ({"pp": 2, "dp": 2, "ep": 2, "experts": [MOE_OK], "pipeline_split": "trace"}, "pipeline_split='trace'"),
    ({"experts": [ExpertLayerFacts("model.layers.0.mlp.experts", records_exchange=False)]},
     "'model.layers.0.mlp.experts' exchanges tokens without recording"),
    ({"experts": [ExpertLayerFacts("moe", records_exchange=True, aux_loss_coeff=0.01)]}, "aux_loss_coeff=0.01"),
    ({"experts": [ExpertLayerFacts("moe", records_exchange=True, capacity_factor=1.25)]}, "capacity_factor=1.25"),
    ({"automatic_optimization": False}, "automatic_optimization"),
])
def test_layouts_without_a_sound_agreement_are_refused(kwargs: dict, needle: str) -> None:
    args = {"pp": 1, **kwargs}
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")) as info:
        check_recovery_layout(**args)
    assert "oom_recovery" in str(info.value)


def test_layouts_with_a_sound_agreement_are_accepted() -> None:
    check_recovery_layout(pp=1)  # DDP, FSDP2/HSDP, tensor parallelism
    check_recovery_layout(pp=1, experts=[MOE_OK, MOE_OK])  # dropless MoE without an auxiliary loss, any ep and tp
    check_recovery_layout(pp=2)  # stages alone, or with data-parallel replicas (FSDP2, HSDP or DDP-style)
    check_recovery_layout(pp=2, tp=2)  # tp inside stages: any schedule, loss parallelism too
    check_recovery_layout(pp=2, tp=2, experts=[MOE_OK])  # MoE layers in the stages at dp=1: nothing of theirs talks
    check_recovery_layout(pp=2, dp=2, experts=[MOE_OK])  # ... and at ep=1: their statistics' all-reduce is replayed
    check_recovery_layout(pp=2, dp=2, ep=2, experts=[MOE_OK])  # ... and ep=2: each chunk's exchange, by protocol
    check_recovery_layout(pp=2, dp=2, ep=2, experts=[MOE_OK], pipeline_schedule="interleaved_1f1b")
    check_recovery_layout(pp=2, dp=2, ep=2, experts=[MOE_OK], pipeline_schedule="zbv")  # ... in its input half


def test_a_long_list_of_reasons_is_shortened() -> None:
    many = [ExpertLayerFacts(f"layer{i}", records_exchange=True, aux_loss_coeff=0.01) for i in range(6)]
    with pytest.raises(ValueError, match="and 2 more") as info:
        check_recovery_layout(pp=1, experts=many)
    assert "layer3" in str(info.value) and "layer4" not in str(info.value)


def test_stop_message_names_the_estimate_and_what_to_turn_on() -> None:
    text = exhausted_message(step=7, batch_size=4, ranks=[1, 3], error="injected", activation_checkpointing="none",
                             device=torch.device("cpu"), peak_bytes=3 << 20)
    assert "step 7" in text and "rank(s) [1, 3]" in text and "4 micro-batches" in text and "3.0 MiB" in text
    assert "python -m picotron_lightning.memory.estimate" in text
    assert "activation_checkpointing='selective'" in text and "memory_budget" in text
    full = exhausted_message(step=1, batch_size=1, ranks=[0], error="x", activation_checkpointing="selective",
                             device=torch.device("cpu"))
    assert "activation_checkpointing='full'" in full


def test_memory_history_only_on_cuda() -> None:
    assert memory_history_kwargs(torch.device("cpu"), 1000) is None
    assert memory_history_kwargs(torch.device("cuda", 0), 0) is None
    kwargs = memory_history_kwargs(torch.device("cuda", 0), 5000)
    assert kwargs is not None and kwargs["max_entries"] == 5000 and kwargs["enabled"] == "all"
    expected = Path("/logs/oom_snapshots/rank3_step12_attempt2.pickle")
    assert snapshot_path("/logs", rank=3, step=12, attempt=2) == expected


def test_oom_options_are_validated() -> None:
    assert not MemoryOptions().oom_recovery
    assert MemoryOptions.from_arg({"oom_recovery": True, "oom_retry_larger_after": 0}).oom_recovery
    with pytest.raises(ValueError, match="oom_recovery"):
        MemoryOptions(oom_recovery="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="oom_retry_larger_after=-1"):
        MemoryOptions(oom_retry_larger_after=-1)
    with pytest.raises(ValueError, match="oom_memory_history"):
        MemoryOptions(oom_memory_history=-5)


def test_fabric_refuses_oom_recovery() -> None:
    from picotron_lightning import Picotron3DFabricStrategy

    with pytest.raises(ValueError, match="oom_recovery=True` is not supported with Fabric"):
        Picotron3DFabricStrategy(memory={"oom_recovery": True})


def _step(model: torch.nn.Module) -> None:
    model(torch.randn(3, 8)).square().mean().backward()


def test_scripted_oom_raises_at_the_op_and_phase_asked_for() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    with ScriptedOOM([OOMAt(rank=0, step=0, phase="backward", op=2)]) as mode:
        with pytest.raises(torch.OutOfMemoryError, match="backward op 2"):
            _step(model)
    assert mode.fired == [(0, "backward", 2, 0)]
    with ScriptedOOM([OOMAt(rank=0, step=0, phase="forward", op=1)]) as mode:
        with pytest.raises(torch.OutOfMemoryError, match="forward op 1"):
            _step(model)
    # attempts=1: a later attempt of the same step runs through.
    attempt = [0]
    with ScriptedOOM([OOMAt(rank=0, step=0, op=0)], attempt_of=lambda: attempt[0]) as mode:
        with pytest.raises(torch.OutOfMemoryError):
            _step(model)
        attempt[0] = 1
        _step(model)
    assert len(mode.fired) == 1
    assert current_phase() == "forward"


def test_budget_oom_raises_past_the_bytes_created_in_the_step() -> None:
    model = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64)
    with BudgetOOM(budget=1 << 30) as roomy:
        model(x).sum().backward()
    assert roomy.fired == 0 and roomy.peak > 0
    with BudgetOOM(budget=roomy.peak // 2) as tight:
        with pytest.raises(torch.OutOfMemoryError, match="budget"):
            model(x).sum().backward()
    assert tight.fired == 1


def test_metrics_collector_writes_reported_values_with_the_next_logged_step() -> None:
    collector = MetricsCollector(log_every_n_steps=1, flops_per_token=1.0, peak_flops_per_device=1.0,
                                 log_memory=False, log_moe=False)
    collector.record_metric("memory/oom_retries", 2)
    metrics = collector.end_batch(step=1)
    assert metrics is not None and metrics["memory/oom_retries"] == 2.0
    assert "memory/oom_retries" not in (collector.end_batch(step=2) or {})
