"""``pipeline_split="trace"`` with FSDP2 (``data_parallel_mode="fsdp"`` / ``"hsdp"``): pp=2 x dp=2 on 4 ranks,
pp=2 x dp=2 x tp=2 on 8.

The stages are sharded with FSDP2 at setup as with the structural split, and the traced graphs run over
FSDP2's gathered parameters (``parallel/pipeline_parallel/traced_sharding.py``). Checked against one
process (fp32, relative 1e-4 per step, the replica mean of the global batch), with the parameters really
sharded over dp, and checkpoints written with it resumed by the traced and by the structural split.
"""

from __future__ import annotations

import pytest

from picotron_lightning.testing import run_ranks
from tests.parity import RTOL, make_data, make_module, max_relative_diff
from tests.pipeline.pp_runs import CFG, reference_model, reference_val_loss, run

STEPS = 8
MICRO = 4
CKPT = "epoch=3-step=4.ckpt"  # one global batch (dp=2 x 4) per epoch: a checkpoint after step 4 of 6
TRACE_FSDP = {"pipeline_parallel_size": 2, "pipeline_split": "trace", "data_parallel_mode": "fsdp"}


def _world4(rank: int, world: int, ckpt_dir: str) -> dict:
    data, val, small = make_data(64), make_data(14, seed=7), make_data(2 * MICRO)
    out = {
        "fsdp": run(world, data, MICRO, STEPS, TRACE_FSDP, val_data=val),
        "hsdp": run(world, data, MICRO, 4, {**TRACE_FSDP, "data_parallel_mode": "hsdp", "hsdp_shard_size": 1}),
        # two stages per rank, split backward (input, then weight gradients over the stage's parameters)
        "zbv": run(world, data, MICRO, 4, {**TRACE_FSDP, "pipeline_schedule": "zbv"}),
        "ckpt": run(world, small, MICRO, 6, TRACE_FSDP, ckpt_dir=ckpt_dir),
    }
    resume = f"{ckpt_dir}/{CKPT}"
    out["resume_trace"] = run(world, small, MICRO, 6, TRACE_FSDP, resume_from=resume)
    out["resume_structural"] = run(world, small, MICRO, 6, {**TRACE_FSDP, "pipeline_split": "structural"},
                                   resume_from=resume)
    return out


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> list[dict]:
    return run_ranks(_world4, 4, str(tmp_path_factory.mktemp("pp_trace_fsdp_ckpt")), timeout=1500)


def _replica_mean(world4: list[dict], name: str) -> list[float]:
    # rank = pp * dp_size + dp: ranks 0 and 1 are the two replicas' first stage.
    return [(a + b) / 2 for a, b in zip(world4[0][name]["losses"], world4[1][name]["losses"], strict=True)]


@pytest.mark.parametrize("name", ["fsdp", "hsdp", "zbv"])
@pytest.mark.slow
def test_traced_pp2_dp2_fsdp_matches_one_process(world4, name):
    steps = len(world4[0][name]["losses"])
    ref = reference_model(make_data(64), steps, 2 * MICRO)[1]
    diff = max_relative_diff(_replica_mean(world4, name), ref)
    print(f"trace {name} pp=2 x dp=2: max relative diff {diff:.2e}")
    assert diff <= RTOL, (_replica_mean(world4, name), ref)
    for i, r in enumerate(world4):  # both stages of a replica report that replica's loss
        assert r[name]["data_parallel_mode"] == ("hsdp" if name == "hsdp" else "fsdp")
        assert max_relative_diff(r[name]["losses"], world4[i % 2][name]["losses"]) <= RTOL
        assert all(r[name]["grads_seen"])


@pytest.mark.slow
def test_traced_fsdp_validation_loss_equals_one_process(world4):
    module, _ = reference_model(make_data(64), STEPS, 2 * MICRO)
    ref = reference_val_loss(module, make_data(14, seed=7), MICRO)
    for rank in world4:
        assert abs(rank["fsdp"]["val_loss"] - ref) / ref <= RTOL, (rank["fsdp"]["val_loss"], ref)


@pytest.mark.slow
def test_traced_fsdp_shards_every_parameter_over_dp(world4):
    """Every parameter a rank holds is a DTensor sharded over dp, and the two dp ranks of a stage hold it whole."""
    full = {n: p.numel() for n, p in make_module(config=CFG).named_parameters()}
    for stage in (0, 1):
        ranks = [world4[2 * stage], world4[2 * stage + 1]]
        for r in ranks:
            assert set(r["fsdp"]["dp_sharded"]) == set(r["fsdp"]["params"]), r["fsdp"]["params"]
        for name in ranks[0]["fsdp"]["params"]:
            locals_ = [r["fsdp"]["dp_sharded"][name] for r in ranks]
            assert sum(locals_) == full[name] and max(locals_) < full[name], (name, locals_, full[name])


@pytest.mark.slow
def test_traced_fsdp_checkpoint_resumes_with_traced_and_structural_split(world4):
    ref = reference_model(make_data(2 * MICRO), 6, 2 * MICRO)[1]
    assert max_relative_diff(_replica_mean(world4, "ckpt"), ref) <= RTOL, (_replica_mean(world4, "ckpt"), ref)
    for name in ("resume_trace", "resume_structural"):
        resumed = _replica_mean(world4, name)
        assert len(resumed) == 2, resumed
        assert max_relative_diff(resumed, ref[4:]) <= RTOL, (name, resumed, ref[4:])


def _world8(rank: int, world: int) -> dict:
    return run(world, make_data(64), MICRO, 4, {**TRACE_FSDP, "tensor_parallel_size": 2}, clip=0.05)


@pytest.fixture(scope="module")
def world8() -> list[dict]:
    return run_ranks(_world8, 8, timeout=1500)


@pytest.mark.slow
def test_traced_pp2_dp2_tp2_fsdp_matches_one_process(world8):
    """pp=2 x dp=2 x tp=2 (rank = pp * 4 + dp * 2 + tp): the tensor-parallel twins over FSDP2's gathered shards.

    Clipped at 0.05 (below every step's gradient norm): the step equals one process's only if the norm
    counts every (dp x tp)-sharded parameter once.
    """
    ref = reference_model(make_data(64), 4, 2 * MICRO, clip=0.05)[1]
    replica_mean = [(a + b) / 2 for a, b in zip(world8[0]["losses"], world8[2]["losses"], strict=True)]
    diff = max_relative_diff(replica_mean, ref)
    print(f"trace fsdp pp=2 x dp=2 x tp=2: max relative diff {diff:.2e}")
    assert diff <= RTOL, (replica_mean, ref)
    full = {n: p.numel() for n, p in make_module(config=CFG).named_parameters()}
    sharded = world8[0]["dp_sharded"]  # a column-wise linear of stage 0: a quarter on each of the 4 ranks
    assert sharded["model.layers.0.attention.q_proj.weight"] == full["model.layers.0.attention.q_proj.weight"] // 4
    assert all(r["data_parallel_mode"] == "fsdp" and all(r["grads_seen"]) for r in world8)


def test_traced_fsdp_with_tp_refuses_split_backward_schedules():
    from picotron_lightning.parallel.pipeline_parallel import PipelineSplitError
    from picotron_lightning.parallel.pipeline_parallel.traced_sharding import check_traced_sharding
    from picotron_lightning.topology import ParallelLayout

    three_d = ParallelLayout(pipeline_parallel_size=2, tensor_parallel_size=2).resolve(8)
    check_traced_sharding(three_d, "fsdp", "1f1b")
    check_traced_sharding(three_d, "ddp", "zbv")  # replicas: the schedule runs the traced stage itself
    check_traced_sharding(ParallelLayout(pipeline_parallel_size=2).resolve(4), "fsdp", "zbv")  # tp=1: tested above
    with pytest.raises(PipelineSplitError, match="data_parallel_mode='fsdp' and tensor_parallel_size=2 does not "
                                                 "support pipeline_schedule='zbv'.*'1f1b'"):
        check_traced_sharding(three_d, "fsdp", "zbv")
