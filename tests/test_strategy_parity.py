"""picotron3d data parallelism reproduces one process, step by step (fp32, relative 1e-4).

One spawn per world size runs several scenarios in sequence: starting processes costs more
than the tiny runs themselves on a 2-core machine.
"""

from __future__ import annotations

import pytest
import torch

from picotron_lightning.testing import run_ranks
from tests.parity import (
    RTOL,
    fabric_run,
    make_data,
    make_module,
    max_relative_diff,
    mean_over_ranks,
    reference_losses,
    step_means,
    trainer_run,
)

# Multi-process (real gloo ranks): the slow tier.
pytestmark = pytest.mark.slow

STEPS = 8
MICRO = 2


def _scenarios_world2(rank: int, world: int, ckpt_dir: str) -> dict:
    data = make_data(64)
    out = {
        "trainer_fsdp": trainer_run(world, data, MICRO, STEPS, {"data_parallel_mode": "fsdp"}),
        "trainer_ddp": trainer_run(world, data, MICRO, STEPS, {"data_parallel_mode": "ddp"}),
        "trainer_default": trainer_run(world, data, MICRO, STEPS),
        "trainer_fsdp_accum2": trainer_run(world, data, MICRO, STEPS, {"data_parallel_mode": "fsdp"}, accumulate=2),
        "trainer_fsdp_clip": trainer_run(world, data, MICRO, STEPS, {"data_parallel_mode": "fsdp"}, clip=0.05),
        "trainer_fsdp_ac": trainer_run(world, data, MICRO, STEPS, {"data_parallel_mode": "fsdp",
                                                                  "activation_checkpointing": True}),
        "trainer_ddp_accum2": trainer_run(world, data, MICRO, 2, {"data_parallel_mode": "ddp"}, accumulate=2),
        "fabric_fsdp": fabric_run(world, data, MICRO, STEPS, {"data_parallel_mode": "fsdp"}),
        "fabric_ddp_accum2": fabric_run(world, data, MICRO, STEPS, {"data_parallel_mode": "ddp"}, accumulate=2),
        "fabric_fsdp_clip": fabric_run(world, data, MICRO, STEPS, {"data_parallel_mode": "fsdp"}, clip=0.05),
    }
    # Resume: one step per epoch (so no mid-epoch data-loader state is involved), a checkpoint at
    # each epoch end; resume from the end of the 4th step.
    small = make_data(world * MICRO)
    out["full_run"] = trainer_run(world, small, MICRO, 6, {"data_parallel_mode": "fsdp"}, ckpt_dir=ckpt_dir)
    out["resumed"] = trainer_run(
        world, small, MICRO, 6, {"data_parallel_mode": "fsdp"}, resume_from=f"{ckpt_dir}/epoch=3-step=4.ckpt"
    )
    return out


def _scenarios_world4(rank: int, world: int, ckpt_dir: str) -> dict:
    data = make_data(128)
    small = make_data(2 * MICRO)  # the world-2 resume data: one global batch of 4
    return {
        "trainer_fsdp": trainer_run(world, data, MICRO, STEPS, {"data_parallel_mode": "fsdp"}),
        "trainer_hsdp": trainer_run(world, data, MICRO, STEPS, {"data_parallel_mode": "hsdp", "hsdp_shard_size": 2}),
        "fabric_ddp": fabric_run(world, data, MICRO, STEPS, {"data_parallel_mode": "ddp"}),
        # A dp=2 checkpoint continued on dp=4: micro-batch 1 keeps the global batch at 4.
        "resumed_dp4": trainer_run(
            world, small, 1, 6, {"data_parallel_mode": "fsdp"}, resume_from=f"{ckpt_dir}/epoch=3-step=4.ckpt"
        ),
    }


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def world2(ckpt_dir) -> list[dict]:
    return run_ranks(_scenarios_world2, 2, ckpt_dir, timeout=600)


@pytest.fixture(scope="module")
def world4(world2, ckpt_dir) -> list[dict]:  # needs the world-2 checkpoint
    return run_ranks(_scenarios_world4, 4, ckpt_dir, timeout=600)


def _step_losses(results: list[dict], name: str, accumulate: int = 1) -> list[float]:
    return step_means(mean_over_ranks([r[name]["losses"] for r in results]), accumulate)


@pytest.mark.parametrize(
    "name, accumulate",
    [("trainer_fsdp", 1), ("trainer_ddp", 1), ("trainer_default", 1), ("trainer_fsdp_accum2", 2),
     ("trainer_fsdp_ac", 1), ("fabric_fsdp", 1), ("fabric_ddp_accum2", 2)],
)
def test_dp2_matches_one_process(world2, name, accumulate):
    ref = reference_losses(make_data(64), STEPS, global_batch=2 * MICRO * accumulate,
                           shuffle=name.startswith("trainer"))["losses"]
    got = _step_losses(world2, name, accumulate)
    assert len(got) == STEPS
    assert max_relative_diff(got, ref) <= RTOL, (got, ref)
    # the two replicas really saw different data
    assert world2[0][name]["losses"] != world2[1][name]["losses"]


def test_modes_are_the_ones_asked_for(world2, world4):
    assert world2[0]["trainer_fsdp"]["mode"] == "fsdp"
    assert world2[0]["trainer_ddp"]["mode"] == "ddp"
    assert world2[0]["trainer_default"]["mode"] == "ddp"  # "auto": a tiny model replicates
    assert world4[0]["trainer_hsdp"]["mode"] == "hsdp"


@pytest.mark.parametrize("name", ["trainer_fsdp_clip", "fabric_fsdp_clip"])
def test_clipping_sharded_gradients_matches_one_process(world2, name):
    shuffle = name.startswith("trainer")
    ref = reference_losses(make_data(64), STEPS, global_batch=2 * MICRO, clip=0.05, shuffle=shuffle)
    assert min(ref["norms"]) > 0.05, "the clip value must bind for this test to mean anything"
    unclipped = reference_losses(make_data(64), STEPS, global_batch=2 * MICRO, shuffle=shuffle)["losses"]
    got = _step_losses(world2, name)
    assert max_relative_diff(got, ref["losses"]) <= RTOL
    assert max_relative_diff(got, unclipped) > 10 * RTOL


@pytest.mark.parametrize("name", ["trainer_fsdp", "trainer_hsdp", "fabric_ddp"])
def test_dp4_matches_one_process(world4, name):
    ref = reference_losses(make_data(128), STEPS, global_batch=4 * MICRO, shuffle=name.startswith("trainer"))["losses"]
    assert max_relative_diff(_step_losses(world4, name), ref) <= RTOL


def test_resume_reproduces_uninterrupted_run(world2):
    full = _step_losses(world2, "full_run")
    resumed = _step_losses(world2, "resumed")
    ref = reference_losses(make_data(2 * MICRO), 6, global_batch=2 * MICRO)["losses"]
    assert max_relative_diff(full, ref) <= RTOL
    assert len(resumed) == 2  # steps 5 and 6 only
    assert max_relative_diff(resumed, full[4:]) <= RTOL


def test_checkpoint_loads_into_different_data_parallel_size(world4):
    ref = reference_losses(make_data(2 * MICRO), 6, global_batch=2 * MICRO)["losses"]
    resumed = _step_losses(world4, "resumed_dp4")
    assert max_relative_diff(resumed, ref[4:]) <= RTOL


def test_data_parallel_rank_drives_the_sampler(world4):
    assert sorted(r["trainer_fsdp"]["dp_rank"] for r in world4) == [0, 1, 2, 3]
    assert torch.tensor([r["trainer_fsdp"]["losses"][0] for r in world4]).unique().numel() == 4


def test_accumulation_skips_gradient_sync_until_the_last_micro_step(world2):
    # FSDP2: no reduce-scatter on the first micro-step, so no sharded gradient exists yet.
    fsdp = world2[0]["trainer_fsdp_accum2"]["sync_probe"]
    assert fsdp[0::2] == [None] * STEPS and all(v is not None for v in fsdp[1::2])
    # DDP: first micro-step gradients are local (differ between ranks), the last ones are averaged.
    ddp = [r["trainer_ddp_accum2"]["sync_probe"] for r in world2]
    assert ddp[0][0] != ddp[1][0]
    assert abs(ddp[0][1] - ddp[1][1]) <= 1e-9 * max(1.0, abs(ddp[0][1]))


def test_activation_checkpointing_wraps_every_block(world2):
    assert world2[0]["trainer_fsdp_ac"]["checkpointed_blocks"] == 2  # the tiny model's two blocks
    assert world2[0]["trainer_fsdp"]["checkpointed_blocks"] == 0


def _slurm_run(rank: int, world: int) -> dict:
    import lightning as L

    env = type(L.Trainer(strategy="picotron3d", accelerator="cpu", devices=world).strategy.cluster_environment).__name__
    return {"env": env, "run": trainer_run(world, make_data(64), MICRO, 4, {"data_parallel_mode": "fsdp"})}


def test_launched_by_slurm_matches_one_process():
    results = run_ranks(_slurm_run, 2, launcher="slurm", timeout=300)
    assert {r["env"] for r in results} == {"SLURMEnvironment"}
    ref = reference_losses(make_data(64), 4, global_batch=2 * MICRO)["losses"]
    assert max_relative_diff(_step_losses(results, "run"), ref) <= RTOL


SPAWN_SCRIPT = """
import sys
import lightning as L, torch
sys.path.insert(0, {root!r})
from tests.parity import TokenDataset, make_data, make_module
from picotron_lightning import Picotron3DStrategy
from torch.utils.data import DataLoader

if __name__ == "__main__":
    trainer = L.Trainer(strategy=Picotron3DStrategy(start_method="spawn", data_parallel_mode="fsdp"),
                        accelerator="cpu", devices=2, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    module = make_module()
    trainer.fit(module, DataLoader(TokenDataset(make_data(64)), batch_size={micro}))
    torch.save(module.state_dict(), {out!r})
"""


def test_spawn_launch_hands_the_trained_weights_back(tmp_path):
    """start_method="spawn": the launching process ends up with the full, trained FSDP weights."""
    import os
    import subprocess
    import sys

    out = tmp_path / "weights.pt"
    script = tmp_path / "spawn_fit.py"
    script.write_text(SPAWN_SCRIPT.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), micro=MICRO,
                                         out=str(out)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    ref = reference_losses(make_data(64), 3, global_batch=2 * MICRO)["state"]
    assert set(got) == set(ref)
    for name, tensor in ref.items():
        assert type(got[name]) is torch.Tensor, name  # whole tensors, not DTensor shards
        # Adam divides by sqrt(v): float noise in near-zero gradients shows up in a few weights, ~1e-6 on
        # AVX-512 machines and up to 1.6e-5 (1 of 4096 elements) on an AVX2-only one. Three steps of
        # lr 1e-2 move weights by ~1e-2, so 1e-4 still tells trained weights from untrained ones (below).
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-4)
    initial = make_module().state_dict()
    assert any((got[n] - initial[n]).abs().max() > 1e-3 for n in initial), "the launching process got untrained weights"
