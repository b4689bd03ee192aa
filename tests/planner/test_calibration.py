"""The block calibration (CPU): steps composed from measured per-style block costs, the cache, the CLI switch.

The costs below are made-up inputs of the composition (not measurements, not the benchmark's numbers): the
tests check the arithmetic that turns a calibration into a layout's step and its rank among layouts.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from picotron_lightning.models import CausalLMModule
from picotron_lightning.planner import Constraints, device_spec, plan_layout
from picotron_lightning.planner.block_probe import cache_key, cached_rates, calibrate_cpu
from picotron_lightning.planner.calibration import BlockCalibration, Linear, StyleCost, style_of
from picotron_lightning.planner.cost_model import step_time
from tests.planner.tiny_spec import SEQ, candidate, tiny_spec


@pytest.fixture(scope="module")
def spec():
    return tiny_spec()


def _cost(block_fixed: float, block_per_sample: float = 0.001) -> StyleCost:
    return StyleCost(block_forward=Linear(block_fixed / 3, block_per_sample / 3),
                     block_backward=Linear(2 * block_fixed / 3, 2 * block_per_sample / 3),
                     outer_forward=Linear(0.002, 0.0005), outer_backward=Linear(0.004, 0.001),
                     block_optimizer=0.003, outer_optimizer=0.001)


def _device(styles, processes=2, cores=2):
    calibration = BlockCalibration(processes, SEQ, tuple(styles))
    return dataclasses.replace(device_spec("cpu"), calibration=calibration, cores=cores, rates_processes=processes)


def test_step_is_composed_from_the_measured_block_costs(spec) -> None:
    cost = _cost(0.010)
    c = candidate(dp=2, mode="ddp", micro=2, mb=2)
    t = step_time(spec, c, _device([((2, 1, "ddp", "none"), cost)]), 2)
    block = cost.block_forward.at(2) + cost.block_backward.at(2)
    outer = cost.outer_forward.at(2) + cost.outer_backward.at(2)
    assert t.compute == pytest.approx(2 * (spec.num_blocks * block + outer))  # two accumulation micro-batches
    assert t.overhead["optimizer"] == pytest.approx(spec.num_blocks * 0.003 + 0.001)  # once per step
    assert t.total == pytest.approx(t.compute + t.overhead["optimizer"])  # dp comm is inside the measurement
    # The rate model (no calibration) gives something else for the same candidate.
    assert step_time(spec, c, device_spec("cpu"), 2).total != pytest.approx(t.total)


def test_the_measured_order_of_styles_decides_the_ranking(spec) -> None:
    # FSDP measured twice as slow per block as DDP: the plan ranks DDP first although FLOPs are equal.
    device = _device([((2, 1, "ddp", "none"), _cost(0.010)), ((2, 1, "fsdp", "none"), _cost(0.020))])
    result = plan_layout(spec, devices=2, devices_per_node=2, device=device, global_batch=8,
                         constraints=Constraints(dp=2, tp=1, pp=1, ep=1, checkpointing="none",
                                                 num_microbatches=1))
    modes = [p.candidate.dp_mode for p in result.ranked]
    assert modes == ["ddp", "fsdp"]
    swapped = _device([((2, 1, "ddp", "none"), _cost(0.020)), ((2, 1, "fsdp", "none"), _cost(0.010))])
    result = plan_layout(spec, devices=2, devices_per_node=2, device=swapped, global_batch=8,
                         constraints=Constraints(dp=2, tp=1, pp=1, ep=1, checkpointing="none",
                                                 num_microbatches=1))
    assert [p.candidate.dp_mode for p in result.ranked] == ["fsdp", "ddp"]


def test_pipeline_bubble_is_charged_only_beyond_the_shared_cores(spec) -> None:
    cost = _cost(0.010)
    c = candidate(pp=2, micro=2, mb=4)
    style = ((1, 1, "none", "none"), cost)
    # 2 processes on 2 cores: each stage has a core; 1F1B with M=2 idles (pp-1)/M = half of its work.
    alone = step_time(spec, c, _device([style], processes=2, cores=2), 2)
    assert alone.bubble == pytest.approx(alone.compute / 2)
    assert alone.exposed["pp"] > 0  # the sends, over the link
    # 4 processes on 2 cores (dp2 x pp2 measured with 4 busy): the busy ranks need the shared cores for
    # their whole work anyway; the idle slots cost nothing beyond that.
    c4 = candidate(dp=2, pp=2, micro=2, mb=2)
    shared = step_time(spec, c4, _device([((2, 1, "fsdp", "none"), cost)], processes=4, cores=2), 4)
    assert shared.bubble == 0.0
    # 4 processes on 3 cores, M=1: the critical path (twice a stage's work at 3/4 of a core's time each)
    # exceeds the shared time by half the compute, less what the optimizer's share leaves.
    one = step_time(spec, candidate(dp=2, pp=2, micro=1, mb=4), _device([((2, 1, "fsdp", "none"), cost)], 4, 3), 4)
    assert one.bubble == pytest.approx(0.5 * one.compute - 0.25 * one.overhead["optimizer"])


def test_fsdp_gathers_and_reductions_are_charged_once_per_pipeline_step(spec) -> None:
    # A pipeline stage keeps its FSDP2 units gathered across its microbatches and reduces once at the end;
    # the style was measured with a gather and a reduction in every pass, so M - 1 of them come off.
    synced = dataclasses.replace(_cost(0.010), block_sync=0.004, outer_sync=0.002)
    plain = dataclasses.replace(synced, block_sync=0.0, outer_sync=0.0)
    c = candidate(dp=2, pp=2, micro=4, mb=1)
    blocks = spec.num_blocks // 2
    with_sync = step_time(spec, c, _device([((2, 1, "fsdp", "none"), synced)], processes=4, cores=4), 4)
    without = step_time(spec, c, _device([((2, 1, "fsdp", "none"), plain)], processes=4, cores=4), 4)
    assert without.compute - with_sync.compute == pytest.approx(3 * (blocks * 0.004 + 0.002))
    # Without a pipeline each accumulation micro-batch gathers and reduces again: nothing comes off.
    accumulate = candidate(dp=2, micro=4, mb=1)
    assert step_time(spec, accumulate, _device([((2, 1, "fsdp", "none"), synced)]), 2).compute == pytest.approx(
        step_time(spec, accumulate, _device([((2, 1, "fsdp", "none"), plain)]), 2).compute)


def test_measured_costs_scale_with_the_sharing_of_the_planned_run(spec) -> None:
    # measured with 2 processes on 2 cores, planned for 4 on the same 2 cores: every cost doubles
    cost = _cost(0.010)
    c = candidate(dp=4, mode="ddp", mb=2)
    device = _device([((4, 1, "ddp", "none"), cost)], processes=2, cores=2)
    t = step_time(spec, c, device, 4)
    block = cost.block_forward.at(2) + cost.block_backward.at(2)
    outer = cost.outer_forward.at(2) + cost.outer_backward.at(2)
    assert t.compute == pytest.approx(2 * (spec.num_blocks * block + outer))


def test_styles_without_a_measurement_use_the_rate_model(spec) -> None:
    device = _device([((2, 1, "ddp", "none"), _cost(0.010))])
    fsdp = candidate(dp=2, mb=4)
    assert step_time(spec, fsdp, device, 2) == step_time(spec, fsdp, device_spec("cpu"), 2)
    assert style_of(candidate(dp=2, mode="hsdp")) is None
    assert style_of(candidate(dp=1, tp=2, mode="ddp", ckpt="full")) == (1, 2, "none", "full")


def test_the_gpu_path_ignores_nothing_and_gets_no_calibration() -> None:
    assert device_spec("NVIDIA H100 80GB HBM3").calibration is None
    assert device_spec("cpu").calibration is None  # the fixed table: the strategy's "auto" path never probes


def test_linear_through_two_points_clips_noise() -> None:
    assert Linear.through((1, 4), (0.010, 0.019)) == Linear(pytest.approx(0.007), pytest.approx(0.003))
    assert Linear.through((1, 4), (0.010, 0.008)) == Linear(0.010, 0.0)  # a negative slope is noise


def test_cached_calibration_is_read_without_starting_ranks(spec, tmp_path, monkeypatch) -> None:
    import picotron_lightning.testing as testing

    monkeypatch.setenv("PICOTRON_PLANNER_CACHE", str(tmp_path))
    style = (2, 1, "ddp", "none")
    cost = _cost(0.010)
    (tmp_path / f"{cache_key(spec, 2, style, 4)}.json").write_text(
        json.dumps({"cost": dataclasses.asdict(cost)}))

    def no_ranks(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(testing, "run_ranks", no_ranks)
    calibration = calibrate_cpu(lambda: None, spec, 2, [style], samples=4)
    assert calibration.cost(style) == cost
    with pytest.raises(AssertionError, match="cache was not used"):  # another model shape: not cached
        calibrate_cpu(lambda: None, dataclasses.replace(spec, seq_len=128), 2, [style], samples=4)
    # the link's rates: measured once (here: the stand-in's answer), then read back without ranks
    monkeypatch.setattr(testing, "run_ranks", lambda *args, **kwargs: [{"bandwidth": 1e9, "latency": 1e-4}])
    assert cached_rates(2) == {"bandwidth": 1e9, "latency": 1e-4}
    monkeypatch.setattr(testing, "run_ranks", no_ranks)
    assert cached_rates(2) == {"bandwidth": 1e9, "latency": 1e-4}
    with pytest.raises(AssertionError, match="cache was not used"):
        cached_rates(2, refresh=True)


def test_calibrate_refuses_a_gpu_device(capsys) -> None:
    from picotron_lightning.plan import main

    code = main(["--model", "picotron_lightning.models:CausalLMModule", "--devices", "2", "--calibrate",
                 "--device", "NVIDIA H100 80GB HBM3"])
    assert code == 2
    assert "--calibrate measures a CPU machine" in capsys.readouterr().err


@pytest.mark.slow
def test_probe_measures_every_style_on_real_ranks(spec, tmp_path, monkeypatch) -> None:
    import functools

    monkeypatch.setenv("PICOTRON_PLANNER_CACHE", str(tmp_path))
    styles = [(1, 1, "none", "none"), (2, 1, "fsdp", "none"), (1, 2, "none", "none"), (2, 1, "ddp", "full")]
    factory = functools.partial(CausalLMModule, "tiny", {"num_layers": 4})
    calibration = calibrate_cpu(factory, spec, 2, styles, samples=2, timeout=600)
    for style in styles:
        cost = calibration.cost(style)
        assert cost is not None
        values = [cost.block_optimizer, cost.outer_optimizer] + [
            getattr(getattr(cost, f), k) for f in ("block_forward", "block_backward", "outer_forward",
                                                   "outer_backward") for k in ("fixed", "per_sample")]
        assert all(math.isfinite(v) and v >= 0 for v in values)
        # a block's forward and backward take time in every style
        assert cost.block_forward.at(2) + cost.block_backward.at(2) > 0
        # FSDP2's per-pass gathers and reductions are measured where there are any (dp > 1 under FSDP2)
        if style[2] == "fsdp":
            assert cost.block_sync > 0
        else:
            assert cost.block_sync == cost.outer_sync == 0.0
    assert len(list(tmp_path.glob("*.json"))) == len(styles)
