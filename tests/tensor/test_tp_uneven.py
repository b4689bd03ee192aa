"""Models users bring: sizes tp does not divide, and Hugging Face GPT-2 (``Conv1D``, fused ``c_attn``).

Real gloo ranks, parity with one process (fp32, relative 1e-4 per step): a plain GPT with a prime
vocabulary (97) and an odd MLP width (129) at tp=2 and tp=4, in the Trainer (gathered logits and
loss parallelism) and in Fabric; its checkpoint written at tp=2 and resumed at tp=4; GPT-2 with an
odd vocabulary (101) at tp=2, untied (vocabulary sharded) and tied (GPT-2's default: kept whole).
Probes check the shards really are uneven and the state dict keeps the model's own shapes.
"""

from __future__ import annotations

import pytest

from picotron_lightning.testing import run_ranks, token_data
from tests.parity import max_relative_diff, mean_over_ranks
from tests.tensor.tp_models import GPT2_VOCAB, ODD_FFN, ODD_VOCAB, LMModule, vocab_of
from tests.tensor.tp_runs import RTOL, fabric_fit, fit, reference

pytestmark = pytest.mark.slow

STEPS = 6
MICRO = 4
SEQ = 16


def _data(kind: str, samples: int = 32):  # noqa: ANN202
    return token_data(samples, SEQ, vocab_of(kind))


def _world2(rank: int, world: int, ckpt_dir: str) -> dict:
    tp2 = {"tensor_parallel_size": 2}
    return {
        "odd": fit(world, "gpt_odd", _data("gpt_odd"), MICRO, STEPS, tp2),
        "odd_loss_parallel": fit(world, "gpt_odd", _data("gpt_odd"), MICRO, STEPS, {**tp2, "loss_parallel": True}),
        "odd_fabric": fabric_fit(world, "gpt_odd", _data("gpt_odd"), MICRO, STEPS, tp2, loss_parallel=True),
        "gpt2": fit(world, "gpt2", _data("gpt2"), MICRO, STEPS, tp2),
        "gpt2_tied": fit(world, "gpt2_tied", _data("gpt2"), MICRO, STEPS, tp2),
        # One step per epoch and a checkpoint at each epoch end, resumed at tp=4.
        "odd_ckpt": fit(world, "gpt_odd", _data("gpt_odd", MICRO), MICRO, STEPS, tp2, ckpt_dir=ckpt_dir),
    }


def _world4(rank: int, world: int, ckpt_dir: str) -> dict:
    tp4 = {"tensor_parallel_size": 4}
    tp2_dp2 = {"tensor_parallel_size": 2, "data_parallel_mode": "fsdp"}
    return {
        "odd_tp4": fit(world, "gpt_odd", _data("gpt_odd"), MICRO, STEPS, tp4),
        "odd_fabric_tp4": fabric_fit(world, "gpt_odd", _data("gpt_odd"), MICRO, STEPS, tp4),
        "odd_resumed_tp4": fit(world, "gpt_odd", _data("gpt_odd", MICRO), MICRO, STEPS, tp4,
                               resume_from=f"{ckpt_dir}/epoch=3-step=4.ckpt"),
        # tp=2 x dp=2: FSDP2 shards the uneven and the fused (Conv1D) tensor-parallel parameters further.
        "odd_tp2_dp2": fit(world, "gpt_odd", _data("gpt_odd"), MICRO // 2, STEPS, tp2_dp2),
        "gpt2_tp2_dp2": fit(world, "gpt2", _data("gpt2"), MICRO // 2, STEPS, tp2_dp2),
    }


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tp_uneven_ckpt"))


@pytest.fixture(scope="module")
def world2(ckpt_dir) -> list[dict]:
    return run_ranks(_world2, 2, ckpt_dir, timeout=900)


@pytest.fixture(scope="module")
def world4(world2, ckpt_dir) -> list[dict]:  # resumes the world-2 checkpoint
    return run_ranks(_world4, 4, ckpt_dir, timeout=900)


def _assert_parity(results: list[dict], name: str, kind: str, shuffle: bool = True, tp: int | None = None) -> None:
    got = mean_over_ranks([r[name]["losses"] for r in results])
    ref = reference(kind, _data(kind), STEPS, MICRO, shuffle=shuffle)["losses"]
    assert len(got) == STEPS
    assert max_relative_diff(got, ref) <= RTOL, (name, got, ref)
    tp = tp or len(results)  # the ranks of one tensor-parallel group report the same loss
    assert all(r[name]["losses"] == results[0][name]["losses"] for r in results[:tp]), name


def _one_process_shapes(kind: str) -> dict[str, tuple]:
    return {n: tuple(t.shape) for n, t in LMModule(kind).state_dict().items()}


@pytest.mark.parametrize("name", ["odd", "odd_loss_parallel"])
def test_odd_vocabulary_and_mlp_width_tp2_trainer_matches_one_process(world2, name):
    _assert_parity(world2, name, "gpt_odd")
    first, last = world2[0][name]["local_shapes"], world2[1][name]["local_shapes"]
    # Uneven shards: 97 -> 49 + 48 rows of the embedding and the head, 129 -> 65 + 64 MLP features.
    assert first["net.tok.weight"] == (49, 64) and last["net.tok.weight"] == (48, 64)
    assert first["net.unembed.weight"] == (49, 64) and last["net.unembed.weight"] == (48, 64)
    assert first["net.cells.0.spread.widen.weight"] == (65, 64) and last["net.cells.0.spread.narrow.weight"] == (64, 64)
    assert world2[0][name]["styles"]["net.unembed"] == "head" and world2[0][name]["styles"]["net.tok"] == "embedding"
    # Never padded: the state dict has the model's own shapes.
    assert world2[0][name]["state_shapes"] == _one_process_shapes("gpt_odd")


def test_loss_parallel_runs_on_uneven_vocabulary_shards(world2):
    assert world2[0]["odd_loss_parallel"]["logits_type"] == "DTensor"
    assert world2[0]["odd"]["logits_type"] == "Tensor"


def test_odd_sizes_tp2_fabric_with_loss_parallel_matches_one_process(world2):
    _assert_parity(world2, "odd_fabric", "gpt_odd", shuffle=False)  # Fabric keeps the loader's order
    assert world2[0]["odd_fabric"]["logits_type"] == "DTensor"


def test_odd_sizes_tp4_trainer_and_fabric_match_one_process(world4):
    _assert_parity(world4, "odd_tp4", "gpt_odd")
    _assert_parity(world4, "odd_fabric_tp4", "gpt_odd", shuffle=False)
    shapes = [r["odd_tp4"]["local_shapes"] for r in world4]
    assert [s["net.tok.weight"][0] for s in shapes] == [25, 25, 25, 22]  # 97 over 4
    assert [s["net.cells.1.spread.widen.weight"][0] for s in shapes] == [33, 33, 33, 30]  # 129 over 4
    assert ODD_VOCAB == 97 and ODD_FFN == 129


@pytest.mark.parametrize("name, kind", [("odd_tp2_dp2", "gpt_odd"), ("gpt2_tp2_dp2", "gpt2")])
def test_uneven_and_fused_shards_under_fsdp2_tp2_dp2_match_one_process(world4, name, kind):
    _assert_parity(world4, name, kind, tp=2)


def test_uneven_checkpoint_saved_at_tp2_resumes_at_tp4(world2, world4):
    ref = reference("gpt_odd", _data("gpt_odd", MICRO), STEPS, MICRO)["losses"]
    assert max_relative_diff(mean_over_ranks([r["odd_ckpt"]["losses"] for r in world2]), ref) <= RTOL
    resumed = mean_over_ranks([r["odd_resumed_tp4"]["losses"] for r in world4])
    assert len(resumed) == STEPS - 4
    assert max_relative_diff(resumed, ref[4:]) <= RTOL, (resumed, ref)


def test_hugging_face_gpt2_tp2_matches_one_process(world2):
    _assert_parity(world2, "gpt2", "gpt2")
    probe = world2[0]["gpt2"]
    styles = probe["styles"]
    assert probe["source"] == "detected"
    assert styles["net.transformer.h.1.attn.c_attn"] == "colwise"
    assert probe["fused"]["net.transformer.h.1.attn.c_attn"] == 3  # q | k | v, each rank its heads of each
    assert styles["net.transformer.h.1.attn.c_proj"] == styles["net.transformer.h.1.mlp.c_proj"] == "rowwise"
    assert styles["net.transformer.h.0.ln_1"] == "norm" and probe["sequence_parallel"] is True
    assert styles["net.lm_head"] == "head" and styles["net.transformer.wte"] == "embedding"
    local = probe["local_shapes"]
    assert local["net.transformer.h.0.attn.c_attn.weight"] == (64, 96)  # (in, 3 * 64 / 2): Conv1D is (in, out)
    assert local["net.transformer.h.0.mlp.c_proj.weight"] == (128, 64)  # row-wise: input features split
    assert local["net.transformer.wte.weight"] == (51, 64) and world2[1]["gpt2"]["local_shapes"][
        "net.transformer.wte.weight"] == (50, 64)  # vocabulary 101 over 2
    assert probe["state_shapes"] == _one_process_shapes("gpt2")
    assert GPT2_VOCAB == 101


def test_hugging_face_gpt2_with_tied_embeddings_keeps_the_vocabulary_whole(world2):
    _assert_parity(world2, "gpt2_tied", "gpt2_tied")
    probe = world2[0]["gpt2_tied"]
    assert "net.lm_head" not in probe["styles"] and "net.transformer.wte" not in probe["styles"]
    assert probe["local_shapes"]["net.transformer.wte.weight"] == (GPT2_VOCAB, 64)
    assert probe["local_shapes"]["net.transformer.h.0.attn.c_attn.weight"] == (64, 96)
