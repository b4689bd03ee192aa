"""Tied input/output embeddings across pipeline stages reproduce one process (fp32, relative 1e-4 per step).

The first stage holds the embedding, the last the head, each with its own copy of the one tied
weight; the copies' gradients are summed over the pair of ranks before every optimizer step
(``parallel/pipeline_parallel/tied.py``). Models: the reference Llama with ``tie_embeddings=True``
and a tiny Hugging Face ``LlamaForCausalLM`` with ``tie_word_embeddings=True``. Checkpoints move
between pipeline sizes in both directions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from picotron_lightning.testing import run_ranks
from tests.parity import RTOL, make_data, max_relative_diff
from tests.pipeline.pp_models import fit, reference
from tests.pipeline.pp_runs import reference_model, run

# Multi-process (real gloo ranks): the slow tier.
pytestmark = pytest.mark.slow

STEPS = 6
MICRO = 4
TIED = {"tie_embeddings": True}
PP2 = {"pipeline_parallel_size": 2}
CKPT = "epoch=3-step=4.ckpt"  # one batch per epoch: a checkpoint after every step


def _world2(rank: int, world: int, ckpt_dir: str) -> dict:
    data, small = make_data(64), make_data(MICRO)
    pp2_dir, pp1_dir = f"{ckpt_dir}/pp2", f"{ckpt_dir}/pp1"
    fsdp = {"data_parallel_mode": "fsdp"}
    return {
        "pp2": run(world, data, MICRO, STEPS, PP2, config=TIED),
        "pp2_clip": run(world, data, MICRO, STEPS, PP2, clip=0.05, config=TIED),
        "pp2_interleaved": run(world, data, MICRO, STEPS, {**PP2, "pipeline_schedule": "interleaved_1f1b"},
                               config=TIED),
        "pp2_accum2": run(world, data, MICRO, STEPS, PP2, accumulate=2, config=TIED),
        "hf_pp2": fit(world, "hf_llama_tied", data, MICRO, STEPS, PP2),
        # pp=2 -> pp=1 (dp=2, the same global batch), and pp=1 (dp=2) -> pp=2.
        "ckpt_pp2": run(world, small, MICRO, 6, PP2, ckpt_dir=pp2_dir, config=TIED),
        "resume_pp1": run(world, small, MICRO // 2, 6, fsdp, resume_from=f"{pp2_dir}/{CKPT}", config=TIED),
        "ckpt_pp1": run(world, small, MICRO // 2, 6, fsdp, ckpt_dir=pp1_dir, config=TIED),
        "resume_pp2": run(world, small, MICRO, 6, PP2, resume_from=f"{pp1_dir}/{CKPT}", config=TIED),
    }


def _world4(rank: int, world: int, ckpt_dir: str) -> dict:
    data, small = make_data(64), make_data(MICRO)
    tp2 = {**PP2, "tensor_parallel_size": 2}
    return {
        "pp2_tp2": run(world, data, MICRO, STEPS, tp2, config=TIED),
        "hf_pp2_tp2": fit(world, "hf_llama_tied", data, MICRO, STEPS, tp2),
        "pp2_dp2": run(world, data, MICRO, STEPS, {**PP2, "data_parallel_mode": "fsdp"}, clip=0.05, config=TIED),
        # Stages 1 and 2 hold neither end of the tied weight.
        "resume_pp4": run(world, small, MICRO, 6, {"pipeline_parallel_size": 4},
                          resume_from=f"{ckpt_dir}/pp2/{CKPT}", config=TIED),
    }


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pp_tied_ckpt"))


@pytest.fixture(scope="module")
def world2(ckpt_dir) -> list[dict]:
    return run_ranks(_world2, 2, ckpt_dir, timeout=900)


@pytest.fixture(scope="module")
def world4(world2, ckpt_dir) -> list[dict]:  # needs the pp=2 checkpoint
    return run_ranks(_world4, 4, ckpt_dir, timeout=900)


def _ref(global_batch: int = MICRO, clip: float | None = None, steps: int = STEPS, data_size: int = 64) -> list[float]:
    return reference_model(make_data(data_size), steps, global_batch, config=TIED, clip=clip)[1]


def _mean(*runs: list[float]) -> list[float]:
    return [sum(v) / len(v) for v in zip(*runs, strict=True)]


def test_reference_model_is_tied():
    module, _ = reference_model(make_data(MICRO), 1, MICRO, config=TIED)
    assert module.model.output.weight is module.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["pp2", "pp2_interleaved"])
def test_tied_pp2_matches_one_process(world2, name):
    ref = _ref()
    for rank in world2:
        assert max_relative_diff(rank[name]["losses"], ref) <= RTOL, (rank[name]["losses"], ref)


def test_tied_pp2_clipping_counts_the_shared_weight_once(world2):
    ref = reference_model(make_data(64), STEPS, MICRO, config=TIED, clip=0.05)[1]
    assert max_relative_diff(ref, _ref()) > 10 * RTOL, "the clip value must bind for this test to mean anything"
    for rank in world2:
        assert max_relative_diff(rank["pp2_clip"]["losses"], ref) <= RTOL, (rank["pp2_clip"]["losses"], ref)


def test_tied_pp2_gradient_accumulation(world2):
    got = world2[0]["pp2_accum2"]["losses"]
    got = [(got[i] + got[i + 1]) / 2 for i in range(0, len(got), 2)]
    ref = _ref(global_batch=2 * MICRO)
    assert max_relative_diff(got, ref) <= RTOL, (got, ref)


def test_tied_hf_llama_pp2_matches_one_process(world2):
    ref = reference("hf_llama_tied", make_data(64), STEPS, MICRO)
    for rank in world2:
        assert max_relative_diff(rank["hf_pp2"]["losses"], ref) <= RTOL, (rank["hf_pp2"]["losses"], ref)


def test_tied_checkpoints_resume_at_another_pp(world2):
    ref = _ref(steps=6, data_size=MICRO)
    assert max_relative_diff(world2[0]["ckpt_pp2"]["losses"], ref) <= RTOL
    resumed_pp1 = _mean(*(r["resume_pp1"]["losses"] for r in world2))  # two data-parallel halves
    assert len(resumed_pp1) == 2 and max_relative_diff(resumed_pp1, ref[4:]) <= RTOL, (resumed_pp1, ref[4:])
    saved_pp1 = _mean(*(r["ckpt_pp1"]["losses"] for r in world2))
    assert max_relative_diff(saved_pp1, ref) <= RTOL
    for rank in world2:
        got = rank["resume_pp2"]["losses"]
        assert len(got) == 2 and max_relative_diff(got, ref[4:]) <= RTOL, (got, ref[4:])


def test_tied_checkpoint_has_the_one_process_keys_and_one_value(world2, ckpt_dir):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    keys = {pp: set(FileSystemReader(f"{ckpt_dir}/{pp}/{CKPT}").read_metadata().state_dict_metadata)
            for pp in ("pp1", "pp2")}
    assert keys["pp2"] == keys["pp1"]
    out = Path(ckpt_dir) / "pp2.pt"
    dcp_to_torch_save(f"{ckpt_dir}/pp2/{CKPT}", out)
    model = torch.load(out, weights_only=False)["model"]
    assert torch.equal(model["model.embed_tokens.weight"], model["model.output.weight"])


def test_tied_pp2_tp2_matches_one_process(world4):
    ref = _ref()
    hf_ref = reference("hf_llama_tied", make_data(64), STEPS, MICRO)
    for rank in world4:
        assert max_relative_diff(rank["pp2_tp2"]["losses"], ref) <= RTOL, (rank["pp2_tp2"]["losses"], ref)
        assert max_relative_diff(rank["hf_pp2_tp2"]["losses"], hf_ref) <= RTOL, (rank["hf_pp2_tp2"]["losses"], hf_ref)


def test_tied_pp2_fsdp2_matches_one_process(world4):
    ref = _ref(global_batch=2 * MICRO, clip=0.05)
    # rank = pp * dp + dp_index at tp=1: global ranks 0 and 1 are the two replicas' first stage.
    got = _mean(world4[0]["pp2_dp2"]["losses"], world4[1]["pp2_dp2"]["losses"])
    assert max_relative_diff(got, ref) <= RTOL, (got, ref)


def test_tied_pp2_checkpoint_resumes_at_pp4(world4):
    ref = _ref(steps=6, data_size=MICRO)
    for rank in world4:
        assert max_relative_diff(rank["resume_pp4"]["losses"], ref[4:]) <= RTOL
