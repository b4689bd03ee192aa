"""Pipeline parallelism inside ``Trainer.fit`` reproduces one process (fp32, relative 1e-4 per step).

One spawn per world size runs every scenario of that size in sequence (starting processes costs
more than the tiny runs). The models are unchanged LightningModules: the reference Llama, a tiny
Hugging Face ``LlamaForCausalLM`` and a plain-PyTorch GPT written for these tests.
"""

from __future__ import annotations

import pytest
import torch

from picotron_lightning.testing import run_ranks
from tests.parity import RTOL, make_data, max_relative_diff, step_means
from tests.pipeline.pp_models import fit, reference
from tests.pipeline.pp_runs import predict, reference_model, reference_val_loss, run

# Multi-process (real gloo ranks): the slow tier.
pytestmark = pytest.mark.slow

STEPS = 8
MICRO = 4  # local batch: 4 microbatches by default at pp=2 and pp=4
CKPT = "epoch=3-step=4.ckpt"


def _world2(rank: int, world: int, ckpt_dir: str) -> dict:
    data, val = make_data(64), make_data(14, seed=7)  # 14: the last validation batch is short
    pp2 = {"pipeline_parallel_size": 2}
    small = make_data(MICRO)  # one batch per epoch: a checkpoint at every step
    out = {
        "1f1b": run(world, data, MICRO, STEPS, pp2, val_data=val),
        "gpipe": run(world, data, MICRO, STEPS, {**pp2, "pipeline_schedule": "gpipe"}),
        "interleaved": run(world, data, MICRO, STEPS, {**pp2, "pipeline_schedule": "interleaved_1f1b"}),
        "zero_bubble": run(world, data, MICRO, STEPS, {**pp2, "pipeline_schedule": "zbv"}),
        "accum2": run(world, data, MICRO, STEPS, pp2, accumulate=2),
        "clip": run(world, data, MICRO, STEPS, pp2, clip=0.05),
        "hf_llama": fit(world, "hf_llama", data, MICRO, STEPS, pp2),
        "gpt": fit(world, "gpt", data, MICRO, STEPS, pp2),
        "predict": predict(world, data[:8], MICRO, pp2),
        "ckpt_pp2": run(world, small, MICRO, 6, pp2, ckpt_dir=ckpt_dir),
    }
    # The pp=2 checkpoint continued without pipeline parallelism (pp=1, dp=2, same global batch).
    out["resume_pp1"] = run(world, small, MICRO // 2, 6, {"data_parallel_mode": "fsdp"},
                            resume_from=f"{ckpt_dir}/{CKPT}")
    return out


def _world4(rank: int, world: int, ckpt_dir: str) -> dict:
    data = make_data(64)
    small = make_data(MICRO)
    return {
        "pp4_1f1b": run(world, data, MICRO, STEPS, {"pipeline_parallel_size": 4}),
        "pp4_gpipe": run(world, data, MICRO, STEPS, {"pipeline_parallel_size": 4, "pipeline_schedule": "gpipe"}),
        "pp2_dp2": run(world, data, MICRO, STEPS, {"pipeline_parallel_size": 2, "data_parallel_mode": "fsdp"}),
        # Two stages a rank, tp=2 inside each with sequence parallelism ("auto"): each stage splits and gathers
        # the sequence itself (one region over a rank's blocks 0 and 2 trained up to 2.0e-2 off one process).
        "pp2_tp2_interleaved": run(world, data, MICRO, STEPS, {
            "pipeline_parallel_size": 2, "tensor_parallel_size": 2, "pipeline_schedule": "interleaved_1f1b"}),
        # The zero-bubble input half detaches the stage's outputs in place; under tp they were DTensor views and the
        # first backward failed ("Can't detach views in-place") before the stage copied them.
        "pp2_tp2_zero_bubble": run(world, data, MICRO, STEPS, {
            "pipeline_parallel_size": 2, "tensor_parallel_size": 2, "pipeline_schedule": "zero_bubble"}),
        "resume_pp4": run(world, small, MICRO, 6, {"pipeline_parallel_size": 4}, resume_from=f"{ckpt_dir}/{CKPT}"),
    }


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pp_ckpt"))


@pytest.fixture(scope="module")
def world2(ckpt_dir) -> list[dict]:
    return run_ranks(_world2, 2, ckpt_dir, timeout=900)


@pytest.fixture(scope="module")
def world4(world2, ckpt_dir) -> list[dict]:  # needs the pp=2 checkpoint
    return run_ranks(_world4, 4, ckpt_dir, timeout=900)


def _ref(steps: int = STEPS, global_batch: int = MICRO) -> list[float]:
    return reference_model(make_data(64), steps, global_batch)[1]


@pytest.mark.parametrize("name", ["1f1b", "gpipe", "interleaved", "zero_bubble", "clip"])
def test_pp2_matches_one_process(world2, name):
    if name == "clip":
        from tests.parity import reference_losses

        ref = reference_losses(make_data(64), STEPS, MICRO, config={"num_layers": 4}, clip=0.05)
        assert min(ref["norms"]) > 0.05, "the clip value must bind for this test to mean anything"
        assert max_relative_diff(world2[0][name]["losses"], _ref()) > 10 * RTOL
        ref = ref["losses"]
    else:
        ref = _ref()
    for rank in world2:  # every stage reports the replica's loss (broadcast from the last stage)
        assert len(rank[name]["losses"]) == STEPS
        assert max_relative_diff(rank[name]["losses"], ref) <= RTOL, (rank[name]["losses"], ref)


def test_stages_hold_disjoint_halves_under_original_names(world2):
    first, last = (r["1f1b"]["params"] for r in world2)
    assert not set(first) & set(last)
    assert "model.embed_tokens.weight" in first and "model.layers.1.mlp.up_proj.weight" in first
    assert "model.layers.2.mlp.up_proj.weight" in last and "model.output.weight" in last


def test_backward_is_run_once_and_gradients_reach_lightning(world2):
    # on_after_backward sees every parameter's gradient (the schedule's, not a second backward's)
    assert all(all(r["1f1b"]["grads_seen"]) for r in world2)


def test_validation_loss_equals_one_process(world2):
    module, _ = reference_model(make_data(64), STEPS, MICRO)
    ref = reference_val_loss(module, make_data(14, seed=7), MICRO)
    for rank in world2:
        assert abs(rank["1f1b"]["val_loss"] - ref) / ref <= RTOL, (rank["1f1b"]["val_loss"], ref)


def test_logged_training_loss_is_the_replicas(world2):
    ref = _ref()
    for rank in world2:
        assert abs(rank["1f1b"]["logged_train_loss"] - ref[-1]) / ref[-1] <= RTOL


def test_gradient_accumulation(world2):
    ref = _ref(global_batch=2 * MICRO)
    got = step_means(world2[0]["accum2"]["losses"], 2)
    assert max_relative_diff(got, ref) <= RTOL, (got, ref)


@pytest.mark.parametrize("name, build", [("hf_llama", "hf_llama"), ("gpt", "gpt")])
def test_other_models_match_one_process(world2, name, build):
    ref = reference(build, make_data(64), STEPS, MICRO)
    for rank in world2:
        assert max_relative_diff(rank[name]["losses"], ref) <= RTOL, (rank[name]["losses"], ref)
        assert abs(rank[name]["logged"] - ref[-1]) / ref[-1] <= RTOL


def test_predict_returns_the_models_logits(world2):
    from tests.parity import make_module

    module = make_module(config={"num_layers": 4})
    with torch.no_grad():
        expected = module(make_data(64)[:8, :-1])
    for rank in world2:
        assert torch.allclose(rank["predict"], expected, rtol=1e-4, atol=1e-5)


def test_bubble_is_measured(world2):
    for rank in world2:
        bubble = rank["1f1b"]["bubble"]
        assert isinstance(bubble, float) and 0.0 <= bubble < 1.0


def test_pp2_checkpoint_resumes_at_pp1(world2):
    ref = reference_model(make_data(MICRO), 6, MICRO)[1]
    assert max_relative_diff(world2[0]["ckpt_pp2"]["losses"], ref) <= RTOL
    resumed = [sum(v) / 2 for v in zip(*(r["resume_pp1"]["losses"] for r in world2), strict=True)]
    assert len(resumed) == 2
    assert max_relative_diff(resumed, ref[4:]) <= RTOL, (resumed, ref[4:])


@pytest.mark.parametrize("name", ["pp4_1f1b", "pp4_gpipe", "pp2_dp2", "pp2_tp2_interleaved", "pp2_tp2_zero_bubble"])
def test_pp4_and_pp2_dp2_match_one_process(world4, name):
    ref = _ref(global_batch=2 * MICRO if name == "pp2_dp2" else MICRO)
    got = world4[0][name]["losses"]
    if name == "pp2_dp2":  # the replica mean: data-parallel ranks 0 and 1 of stage 0 are global ranks 0, 1
        got = [(a + b) / 2 for a, b in zip(world4[0][name]["losses"], world4[1][name]["losses"], strict=True)]
    assert max_relative_diff(got, ref) <= RTOL, (got, ref)


def test_pp2_checkpoint_resumes_at_pp4(world4):
    ref = reference_model(make_data(MICRO), 6, MICRO)[1]
    for rank in world4:
        assert max_relative_diff(rank["resume_pp4"]["losses"], ref[4:]) <= RTOL
