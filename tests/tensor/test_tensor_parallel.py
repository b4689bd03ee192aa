"""Tensor parallelism trains unchanged models to the same losses as one process (fp32, 1e-4 per step).

One spawn per world size runs all of its scenarios (process start-up dominates on 2 cores).
Every scenario also returns probes (parameter share held per rank, the plan's source, the local
shape a norm sees, the type of the logits) so that a run which silently fell back to no
sharding fails here instead of passing on parity alone.
"""

from __future__ import annotations

import time

import pytest

from picotron_lightning.testing import run_ranks
from tests.parity import fabric_run, make_data, max_relative_diff, mean_over_ranks, reference_losses
from tests.tensor.tp_runs import RTOL, fit, reference, refusal

# Multi-process (real gloo ranks): the slow tier.
pytestmark = pytest.mark.slow

STEPS = 8
MICRO = 4
SEQ = 16


def _world2(rank: int, world: int, ckpt_dir: str) -> dict:
    data = make_data(64)
    tp2 = {"tensor_parallel_size": 2}
    out = {
        "llama_sp": fit(world, "llama", data, MICRO, STEPS, tp2),
        # Sequence parallel off, and (one run for both, to save a start-up) loss parallel on.
        "llama_nosp": fit(world, "llama", data, MICRO, STEPS, {**tp2, "sequence_parallel": False,
                                                               "loss_parallel": True}),
        "llama_clip": fit(world, "llama", data, MICRO, STEPS, tp2, clip=0.05),
        "fabric": fabric_run(world, data, MICRO, STEPS, tp2),
        "hf": fit(world, "hf", data, MICRO, STEPS, tp2),
        "gpt": fit(world, "gpt", data, MICRO, STEPS, tp2),
        "gpt_fused": refusal(world, "gpt_fused", tp2),
        "gpt_hardcoded": refusal(world, "gpt_hardcoded", tp2),
    }
    # One step per epoch and a checkpoint at each epoch end, to be resumed at tp=4.
    out["ckpt_run"] = fit(world, "llama_mha", make_data(MICRO), MICRO, 6, tp2, ckpt_dir=ckpt_dir)
    return out


def _world4(rank: int, world: int, ckpt_dir: str) -> dict:
    data = make_data(64)
    return {
        "llama_tp4": fit(world, "llama_mha", data, MICRO, STEPS, {"tensor_parallel_size": 4}),
        "llama_tp2_dp2": fit(world, "llama", data, MICRO // 2, STEPS,
                             {"tensor_parallel_size": 2, "data_parallel_mode": "fsdp"}),
        "resumed_tp4": fit(world, "llama_mha", make_data(MICRO), MICRO, 6, {"tensor_parallel_size": 4},
                           resume_from=f"{ckpt_dir}/epoch=3-step=4.ckpt"),
    }


def _world3(rank: int, world: int) -> dict:
    start = time.monotonic()
    message = refusal(world, "llama", {"tensor_parallel_size": 3})
    return {"message": message, "seconds": time.monotonic() - start}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tp_ckpt"))


@pytest.fixture(scope="module")
def world2(ckpt_dir) -> list[dict]:
    return run_ranks(_world2, 2, ckpt_dir, timeout=600)


@pytest.fixture(scope="module")
def world4(world2, ckpt_dir) -> list[dict]:  # resumes the world-2 checkpoint
    return run_ranks(_world4, 4, ckpt_dir, timeout=600)


def _steps(results: list[dict], name: str) -> list[float]:
    return mean_over_ranks([r[name]["losses"] for r in results])


@pytest.fixture(scope="module")
def ref_llama() -> dict:
    return reference("llama", make_data(64), STEPS, MICRO, clip=0.05)


def _assert_parity(results: list[dict], name: str, ref: list[float]) -> None:
    got = _steps(results, name)
    assert len(got) == STEPS
    assert max_relative_diff(got, ref) <= RTOL, (name, got, ref)
    # Every tp rank of a replica reports the same loss.
    assert results[0][name]["losses"] == results[1][name]["losses"]


@pytest.mark.parametrize("name", ["llama_sp", "llama_nosp"])
def test_reference_llama_tp2_matches_one_process(world2, name):
    ref = reference("llama", make_data(64), STEPS, MICRO)["losses"]
    _assert_parity(world2, name, ref)
    probe = world2[0][name]
    assert probe["source"] == "reference"
    # Per-rank parameters: a bit over half (norm weights stay whole).
    assert probe["local_numel"] <= 0.55 * probe["global_numel"]


def test_sequence_parallel_is_on_by_default_and_splits_the_sequence(world2):
    on, off = world2[0]["llama_sp"], world2[0]["llama_nosp"]
    assert on["sequence_parallel"] is True and off["sequence_parallel"] is False
    assert on["norm_input_shape"][1] == SEQ // 2
    assert off["norm_input_shape"][1] == SEQ


def test_loss_parallel_keeps_logits_sharded(world2):
    assert world2[0]["llama_nosp"]["logits_type"] == "DTensor"
    assert world2[0]["llama_sp"]["logits_type"] == "Tensor"  # gathered by default


def test_fabric_tp2_matches_one_process(world2):
    ref = reference_losses(make_data(64), STEPS, global_batch=MICRO, shuffle=False)["losses"]
    _assert_parity(world2, "fabric", ref)


def test_clipping_over_tensor_parallel_shards_matches_one_process(world2, ref_llama):
    assert min(ref_llama["norms"]) > 0.05, "the clip value must bind for this test to mean anything"
    _assert_parity(world2, "llama_clip", ref_llama["losses"])
    unclipped = reference("llama", make_data(64), STEPS, MICRO)["losses"]
    assert max_relative_diff(_steps(world2, "llama_clip"), unclipped) > 10 * RTOL


def test_hugging_face_llama_tp2_uses_its_own_plan(world2):
    ref = reference("hf", make_data(64), STEPS, MICRO)["losses"]
    _assert_parity(world2, "hf", ref)
    probe = world2[0]["hf"]
    assert probe["source"] == "huggingface" and probe["sequence_parallel"] is True
    assert probe["styles"]["net.model.layers.0.input_layernorm"] == "norm"
    assert probe["styles"]["net.model.embed_tokens"] == "embedding"
    assert probe["local_numel"] <= 0.55 * probe["global_numel"]


def test_unseen_plain_gpt_is_detected_and_matches_one_process(world2):
    ref = reference("gpt", make_data(64), STEPS, MICRO)["losses"]
    _assert_parity(world2, "gpt", ref)
    probe = world2[0]["gpt"]
    assert probe["source"] == "detected"
    styles = probe["styles"]
    assert {styles[f"net.cells.1.mix.{n}"] for n in "abc"} == {"colwise"}
    assert styles["net.cells.1.mix.back"] == styles["net.cells.1.spread.narrow"] == "rowwise"
    assert styles["net.cells.1.spread.widen"] == "colwise"
    assert styles["net.cells.0.ln_a"] == "norm" and styles["net.unembed"] == "head"


def test_fused_qkv_is_refused_with_a_clear_message(world2):
    message = world2[0]["gpt_fused"]
    assert "fused" in message and "mix.abc" in message, message


def test_hard_coded_head_count_is_caught_by_the_meta_dry_run(world2):
    message = world2[0]["gpt_hardcoded"]
    assert "dry run" in message and "mix" in message and "-1" in message, message


@pytest.mark.parametrize("name, kind", [("llama_tp4", "llama_mha"), ("llama_tp2_dp2", "llama")])
def test_tp4_and_tp2_dp2_match_one_process(world4, name, kind):
    ref = reference(kind, make_data(64), STEPS, MICRO)["losses"]
    got = _steps(world4, name)
    assert max_relative_diff(got, ref) <= RTOL, (got, ref)
    probe = world4[0][name]
    share = 1 / 4  # tp=4, or tp=2 x FSDP over dp=2
    assert probe["local_numel"] <= 1.1 * share * probe["global_numel"]


def test_checkpoint_saved_at_tp2_resumes_at_tp4(world2, world4):
    ref = reference("llama_mha", make_data(MICRO), 6, MICRO)["losses"]
    assert max_relative_diff(_steps(world2, "ckpt_run"), ref) <= RTOL
    resumed = _steps(world4, "resumed_tp4")
    assert len(resumed) == 2
    assert max_relative_diff(resumed, ref[4:]) <= RTOL


def test_tp3_on_four_heads_is_refused_quickly():
    results = run_ranks(_world3, 3, timeout=120)
    message = results[0]["message"]
    assert "tensor_parallel_size=3" in message and "num_attention_heads=4" in message, message
    assert "[1, 2]" in message, message
    assert results[0]["seconds"] < 30
