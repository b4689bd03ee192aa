"""Issue 16: a forward overflow costs no step, however many modules overflow.

Single-process runs check the mechanism (several culprits in one forward, siblings, an unsampled
overflow, an MoE expert, what cannot be repaired); real gloo ranks check a culprit inside a
pipeline stage and an expert under expert parallelism; one test starts the way users start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from picotron_lightning.models import CausalLMModule
from picotron_lightning.moe.experts import ExpertLayer
from picotron_lightning.precision import AdaptiveLossScaler, AdaptivePrecision
from picotron_lightning.precision.repair import repair_blocker, structural_siblings
from picotron_lightning.testing import run_ranks
from tests.fitting import LossRecorder
from tests.precision.overflow_gpt import OverflowGPTModule, scaled_norm
from tests.precision.precision_models import byte_loader, trainer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _fit(module: L.LightningModule, steps: int, plugin: AdaptivePrecision | None,
         callbacks: list[L.Callback] = ()) -> LossRecorder:  # type: ignore[assignment]
    recorder = LossRecorder()
    extra = {"plugins": [plugin]} if plugin is not None else {"precision": "32-true"}
    trainer(steps, callbacks=[recorder, *callbacks], **extra).fit(module, byte_loader())
    return recorder


def _dynamic(plugin: AdaptivePrecision) -> dict[str, tuple[int, str]]:
    return {n: (p.step, p.reason) for n, p in plugin.promotions.promotions.items() if p.source == "dynamic"}


# -- several culprits in one forward --------------------------------------------------------------


def test_every_overflowing_block_is_repaired_in_the_first_forward():
    plugin = AdaptivePrecision(mode="fp16", analysis_interval=0)
    recorder = _fit(OverflowGPTModule(where="block"), 4, plugin)
    promoted = _dynamic(plugin)
    # The four blocks overflow in step 0 (each with a few elements): all found, all repaired, in that forward.
    assert set(promoted) == {f"model.blocks.{i}" for i in range(4)}
    assert all(step == 0 and "recomputed in fp32 in the same forward" in why for step, why in promoted.values())
    assert plugin.scaler.skipped == [] and plugin.metrics()["skipped_steps"] == 0
    assert all(loss == loss for loss in recorder.losses) and len(recorder.losses) == 4
    # The promotions and their reasons are what Lightning writes into the checkpoint.
    state = plugin.state_dict()
    saved = {p["module"]: p["reason"] for p in state["promotions"]["promotions"] if p["source"] == "dynamic"}
    assert saved == {n: why for n, (_, why) in promoted.items()}


def test_without_repair_each_block_costs_skipped_steps():
    """The counter-check: the same model with the repair switched off loses steps (as in the issue)."""
    plugin = AdaptivePrecision(mode="fp16", analysis_interval=0, repair_forward=False, promote_siblings=False)
    _fit(OverflowGPTModule(where="block"), 8, plugin)
    assert plugin.metrics()["skipped_steps"] >= 4
    assert any("not repaired in place" in s.reason for s in plugin.scaler.skipped)


# -- siblings -------------------------------------------------------------------------------------


def test_structural_siblings_are_the_same_class_in_the_other_blocks():
    model = OverflowGPTModule(where="mlp").model
    assert structural_siblings(model, "blocks.2.mlp") == ("blocks", ["blocks.0.mlp", "blocks.1.mlp", "blocks.3.mlp"])
    assert structural_siblings(model, "blocks.1.mlp.fc")[1] == ["blocks.0.mlp.fc", "blocks.2.mlp.fc",
                                                                "blocks.3.mlp.fc"]
    assert structural_siblings(model, "blocks.2") == ("", [])  # a block itself: not the whole stack
    assert structural_siblings(model, "head") == ("", [])


@pytest.mark.parametrize("siblings", [True, False])
def test_a_block_child_brings_its_siblings_along(siblings):
    module = OverflowGPTModule(where="mlp", gain=1.0)
    module.model.blocks[1].mlp.gain = 1e6  # only block 1's MLP overflows
    plugin = AdaptivePrecision(mode="fp16", analysis_interval=0, promote_siblings=siblings)
    _fit(module, 3, plugin)
    promoted = _dynamic(plugin)
    assert "recomputed in fp32" in promoted.pop("model.blocks.1.mlp")[1]
    if siblings:
        assert set(promoted) == {"model.blocks.0.mlp", "model.blocks.2.mlp", "model.blocks.3.mlp"}
        assert all(step == 0 and why.startswith("structural sibling of model.blocks.1.mlp (same MLP at the "
                                                "same place in each block of model.blocks)")
                   for step, why in promoted.values())
    else:
        assert promoted == {}
    assert plugin.metrics()["skipped_steps"] == 0


# -- an overflow on a step that was not sampled ---------------------------------------------------


class _OverflowFrom(L.Callback):
    """From ``step`` on, the blocks' gain is raised so that fp16 overflows (fine in fp32)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx == self.step:
            for block in pl_module.model.blocks:
                block.gain = 1e6


@pytest.mark.parametrize("retry", [True, False])
def test_an_unsampled_overflow_is_run_again_with_tracing(retry):
    plugin = AdaptivePrecision(mode="fp16", analysis_interval=0, retry_unsampled=retry)
    module = OverflowGPTModule(where="block", gain=1.0)  # no overflow at first: steps 1.. are not sampled
    _fit(module, 6, plugin, callbacks=[_OverflowFrom(3)])
    promoted = _dynamic(plugin)
    if retry:
        assert plugin.metrics()["retried_steps"] == 1 and plugin.state_dict()["retried"] == [3]
        assert plugin.metrics()["skipped_steps"] == 0
        assert {step for step, _ in promoted.values()} == {3} and len(promoted) == 4
    else:  # the old way: skip step 3, trace and repair in step 4
        assert [s.step for s in plugin.scaler.skipped] == [3]
        assert {step for step, _ in promoted.values()} == {4}


# -- MoE expert, and what cannot be repaired ------------------------------------------------------


class HotExperts(ExpertLayer):
    """The package's experts plus a user's variation: an output mixing matmul (fp16 under autocast;
    the grouped matmuls themselves run in fp32 on a CPU) and a large gain that a norm removes."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, counts)
        return scaled_norm(F.linear(out, torch.eye(out.shape[-1], device=out.device)), 1e9)


def hot_moe_module() -> CausalLMModule:
    torch.manual_seed(0)
    module = CausalLMModule("tiny-moe", learning_rate=3e-3)
    module.model.layers[1].mlp.experts.__class__ = HotExperts
    return module


def test_an_overflowing_moe_expert_is_repaired():
    plugin = AdaptivePrecision(mode="fp16", analysis_interval=0)
    recorder = _fit(hot_moe_module(), 3, plugin)
    promoted = _dynamic(plugin)
    assert promoted["model.layers.1.mlp.experts"][0] == 0
    assert "recomputed in fp32" in promoted["model.layers.1.mlp.experts"][1]
    assert not any("forward" in s.reason for s in plugin.scaler.skipped)
    assert recorder.losses[0] == recorder.losses[0]  # step 0 kept a finite loss


def test_repair_refuses_what_would_differ_or_communicate():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    block = OverflowGPTModule().model.blocks[0]
    with torch.autocast("cpu", dtype=torch.float16):
        assert repair_blocker("blocks.0.mlp", block.mlp, "cpu") is None
        wrapped = torch.nn.ModuleList([checkpoint_wrapper(block)])
        name = next(n for n, m in wrapped.named_modules() if m is block.mlp)
        assert "activation-checkpointed" in repair_blocker(name, block.mlp, "cpu")
        with torch.autocast("cpu", enabled=False):
            assert "already runs in fp32" in repair_blocker("blocks.0.mlp", block.mlp, "cpu")


# -- real ranks: a pipeline stage, expert parallelism ---------------------------------------------

PP_STEPS = 4


def _one_hot_mlp_per_stage() -> OverflowGPTModule:
    module = OverflowGPTModule(where="mlp", gain=1.0)
    for i in (1, 2):  # stage 0 holds blocks 0-1, stage 1 blocks 2-3
        module.model.blocks[i].mlp.gain = 1e6
    return module


def _ranks(rank: int, world: int) -> dict:
    from picotron_lightning.strategies import Picotron3DStrategy
    from picotron_lightning.testing import COLLECTIVE_TIMEOUT

    out = {}
    runs = {"pp2": (_one_hot_mlp_per_stage, {"pipeline_parallel_size": 2}),
            "ep2": (hot_moe_module, {"expert_parallel_size": 2})}
    for name, (build, layout) in runs.items():
        # pp: the schedule runs backward on the unscaled loss, so the scale starts (and stays) at 1.
        scaler = AdaptiveLossScaler(init_scale=1.0, growth_interval=10**6)
        plugin = AdaptivePrecision(mode="fp16", analysis_interval=0, scaler=scaler, promote_siblings=False)
        recorder = LossRecorder()
        strategy = Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, **layout)
        trainer(PP_STEPS, devices=world, strategy=strategy, plugins=[plugin], callbacks=[recorder]).fit(
            build(), byte_loader(8 // (world if name == "ep2" else 1)))
        out[name] = {"promoted": _dynamic(plugin), "skipped": [s.step for s in plugin.scaler.skipped],
                     "losses": recorder.losses}
    return out


@pytest.mark.slow
def test_culprits_inside_pipeline_stages_and_expert_parallel_experts():
    ranks = run_ranks(_ranks, 2, timeout=500)
    pp = [r["pp2"] for r in ranks]
    # Each stage repairs its own culprit in step 0; both ranks record both (rank 0 saves the checkpoint).
    assert pp[0]["promoted"] == pp[1]["promoted"]
    assert set(pp[0]["promoted"]) == {"model.blocks.1.mlp", "model.blocks.2.mlp"}
    assert all(step == 0 and "recomputed in fp32" in why for step, why in pp[0]["promoted"].values())
    assert pp[0]["skipped"] == pp[1]["skipped"] == []
    assert all(loss == loss for loss in pp[0]["losses"]) and len(pp[0]["losses"]) == PP_STEPS
    ep = [r["ep2"] for r in ranks]
    assert ep[0]["promoted"] == ep[1]["promoted"]
    assert ep[0]["promoted"]["model.layers.1.mlp.experts"][0] == 0
    assert ep[0]["skipped"] == ep[1]["skipped"] == []


# -- the user's path: python script.py, Lightning's launcher, dp=2 --------------------------------

SCRIPT = '''
import json, sys
sys.path.insert(0, {here!r})
import lightning as L
import torch
from torch.utils.data import DataLoader
from overflow_gpt import OverflowGPTModule
import picotron_lightning  # registers "picotron3d"
from picotron_lightning.data import ByteCorpus, stdlib_bytes
from picotron_lightning.precision import AdaptivePrecision

def fit(plugin):
    module = OverflowGPTModule(where="block")
    kwargs = {{"plugins": [plugin]}} if plugin else {{"precision": "32-true"}}
    trainer = L.Trainer(devices=2, strategy="picotron3d", accelerator="cpu", max_steps={steps}, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)
    trainer.fit(module, DataLoader(ByteCorpus(stdlib_bytes(100_000), 32), batch_size=4))
    losses = trainer.strategy.reduce(torch.tensor(module.losses), reduce_op="mean").tolist()
    checkpoint = trainer._checkpoint_connector.dump_checkpoint()  # what save_checkpoint writes
    return trainer, losses, checkpoint

_, fp32, _ = fit(None)
plugin = AdaptivePrecision(mode="fp16")
trainer, losses, checkpoint = fit(plugin)
if trainer.global_rank == 0:
    state = checkpoint["AdaptivePrecision"]
    with open({out!r}, "w") as f:
        json.dump({{"fp32": fp32, "losses": losses, "world": trainer.world_size,
                   "skipped": state["scaler"]["skipped"], "retried": state["retried"],
                   "promotions": state["promotions"]["promotions"]}}, f)
'''


@pytest.mark.slow
def test_user_script_dp2_repairs_every_overflow_without_a_skipped_step(tmp_path):
    steps = 10
    out = tmp_path / "result.json"
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(here=str(HERE), steps=steps, out=str(out))))
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK")
    env = {k: v for k, v in os.environ.items()
           if k not in launcher_vars and not k.startswith(("MASTER_", "TORCHELASTIC_", "SLURM_", "PL_"))}
    env["PYTHONPATH"] = str(ROOT)  # this checkout, as `pip install -e .` would give
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, timeout=400,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    assert result["skipped"] == []
    promotions = {p["module"]: p for p in result["promotions"] if p["source"] == "dynamic"}
    assert promotions and all(n.startswith("model.blocks.") for n in promotions)
    assert all("recomputed in fp32 in the same forward" in p["reason"] for p in promotions.values())
    assert min(p["step"] for p in promotions.values()) == 0
    final = sum(result["losses"][-3:]) / 3
    reference = sum(result["fp32"][-3:]) / 3
    assert abs(final - reference) <= 0.01 * reference, (result["losses"], result["fp32"])
