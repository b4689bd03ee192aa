"""Monitoring in one process: peak table, FLOPs, heatmap, alerts, loss spikes, replayed skips, Fabric."""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from torch import nn

from picotron_lightning.monitoring import (
    Alert,
    AlertManager,
    AnomalyDetector,
    MetricsCollector,
    ModelFlops,
    RunContext,
    expert_load_image,
    lookup_peak,
    measure_cpu_peak_flops,
    peak_flops,
)
from picotron_lightning.monitoring.flops import compute_precision
from tests.monitoring.mon_runs import fit, full_state, lm_tokens
from tests.parity import make_data


@pytest.mark.parametrize(
    ("name", "table_name", "bf16"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H200", "H200 SXM", 989.4),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", "GH200", 989.4),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
        ("NVIDIA B200", "B200", 2250.0),
        ("NVIDIA L40S", "L40S", 362.05),
        ("NVIDIA L4", "L4", 121.0),
    ],
)
def test_peak_table_matches_real_device_names(name, table_name, bf16):
    peak = lookup_peak(name)
    assert peak is not None and peak.name == table_name
    assert peak.tflops("bf16") == bf16
    assert peak.tflops("fp32") < peak.tflops("bf16")


def test_unknown_device_and_precisions():
    assert lookup_peak("Some Future Accelerator") is None
    assert compute_precision("bf16-mixed") == "bf16"
    assert compute_precision("16-mixed") == "fp16"
    assert compute_precision("transformer-engine") == "fp8"
    assert compute_precision("32-true", "cpu") == "fp32"
    # A CPU's peak is measured: a positive, plausible number of FLOP/s.
    measured = measure_cpu_peak_flops("fp32")
    assert 1e8 < measured < 1e14
    assert peak_flops("cpu", "fp32") == measured


def test_model_flops_count_active_experts_and_attention():
    from picotron_lightning.models import Llama, llama_config

    dense, moe = Llama(llama_config("tiny")), Llama(llama_config("tiny-moe"))
    for model in (dense, moe):
        flops = ModelFlops.from_module(model)
        # Embedding lookups are not matmuls; inactive experts do no work for a token.
        embedding = model.embed_tokens.weight.numel()
        assert flops.active_params == model.num_parameters(active_only=True) - embedding
        assert (flops.layers, flops.hidden) == (2, 64)
        assert flops.per_token(128) == 6 * flops.active_params + 12 * 2 * 64 * 128
    assert ModelFlops.from_module(moe).active_params < sum(p.numel() for p in moe.parameters())


def test_expert_heatmap_colours_load():
    counts = torch.tensor([[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0]])
    img = expert_load_image(counts, cell=8)
    assert img.shape == (16, 32, 3) and img.dtype == torch.uint8
    balanced = img[4, 4:32:8]  # centres of row 0's cells
    assert (balanced == balanced[0]).all()  # equal load, equal colour
    hot, starved = img[12, 4].int(), img[12, 12].int()
    assert hot.sum() > balanced[0].int().sum() > starved.sum()  # bright = overloaded, dark = starved


def test_alert_manager_dedup_rate_limit_and_sinks(tmp_path):
    got: list[Alert] = []

    def broken(alert: Alert) -> None:
        raise RuntimeError("webhook down")

    alerts = AlertManager(callables=[got.append, broken], dedup_steps=10, rate_limit=3, sinks=("jsonl",))
    alerts.attach(RunContext(log_dir=str(tmp_path)))
    assert alerts.alert("loss_spike", "x", step=1) is not None
    assert alerts.alert("loss_spike", "x", step=5) is None  # same key within 10 steps
    assert alerts.alert("loss_spike", "x", step=11) is not None
    assert alerts.alert("grad_spike", "y", step=12) is not None
    assert alerts.alert("straggler", "z", step=13) is None  # 4th alert within the rate window
    assert alerts.alert("nonfinite", "nan", severity="critical", step=14) is not None  # critical bypasses
    assert [a.kind for a in got] == ["loss_spike", "loss_spike", "grad_spike", "nonfinite"]
    summary = alerts.finish(step=20)
    assert summary["raised"] == {"loss_spike": 3, "grad_spike": 1, "straggler": 1, "nonfinite": 1}
    assert summary["suppressed"] == {"loss_spike": 1, "straggler": 1}
    rows = [json.loads(line) for line in open(tmp_path / "alerts.jsonl")]
    assert [r.get("kind") for r in rows[:-1]] == ["loss_spike", "loss_spike", "grad_spike", "nonfinite"]
    assert rows[-1]["summary"] == summary
    with pytest.raises(ValueError, match="severity"):
        alerts.alert("x", "y", severity="loud")


class _SpikeData(torch.utils.data.Dataset):
    """Byte text, except for one batch of a single repeated byte the model has never seen."""

    def __init__(self, spike_index: int, batch: int) -> None:
        from picotron_lightning.data import ByteCorpus, stdlib_bytes

        self.text = ByteCorpus(stdlib_bytes(200_000), 32)
        self.spike = range(spike_index * batch, (spike_index + 1) * batch)

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i in self.spike:
            return torch.full((33,), 7, dtype=torch.long)  # BEL bytes: absent from source code
        return self.text[i]


def test_loss_spike_in_data_is_detected(tmp_path):
    got: list[Alert] = []
    detector = AnomalyDetector(window=20, warmup=10, loss_z=6.0, grad_z=1e9)
    fit(1, 0, None, 45, [detector, AlertManager(callables=[got.append], sinks=())], dataset=_SpikeData(40, 4),
        batch=4, lr=3e-3)
    spikes = [a for a in got if a.kind == "loss_spike"]
    assert [a.step for a in spikes] == [40], [(a.kind, a.step, a.message) for a in got]
    assert spikes[0].data["zscore"] > 6.0 and spikes[0].data["batches"] == [40]


def test_replayed_skip_list_equals_a_run_without_the_batch(tmp_path):
    data = make_data(12)
    record = tmp_path / "anomalous_batches.json"
    record.write_text(json.dumps([{"step": 1, "epoch": 0, "batches": [1], "kind": "nonfinite",
                                   "actions": ["skip"]}]))
    replay = fit(1, 0, data, 6, [AnomalyDetector(skip_batches=str(record), warmup=100)])
    without = fit(1, 0, torch.cat([data[:2], data[4:]]), 5, [])
    plain = fit(1, 0, data, 6, [])
    a, b, c = (full_state(t.lightning_module) for t in (replay, without, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


class _ToyMoE(nn.Module):
    """A user's own MoE block: only the ``moe_metrics`` duck type is shared with the package."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def moe_metrics(self) -> dict[str, torch.Tensor]:
        counts = torch.tensor([50.0, 50.0, 28.0, 0.0])
        return {"tokens_per_expert": counts, "load_imbalance": torch.tensor(1.6)}


class _ToyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.moe = _ToyMoE()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.moe(batch.float()).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_expert_collapse_and_moe_metrics_from_any_moe_layer(tmp_path):
    got: list[Alert] = []
    collector = MetricsCollector(log_every_n_steps=2, histogram_every_n_steps=0)
    detector = AnomalyDetector(collapse_window=3, warmup=100)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=6, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        callbacks=[collector, detector, AlertManager(callables=[got.append], sinks=())],
    )
    trainer.fit(_ToyModule(), torch.utils.data.DataLoader(torch.randn(24, 8), batch_size=4))
    collapses = [a for a in got if a.kind == "expert_collapse"]
    assert [a.step for a in collapses] == [3, 6] and collapses[0].data["experts"] == [[0, 3]]
    assert collector.last_metrics["moe/load_imbalance"] == pytest.approx(1.6)


def test_fabric_api(tmp_path):
    """The explicit calls a Fabric loop makes; a NaN makes the step a no-op for weights and Adam."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from picotron_lightning.models import CausalLMModule

    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(str(tmp_path), name="fab"))
    module = CausalLMModule("tiny", learning_rate=1e-2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(module, optimizer)
    alerts, got = AlertManager(sinks=("jsonl",)), []
    alerts.callables.append(got.append)
    alerts.setup_fabric(fabric)
    collector = MetricsCollector(log_every_n_steps=2, tokens_per_batch=lm_tokens)
    collector.setup_fabric(fabric, model, optimizers=[optimizer])
    detector = AnomalyDetector(warmup=100)
    detector.setup_fabric(fabric, model, alerts=alerts)
    data = make_data(8)
    for step, batch in enumerate(data.split(2), start=1):
        collector.start_batch(batch)
        detector.start_batch(step - 1)
        loss = module._loss(batch)
        collector.record_loss(loss)
        detector.record_loss(loss)
        fabric.backward(loss)
        if step == 3:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
            before = {k: v.clone() for k, v in model.state_dict().items()}
            adam_steps = [s["step"].item() for s in optimizer.state.values()]
        collector.before_optimizer_step(step)
        decision = detector.check(step)
        optimizer.step()
        optimizer.zero_grad()
        if step == 3:
            assert decision.skip and "nonfinite" in decision.anomalies
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
            assert [s["step"].item() for s in optimizer.state.values()] == adam_steps
        detector.end_batch(step)
        collector.end_batch(step)
    alerts.finish(step)
    assert [s for s, _ in collector.history] == [2, 4]
    assert {"train/loss", "throughput/mfu", "grad/norm", "optim/lr"} <= set(collector.last_metrics)
    assert [a.kind for a in got] == ["nonfinite"]
    assert os.path.exists(alerts.jsonl_path)
    assert detector.history[0].skip is False and detector.skipped_steps == 1
