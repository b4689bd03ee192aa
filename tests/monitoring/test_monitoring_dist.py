"""Monitoring under real data parallelism (2 gloo ranks, picotron3d; Lightning's ddp as fallback).

One spawn runs every scenario in sequence: starting processes costs more than the tiny runs.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import pytest
import torch

from picotron_lightning.testing import run_ranks
from tests.monitoring.mon_runs import MICRO, ListHandler, Samples, fit, full_state, lm_tokens, picotron_fsdp
from tests.parity import make_data

# Multi-process (real gloo ranks): the slow tier.
pytestmark = pytest.mark.slow

STEPS = 5
NAN_STEP = 2  # the optimizer step (0-based global_step) whose gradients get a NaN on rank 1


def _acceptance(rank: int, world: int, root: str) -> dict:
    """Reference MoE model, all three callbacks, TensorBoard logger."""
    from picotron_lightning.monitoring import AlertManager, AnomalyDetector, MetricsCollector

    collector = MetricsCollector(log_every_n_steps=1, histogram_every_n_steps=2, tokens_per_batch=lm_tokens)
    callbacks = [collector, AnomalyDetector(warmup=2, log_every_n_steps=1), AlertManager()]
    trainer = fit(world, rank, make_data(64), 4, callbacks, root=os.path.join(root, "acceptance"),
                  preset="tiny-moe", strategy="picotron3d")
    return {"log_dir": trainer.log_dir, "strategy": type(trainer.strategy).__name__,
            "history": list(collector.history)}


def _grad_norms(rank: int, world: int) -> dict:
    from picotron_lightning import Picotron3DStrategy
    from picotron_lightning.monitoring import MetricsCollector

    out = {}
    for name, strategy, dp, batch in (("fsdp_dp2", picotron_fsdp(), world, MICRO),
                                      ("tp2", Picotron3DStrategy(tensor_parallel_size=2), 1, world * MICRO)):
        collector = MetricsCollector(log_every_n_steps=1, tokens_per_batch=lm_tokens)
        trainer = fit(world, rank, make_data(32), 3, [collector], strategy=strategy, dp=dp, batch=batch)
        sharded = type(next(trainer.lightning_module.parameters())).__name__ == "DTensor"
        out[name] = {"norms": [m["grad/norm"] for _, m in collector.history], "sharded": sharded,
                     "layout": trainer.strategy.layout.describe()}
    return out


class _InjectNaN:
    """Callback factory: after backward of step ``step``, poison one gradient element on ``rank``."""

    def __new__(cls, step: int, rank: int):  # noqa: ANN204
        from lightning.pytorch.callbacks import Callback

        class InjectNaN(Callback):
            def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
                if trainer.global_step == step and trainer.global_rank == rank:
                    g = pl_module.model.layers[0].mlp.down_proj.weight.grad
                    local = g.to_local() if hasattr(g, "to_local") else g
                    local.view(-1)[0] = float("nan")

        return InjectNaN()


def _nan_skip(rank: int, world: int, root: str) -> dict:
    from picotron_lightning.monitoring import AlertManager, AnomalyDetector

    handler = ListHandler()
    logging.getLogger("picotron_lightning.monitoring.alerts").addHandler(handler)
    logging.getLogger("picotron_lightning.monitoring.alerts").setLevel(logging.INFO)
    received = []
    # Spikes and stragglers off: only the NaN matters here (step times on a loaded machine are noise).
    detector = AnomalyDetector(warmup=100, straggler_min_s=float("inf"))
    alerts = AlertManager(callables=[received.append])
    data = make_data(world * MICRO * STEPS)
    trainer = fit(world, rank, data, STEPS, [_InjectNaN(NAN_STEP, 1), detector, alerts],
                  root=os.path.join(root, "nan"), strategy=picotron_fsdp())
    weights = full_state(trainer.lightning_module)
    # The same training without the global batch of step NAN_STEP, and no monitoring at all.
    per_step = world * MICRO
    keep = torch.cat([data[: NAN_STEP * per_step], data[(NAN_STEP + 1) * per_step:]])
    reference = fit(world, rank, keep, STEPS - 1, [], strategy=picotron_fsdp())
    ref_weights = full_state(reference.lightning_module)
    logging.getLogger("picotron_lightning.monitoring.alerts").removeHandler(handler)
    return {
        "skips": [d.skip for d in detector.history],
        "kinds": [sorted(d.anomalies) for d in detector.history],
        "global_step": trainer.global_step,
        "callable_alerts": [(a.kind, a.data.get("grad_ranks")) for a in received],
        "log_records": [r for r in handler.records if r.startswith("[ERROR] nonfinite")],
        "jsonl": alerts.jsonl_path,
        "log_dir": trainer.log_dir,
        "max_abs_diff": max((weights[k] - ref_weights[k]).abs().max().item() for k in weights),
        "equal": all(torch.equal(weights[k], ref_weights[k]) for k in weights),
        "finite": all(torch.isfinite(v).all().item() for v in weights.values()),
        "strategy": type(trainer.strategy).__name__,
    }


def _straggler(rank: int, world: int) -> dict:
    from picotron_lightning.monitoring import AlertManager, AnomalyDetector

    received = []
    detector = AnomalyDetector(warmup=100, straggler_ratio=1.5)
    data = make_data(world * MICRO * 6)
    fit(world, rank, data, 6, [detector, AlertManager(callables=[received.append], sinks=())],
        strategy=picotron_fsdp(), dataset=Samples(data, slow_rank=1, delay=0.2))  # far above scheduling noise
    return {"stragglers": [a.data.get("ranks") for a in received if a.kind == "straggler"],
            "decided": [sorted(d.anomalies.get("straggler", {}).get("ranks", [])) for d in detector.history]}


def _scenarios(rank: int, world: int, root: str) -> dict:
    return {
        "acceptance": _acceptance(rank, world, root),
        "grad_norms": _grad_norms(rank, world),
        "nan": _nan_skip(rank, world, root),
        "straggler": _straggler(rank, world),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    root = str(tmp_path_factory.mktemp("monitoring"))
    return run_ranks(_scenarios, 2, root, timeout=600)


def _events(log_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_acceptance_run_writes_tensorboard_views(results):
    from tensorboard.plugins.custom_scalar import layout_pb2

    out = results[0]["acceptance"]
    assert out["strategy"] == "Picotron3DStrategy"
    ea = _events(out["log_dir"])
    tags = ea.Tags()
    for tag in ("train/loss", "throughput/tokens_per_sec", "throughput/tokens_per_sec_per_device",
                "throughput/samples_per_sec", "throughput/step_time_s", "throughput/mfu", "grad/norm",
                "grad/param_norm", "optim/lr", "memory/host_rss_gb", "moe/load_imbalance",
                "moe/layer0/router_entropy", "moe/layer1/aux_loss"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3, 4]
    losses = [e.value for e in ea.Scalars("train/loss")]
    assert all(3.0 < v < 8.0 for v in losses)  # byte-level LM on random tokens starts near ln(256)
    mfu = [e.value for e in ea.Scalars("throughput/mfu")]
    assert all(0.0 < v < 1.0 for v in mfu)
    hist = [t for t in tags["histograms"] if t.startswith("weights/")]
    assert "weights/model.embed_tokens.weight" in hist
    assert any(t.startswith("grads/") for t in tags["histograms"])
    assert [e.step for e in ea.Histograms("weights/model.embed_tokens.weight")] == [2, 4]
    assert "moe/expert_load" in tags["images"]
    image = ea.Images("moe/expert_load")[-1]
    assert (image.height, image.width) == (2 * 16, 4 * 16)  # 2 MoE layers x 4 experts
    layout = layout_pb2.Layout()
    layout.ParseFromString(ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    titles = [c.title for c in layout.category]
    assert titles[:5] == ["1 Loss", "2 Throughput and MFU", "3 Gradient health", "4 Memory", "5 Experts"]
    # The logged throughput counts each data-parallel replica once: 2 ranks x 2 samples per step.
    step_rows = [m for _, m in out["history"]]
    for m in step_rows:
        per_step = m["throughput/samples_per_sec"] * m["throughput/step_time_s"]
        assert per_step == pytest.approx(2 * MICRO, rel=1e-6)


@pytest.mark.parametrize("layout", ["fsdp_dp2", "tp2"])
def test_logged_grad_norm_equals_single_process(results, layout):
    from picotron_lightning.monitoring import MetricsCollector

    # One process on the same global batches (2 x MICRO samples), in the same order.
    collector = MetricsCollector(log_every_n_steps=1, tokens_per_batch=lm_tokens)
    fit(1, 0, make_data(32), 3, [collector], batch=2 * MICRO)
    reference = [m["grad/norm"] for _, m in collector.history]
    assert len(reference) == 3
    for r in (0, 1):
        got = results[r]["grad_norms"][layout]
        assert got["sharded"], got  # the parameters really are DTensor shards
        assert got["norms"] == pytest.approx(reference, rel=1e-4), (got, reference)


def test_nan_on_one_rank_skips_the_step_everywhere(results):
    a, b = results[0]["nan"], results[1]["nan"]
    expected = [i == NAN_STEP for i in range(STEPS)]
    assert a["skips"] == expected and b["skips"] == expected
    assert a["kinds"][NAN_STEP] == ["nonfinite"] and b["kinds"][NAN_STEP] == ["nonfinite"]
    assert a["global_step"] == STEPS  # training went on after the skipped step
    assert a["finite"]
    # The weights equal those of a run that never saw the batch of step NAN_STEP.
    assert a["equal"], a["max_abs_diff"]


def test_nan_alert_appears_once_in_every_sink(results):
    a, b = results[0]["nan"], results[1]["nan"]
    assert a["callable_alerts"] == [("nonfinite", [1])]  # rank 1's gradients were poisoned
    assert b["callable_alerts"] == []  # one alert for the run, from rank 0
    assert len(a["log_records"]) == 1 and b["log_records"] == []
    with open(a["jsonl"]) as f:
        rows = [json.loads(line) for line in f]
    assert [r["kind"] for r in rows if "kind" in r] == ["nonfinite"]
    assert rows[-1]["summary"]["sent"] == {"nonfinite": 1}
    ea = _events(a["log_dir"])
    texts = [t for t in ea.Tags()["tensors"] if t.startswith("alerts/nonfinite")]
    assert len(texts) == 1 and len(ea.Tensors(texts[0])) == 1
    assert b"skip" in ea.Tensors(texts[0])[0].tensor_proto.string_val[0]
    assert glob.glob(os.path.join(a["log_dir"], "anomalous_batches.json"))
    with open(os.path.join(a["log_dir"], "anomalous_batches.json")) as f:
        recorded = json.load(f)
    assert recorded == [{"step": NAN_STEP, "epoch": 0, "batches": [NAN_STEP], "kind": "nonfinite",
                         "actions": ["log", "skip"]}]


def test_slow_rank_is_reported_as_straggler(results):
    out = results[0]["straggler"]
    assert out["stragglers"], "no straggler alert"
    assert all(ranks == [1] for ranks in out["stragglers"])
    # Both ranks decided the same on every step (the decision is taken from gathered numbers).
    assert out["decided"] == results[1]["straggler"]["decided"]
    assert sum(d == [1] for d in out["decided"]) >= 3
