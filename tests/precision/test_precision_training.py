"""The plugin in real Trainer and Fabric runs: accuracy, overflow repair, checkpoints."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision

from picotron_lightning.models import CausalLMModule
from picotron_lightning.precision import AdaptivePrecision, FabricAdaptivePrecision, HardwareDetector
from tests.fitting import LossRecorder
from tests.precision.precision_models import (
    OverflowModule,
    OverflowNet,
    byte_loader,
    full_loss,
    regression_loader,
    trainer,
)

STEPS = 50


def _lm_run(steps: int, **kwargs: object) -> list[float]:
    torch.manual_seed(0)
    recorder = LossRecorder()
    module = CausalLMModule("tiny", learning_rate=3e-3)
    trainer(steps, callbacks=[recorder], **kwargs).fit(module, byte_loader())
    return recorder.losses


NATIVE_BF16 = HardwareDetector("cpu").detect().bf16


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16, so mode='auto' rightly picks fp32")
def test_reference_model_bf16_within_2_percent_of_fp32():
    fp32 = _lm_run(STEPS, precision="32-true")
    plugin = AdaptivePrecision(analysis_interval=25)
    adaptive = _lm_run(STEPS, plugins=[plugin])
    assert plugin.plan.mode == "bf16" and plugin.precision == "bf16-mixed"
    # The run really computed in bf16 (the analyzer saw it on sampled steps)...
    assert plugin.analyzer.stats["model.layers.0.attention.q_proj"].output_dtype == "bfloat16"
    assert plugin.analyzer.stats["model.norm"].output_dtype == "float32"  # fp32 island
    assert adaptive != fp32
    # ...and still lands within 2% of fp32 after 50 steps.
    assert abs(adaptive[-1] - fp32[-1]) / fp32[-1] < 0.02, (adaptive[-1], fp32[-1])
    assert plugin.metrics()["skipped_steps"] == 0


def _overflow_fit(steps: int, **kwargs: object) -> tuple[OverflowModule, L.Trainer]:
    module = OverflowModule()
    t = trainer(steps, **kwargs)
    t.fit(module, regression_loader())
    return module, t


def test_overflowing_layer_fp16_mixed_fails_adaptive_promotes_it(caplog):
    initial = {k: v.clone() for k, v in OverflowModule().state_dict().items()}
    fp32, _ = _overflow_fit(STEPS, precision="32-true")

    # Lightning's own fp16 AMP ("16-mixed"; on CPU the Trainer flag silently becomes bf16, so the
    # plugin is passed directly): every step overflows, GradScaler halves the scale forever and
    # skips every step without a word, so the model never trains.
    amp, amp_trainer = _overflow_fit(STEPS, plugins=[MixedPrecision("16-mixed", "cpu")])
    assert all(loss != loss for loss in amp.losses)  # NaN on every step
    assert amp_trainer.precision_plugin.scaler.get_scale() < 1e-6
    assert all(torch.equal(v, initial[k]) for k, v in amp.state_dict().items())

    plugin = AdaptivePrecision(mode="fp16", analysis_interval=0)  # trace only after an overflow
    with caplog.at_level(logging.WARNING, logger="picotron_lightning.precision"):
        adaptive, _ = _overflow_fit(STEPS, plugins=[plugin])
    promo = plugin.promotions.promotions["net.hot"]
    # The first step is sampled: the overflow is repaired in that forward, and the step is kept.
    assert promo.source == "dynamic" and promo.step == 0 and "recomputed in fp32" in promo.reason
    assert plugin.metrics()["promotions"] == 1
    assert all(torch.isfinite(p).all() for p in adaptive.parameters())
    # Every skipped step was reported, with its reason; none of them is net.hot's forward overflow
    # (the remaining ones are backward overflows at the initial scale 2**16, the scaler's job).
    skipped = plugin.scaler.skipped
    assert len(skipped) == plugin.metrics()["skipped_steps"] <= 8
    assert all(f"skipped optimizer step {s.step} " in caplog.text for s in skipped)
    assert not any("net.hot" in s.reason for s in skipped)
    assert all("gradient" in s.reason for s in skipped)
    # The trained model fits the data as well as the fp32 one (within 2%).
    # One-sided: with the forward overflow repaired in step 0 the fp16 run may even fit a bit better.
    assert full_loss(adaptive) < 1.02 * full_loss(fp32), (full_loss(adaptive), full_loss(fp32))


def test_checkpoint_round_trip_restores_promotions_and_scale(tmp_path):
    from picotron_lightning.precision import AdaptiveLossScaler

    def plugin() -> AdaptivePrecision:
        return AdaptivePrecision(mode="fp16", analysis_interval=0,
                                 scaler=AdaptiveLossScaler(init_scale=256.0, growth_interval=2))

    first = plugin()
    module, t = _overflow_fit(6, plugins=[first])
    ckpt = str(tmp_path / "prec.ckpt")
    t.save_checkpoint(ckpt)
    saved = first.state_dict()
    assert "net.hot" in first.promotions.promotions and first.scaler.scale > 256.0

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):  # noqa: ANN001
            self.scale = trainer.precision_plugin.scaler.scale
            self.promoted = dict(trainer.precision_plugin.promotions.promotions)

    second, snap = plugin(), Snapshot()
    _overflow_fit_resume = trainer(10, plugins=[second], callbacks=[snap])
    _overflow_fit_resume.fit(OverflowModule(), regression_loader(), ckpt_path=ckpt)
    assert snap.scale == saved["scaler"]["scale"]
    assert snap.promoted["net.hot"].reason == first.promotions.promotions["net.hot"].reason
    # Restored promotions are live: the resumed steps do not overflow again.
    assert second.metrics()["skipped_steps"] == first.metrics()["skipped_steps"]
    assert second.metrics()["promotions"] == 1


def test_fabric_plugin_promotes_and_saves_its_state(tmp_path):
    plugin = FabricAdaptivePrecision(mode="fp16", analysis_interval=0)
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    torch.manual_seed(0)
    model = OverflowNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    losses = []
    for x, y in regression_loader():
        loss = F.mse_loss(model(x).float(), y)
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=10.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert "hot" in plugin.promotions.promotions
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] == losses[-1] and losses[-1] < losses[2]
    path = tmp_path / "fabric.ckpt"
    fabric.save(path, {"model": model, "precision": plugin})
    restored = FabricAdaptivePrecision(mode="fp16")
    fabric2 = L.Fabric(accelerator="cpu", devices=1, plugins=[restored])
    model2 = fabric2.setup(OverflowNet())
    fabric2.load(path, {"model": model2, "precision": restored})
    assert "hot" in restored.promotions.promotions
    assert restored.scaler.scale == plugin.scaler.scale
    with restored.forward_context():
        assert torch.isfinite(model2(torch.randn(4, 8))).all()


def test_fsdp_policy_follows_the_mode():
    bf16 = AdaptivePrecision(mode="bf16").fsdp_mixed_precision_policy("cpu")
    # fp32 master parameters (autocast picks compute dtypes, promotions stay possible), fp32 reduce.
    assert bf16.param_dtype is None and bf16.reduce_dtype == torch.float32
    assert AdaptivePrecision(mode="fp32").fsdp_mixed_precision_policy("cpu") is None
