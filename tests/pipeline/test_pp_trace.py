"""``pipeline_split="trace"``: stages cut by ``torch.distributed.pipelining.pipeline`` (torch.export).

Same runs and one-process references as the structural parity tests (fp32, relative 1e-4 per step),
plus: the traced stages train the LightningModule's own parameters under their original names (so
a checkpoint written with the traced split resumes with the structural one), and a model
``torch.export`` cannot trace is refused with a message naming the structural split and the hook.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from picotron_lightning.testing import run_ranks
from tests.parity import RTOL, make_data, max_relative_diff
from tests.pipeline.pp_models import BUILDERS, TinyGPT, fit, reference
from tests.pipeline.pp_runs import reference_model, reference_val_loss, run

STEPS = 8
MICRO = 4
CKPT = "epoch=3-step=4.ckpt"
TRACE = {"pipeline_parallel_size": 2, "pipeline_split": "trace"}


class BranchyGPT(TinyGPT):
    """Control flow on a tensor's value: torch.export cannot trace it."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = super().forward(idx)
        return out if out.sum() > 0 else -out


def _world2(rank: int, world: int, ckpt_dir: str) -> dict:
    data, val = make_data(64), make_data(14, seed=7)
    small = make_data(MICRO)
    out = {
        "1f1b": run(world, data, MICRO, STEPS, TRACE, val_data=val),
        "interleaved": run(world, data, MICRO, STEPS, {**TRACE, "pipeline_schedule": "interleaved_1f1b"}),
        "zbv": run(world, data, MICRO, STEPS, {**TRACE, "pipeline_schedule": "zbv"}),
        "gpt": fit(world, "gpt", data, MICRO, STEPS, TRACE),
        "hf_llama": fit(world, "hf_llama", data, MICRO, STEPS, TRACE),
        "ckpt": run(world, small, MICRO, 6, TRACE, ckpt_dir=ckpt_dir),
    }
    # The traced pp=2 checkpoint continued with the structural split at pp=2.
    out["resume_structural"] = run(world, small, MICRO, 6, {"pipeline_parallel_size": 2},
                                   resume_from=f"{ckpt_dir}/{CKPT}")
    BUILDERS["branchy"] = BranchyGPT
    try:
        fit(world, "branchy", data, MICRO, 1, TRACE)
        out["untraceable"] = None
    except Exception as err:  # noqa: BLE001 - the message is the result
        out["untraceable"] = f"{type(err).__name__}: {err}"
    return out


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> list[dict]:
    return run_ranks(_world2, 2, str(tmp_path_factory.mktemp("pp_trace_ckpt")), timeout=900)


@pytest.mark.slow
def test_traced_llama_1f1b_matches_one_process(world2):
    ref = reference_model(make_data(64), STEPS, MICRO)[1]
    for rank in world2:
        assert len(rank["1f1b"]["losses"]) == STEPS
        diff = max_relative_diff(rank["1f1b"]["losses"], ref)
        print(f"trace llama pp=2 1f1b: max relative diff {diff:.2e}")
        assert diff <= RTOL, (rank["1f1b"]["losses"], ref)
        assert abs(rank["1f1b"]["logged_train_loss"] - ref[-1]) / ref[-1] <= RTOL


@pytest.mark.parametrize("name", ["interleaved", "zbv"])
@pytest.mark.slow
def test_traced_multi_stage_schedules_match_one_process(world2, name):
    ref = reference_model(make_data(64), STEPS, MICRO)[1]
    for rank in world2:
        assert max_relative_diff(rank[name]["losses"], ref) <= RTOL, (rank[name]["losses"], ref)


@pytest.mark.slow
def test_traced_validation_loss_equals_one_process(world2):
    module, _ = reference_model(make_data(64), STEPS, MICRO)
    ref = reference_val_loss(module, make_data(14, seed=7), MICRO)
    for rank in world2:
        assert abs(rank["1f1b"]["val_loss"] - ref) / ref <= RTOL, (rank["1f1b"]["val_loss"], ref)


@pytest.mark.slow
def test_traced_stages_hold_the_original_parameters(world2):
    first, last = (r["1f1b"]["params"] for r in world2)
    assert not set(first) & set(last)
    assert "model.embed_tokens.weight" in first and "model.layers.1.mlp.up_proj.weight" in first
    assert "model.layers.2.mlp.up_proj.weight" in last and "model.output.weight" in last
    assert all(all(r["1f1b"]["grads_seen"]) for r in world2)


@pytest.mark.parametrize("build", ["gpt", "hf_llama"])
@pytest.mark.slow
def test_traced_other_models_match_one_process(world2, build):
    ref = reference(build, make_data(64), STEPS, MICRO)
    for rank in world2:
        diff = max_relative_diff(rank[build]["losses"], ref)
        print(f"trace {build} pp=2 1f1b: max relative diff {diff:.2e}")
        assert diff <= RTOL, (rank[build]["losses"], ref)
        assert abs(rank[build]["logged"] - ref[-1]) / ref[-1] <= RTOL


@pytest.mark.slow
def test_traced_checkpoint_resumes_with_structural_split(world2):
    ref = reference_model(make_data(MICRO), 6, MICRO)[1]
    assert max_relative_diff(world2[0]["ckpt"]["losses"], ref) <= RTOL
    for rank in world2:
        assert max_relative_diff(rank["resume_structural"]["losses"], ref[4:]) <= RTOL, (
            rank["resume_structural"]["losses"], ref[4:])


@pytest.mark.slow
def test_untraceable_model_names_the_structural_split(world2):
    for rank in world2:
        message = rank["untraceable"]
        assert message is not None, "the untraceable model trained"
        assert "pipeline_split='trace' could not split BranchyGPT" in message
        assert 'pipeline_split="structural"' in message and "configure_pipeline_stages()" in message


def _world4(rank: int, world: int) -> dict:
    data = make_data(64)
    return {
        "auto": run(world, data, MICRO, STEPS, TRACE),
        "gpt_ddp": fit(world, "gpt", data, MICRO, STEPS, {**TRACE, "data_parallel_mode": "ddp"}),
    }


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    return run_ranks(_world4, 4, timeout=900)


@pytest.mark.slow
def test_traced_pp2_dp2_matches_one_process(world4):
    """pp=2 x dp=2 on 4 ranks: the traced stages as replicas train the one-process model on the global batch."""
    # rank = pp * dp_size + dp: ranks 0 and 1 are the two replicas' first stage.
    for name, ref in (("auto", reference_model(make_data(64), STEPS, 2 * MICRO)[1]),
                      ("gpt_ddp", reference("gpt", make_data(64), STEPS, 2 * MICRO))):
        replica_mean = [(a + b) / 2 for a, b in zip(world4[0][name]["losses"], world4[1][name]["losses"], strict=True)]
        diff = max_relative_diff(replica_mean, ref)
        print(f"trace {name} pp=2 x dp=2: max relative diff {diff:.2e}")
        assert diff <= RTOL, (replica_mean, ref)
        for i, r in enumerate(world4):  # both stages of a replica report that replica's loss
            assert max_relative_diff(r[name]["losses"], world4[i % 2][name]["losses"]) <= RTOL


def test_trace_accepts_the_layouts_it_composes_with():
    """Before any process group: replicas, FSDP2/HSDP, tp and 3D, and MoE layers pass the traced split's check."""
    from picotron_lightning.models.llama import Llama, llama_config
    from picotron_lightning.parallel.pipeline_parallel import check_traceable_layout
    from picotron_lightning.parallel.pipeline_parallel.traced_sharding import check_traced_sharding
    from picotron_lightning.topology import ParallelLayout

    dense = nn.Linear(2, 2)
    replicas = ParallelLayout(pipeline_parallel_size=2).resolve(4)
    check_traceable_layout(dense, replicas)  # dp=2: accepted
    for mode in ("auto", "ddp", "fsdp", "hsdp"):  # replicas or FSDP2 over the traced stages (test_pp_trace_fsdp.py)
        check_traced_sharding(replicas, mode, "1f1b")
    check_traceable_layout(dense, ParallelLayout(pipeline_parallel_size=2, tensor_parallel_size=2).resolve(4))
    three_d = ParallelLayout(pipeline_parallel_size=2, tensor_parallel_size=2).resolve(8)
    check_traceable_layout(dense, three_d)
    check_traced_sharding(three_d, "ddp", "1f1b")
    check_traced_sharding(three_d, "fsdp", "1f1b")
    # MoE layers are traced as opaque ops (tests/pipeline/test_pp_trace_moe.py).
    check_traceable_layout(Llama(llama_config("tiny-moe", num_layers=2)), ParallelLayout(pipeline_parallel_size=2)
                           .resolve(2))


def test_trace_allows_ddp_under_pipeline_parallelism():
    from picotron_lightning.options import Picotron3DOptions

    options = Picotron3DOptions.from_arguments(
        {"pipeline_parallel_size": 2, "pipeline_split": "trace", "data_parallel_mode": "ddp"})
    assert options.data_parallel.mode == "ddp"
    with pytest.raises(ValueError, match="data_parallel_mode='ddp' is not supported with pipeline_parallel_size > 1"):
        Picotron3DOptions.from_arguments({"pipeline_parallel_size": 2, "data_parallel_mode": "ddp"})


# ---------------------------------------------------------------------- tensor parallelism in the traced stages
TRACE_TP = {**TRACE, "tensor_parallel_size": 2}


def _world4_tp(rank: int, world: int, ckpt_dir: str) -> dict:
    data = make_data(64)
    out = {
        "llama": run(world, data, MICRO, STEPS, TRACE_TP, clip=0.05),
        "two_stream": fit(world, "two_stream", data, MICRO, STEPS, TRACE_TP),
        "interleaved": run(world, data, MICRO, STEPS, {**TRACE_TP, "pipeline_schedule": "interleaved_1f1b"}),
        "hf_llama": fit(world, "hf_llama", data, MICRO, STEPS, TRACE_TP),
        "ckpt": run(world, make_data(MICRO), MICRO, 6, TRACE_TP, ckpt_dir=ckpt_dir),
    }
    # The traced pp=2 x tp=2 checkpoint continued with the structural split at the same layout.
    out["resume_structural"] = run(world, make_data(MICRO), MICRO, 6,
                                   {"pipeline_parallel_size": 2, "tensor_parallel_size": 2},
                                   resume_from=f"{ckpt_dir}/{CKPT}")
    return out


@pytest.fixture(scope="module")
def world4_tp(tmp_path_factory) -> list[dict]:
    return run_ranks(_world4_tp, 4, str(tmp_path_factory.mktemp("pp_trace_tp_ckpt")), timeout=1200)


def _assert_tp_parity(ranks: list[dict], refs: dict[str, list[float]]) -> None:
    """Every rank's losses of each named pp=2 x tp=2 run within RTOL of its one-process reference."""
    for name, ref in refs.items():
        for r in ranks:
            diff = max_relative_diff(r[name]["losses"], ref)
            print(f"trace {name} pp=2 x tp=2: max relative diff {diff:.2e}")
            assert diff <= RTOL, (name, r[name]["losses"], ref)


@pytest.mark.slow
def test_traced_pp2_tp2_matches_one_process(world4_tp):
    """pp=2 x tp=2 on 4 ranks: the traced stages run this rank's shards between the Megatron operators.

    The Llama run clips at 0.05 (below the gradient norm of every step): the clipped step equals one
    process's only if the norm counts each shard once and the replicated parameters once.
    """
    refs = {"llama": reference_model(make_data(64), STEPS, MICRO, clip=0.05)[1],
            "two_stream": reference("two_stream", make_data(64), STEPS, MICRO)}
    _assert_tp_parity(world4_tp, refs)
    # The sharded linears are DTensors with the model's global shapes: names and state dict as one process.
    assert "model.layers.1.mlp.up_proj.weight" in world4_tp[0]["llama"]["params"]
    assert all(all(r["llama"]["grads_seen"]) for r in world4_tp)


@pytest.mark.slow
def test_traced_pp2_tp2_other_schedules_models_and_resume(world4_tp):
    """The traced tp stages under the interleaved schedule (two stages per rank), on a Hugging Face Llama
    (its own naming), and a traced pp=2 x tp=2 checkpoint resumed by the structural split at that layout."""
    checks = {"interleaved": reference_model(make_data(64), STEPS, MICRO)[1],
              "hf_llama": reference("hf_llama", make_data(64), STEPS, MICRO)}
    _assert_tp_parity(world4_tp, checks)
    ref = reference_model(make_data(MICRO), 6, MICRO)[1]
    for r in world4_tp:
        assert max_relative_diff(r["ckpt"]["losses"], ref) <= RTOL, (r["ckpt"]["losses"], ref)
        diff = max_relative_diff(r["resume_structural"]["losses"], ref[4:])
        print(f"trace pp=2 x tp=2 checkpoint resumed structural: max relative diff {diff:.2e}")
        assert diff <= RTOL, (r["resume_structural"]["losses"], ref[4:])


def _world8(rank: int, world: int) -> dict:
    data = make_data(64)
    return {
        "llama": run(world, data, MICRO, STEPS, TRACE_TP, clip=0.05),
        "two_stream": fit(world, "two_stream", data, MICRO, STEPS, {**TRACE_TP, "data_parallel_mode": "ddp"}),
    }


@pytest.fixture(scope="module")
def world8() -> list[dict]:
    return run_ranks(_world8, 8, timeout=1500)


@pytest.mark.slow
def test_traced_pp2_dp2_tp2_matches_one_process(world8):
    """pp=2 x dp=2 x tp=2 on 8 ranks (rank = pp * 4 + dp * 2 + tp): replicas of tensor-parallel stages."""
    refs = {"llama": reference_model(make_data(64), STEPS, 2 * MICRO, clip=0.05)[1],
            "two_stream": reference("two_stream", make_data(64), STEPS, 2 * MICRO)}
    for name, ref in refs.items():
        replica_mean = [(a + b) / 2 for a, b in zip(world8[0][name]["losses"], world8[2][name]["losses"], strict=True)]
        diff = max_relative_diff(replica_mean, ref)
        print(f"trace {name} pp=2 x dp=2 x tp=2: max relative diff {diff:.2e}")
        assert diff <= RTOL, (name, replica_mean, ref)


def test_trace_refuses_sequence_and_loss_parallelism():
    from picotron_lightning.parallel.pipeline_parallel import PipelineSplitError, check_traceable_layout
    from picotron_lightning.parallel.tensor_parallel import TensorParallelOptions
    from picotron_lightning.topology import ParallelLayout

    tensor = ParallelLayout(pipeline_parallel_size=2, tensor_parallel_size=2).resolve(4)
    check_traceable_layout(nn.Linear(2, 2), tensor, tensor_parallel=TensorParallelOptions())  # "auto": accepted
    with pytest.raises(PipelineSplitError, match="tensor_parallel_size=2 does not support sequence_parallel=True.*"
                                                 "sequence_parallel=False or 'auto'"):
        check_traceable_layout(nn.Linear(2, 2), tensor, tensor_parallel=TensorParallelOptions(sequence_parallel=True))
    with pytest.raises(PipelineSplitError, match="does not support loss_parallel=True.*Use loss_parallel=False"):
        check_traceable_layout(nn.Linear(2, 2), tensor, tensor_parallel=TensorParallelOptions(loss_parallel=True))


def _traced_sp(rank: int, world: int) -> dict:
    try:
        run(world, make_data(16), MICRO, 1, {**TRACE_TP, "sequence_parallel": True})
        return {"error": None}
    except Exception as err:  # noqa: BLE001 - the message, and whether a process group existed, is the result
        return {"error": f"{type(err).__name__}: {err}", "group": torch.distributed.is_initialized()}


@pytest.mark.slow
def test_traced_sequence_parallel_is_refused_before_any_process_group():
    for rank in run_ranks(_traced_sp, 4, timeout=600):
        assert rank["error"] is not None, "pp=2 x tp=2 with the traced split and sequence_parallel=True trained"
        assert "pipeline_split='trace' with tensor_parallel_size=2 does not support sequence_parallel=True" in \
            rank["error"]
        assert not rank["group"], "the refusal came after the process group was created"
