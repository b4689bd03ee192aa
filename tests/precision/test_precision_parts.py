"""The parts on their own: detector rules, policy, analyzer, promotion, loss scaler."""

from __future__ import annotations

import logging

import pytest
import torch

from picotron_lightning.models import Llama, llama_config
from picotron_lightning.precision import (
    AdaptiveLossScaler,
    AdaptivePolicy,
    HardwareDetector,
    LossScaleError,
    PrecisionAnalyzer,
    PromotionManager,
)
from picotron_lightning.precision.hardware import cpu_report, cuda_report, read_cpu_flags
from tests.precision.precision_models import OverflowNet

# -- hardware ---------------------------------------------------------------------------------


def test_detector_reports_this_cpu_honestly_and_policy_picks_bf16():
    flags = read_cpu_flags()
    report = HardwareDetector("cpu").detect()
    native_bf16 = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    assert report.bf16 == native_bf16
    assert "bf16" in str(report)
    plan = AdaptivePolicy().plan(Llama(llama_config("tiny")), report)
    if native_bf16:  # the CI machine: AMD EPYC with avx512_bf16
        assert plan.mode == "bf16" and plan.autocast_dtype == torch.bfloat16 and not plan.loss_scaling
    else:
        assert plan.mode == "fp32", "without native bf16 the policy must not pick emulated low precision"


def test_cpu_rules():
    assert read_cpu_flags("processor: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 sse\n") == {
        "avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert cpu_report(frozenset({"avx512_bf16"})).bf16
    assert cpu_report(frozenset({"bf16", "asimdhp"})).fp16  # Arm
    old = cpu_report(frozenset({"avx2", "avx512f"}))
    assert not old.bf16 and old.bf16_emulated
    assert AdaptivePolicy().choose_mode(old)[0] == "fp32"
    assert AdaptivePolicy(mode="bf16").choose_mode(old) == ("bf16", "requested (not native on this cpu)")


@pytest.mark.parametrize(
    ("capability", "bf16", "fp8", "tf32", "mode"),
    [((7, 0), False, False, False, "fp16"), ((8, 0), True, False, True, "bf16"),
     ((8, 9), True, True, True, "bf16"), ((9, 0), True, True, True, "bf16")],
)
def test_cuda_rules(capability, bf16, fp8, tf32, mode):
    report = cuda_report(capability)
    assert (report.bf16, report.fp8, report.tf32) == (bf16, fp8, tf32)
    plan = AdaptivePolicy().plan(torch.nn.Linear(4, 4), report)
    assert plan.mode == mode and plan.loss_scaling == (mode == "fp16")


def test_benchmark_can_veto_a_native_dtype():
    report = cpu_report(frozenset({"avx512_bf16"}))
    report.matmul_tflops = {"fp32": 1.0, "bf16": 0.5, "fp16": 0.1}
    assert AdaptivePolicy().choose_mode(report)[0] == "fp32"


def test_micro_benchmark_measures_every_dtype():
    report = HardwareDetector("cpu", benchmark=True, benchmark_size=64).detect()
    assert set(report.matmul_tflops) == {"fp32", "bf16", "fp16"}
    assert all(v > 0 for v in report.matmul_tflops.values())


# -- policy -----------------------------------------------------------------------------------


def test_plan_keeps_norms_router_and_loss_in_fp32():
    model = torch.nn.ModuleDict({"llama": Llama(llama_config("tiny")), "router": torch.nn.Linear(8, 4),
                                 "loss": torch.nn.CrossEntropyLoss(), "softmax": torch.nn.Softmax(-1)})
    plan = AdaptivePolicy(fp32_modules=["llama.output"]).plan(model, cpu_report(frozenset({"avx512_bf16"})))
    fp32 = set(plan.fp32_modules())
    norms = {n for n, m in model.named_modules() if type(m).__name__ == "RMSNorm"}
    assert norms and norms <= fp32
    assert {"router", "loss", "softmax", "llama.output"} <= fp32
    assert "llama.layers.0.mlp.gate_proj" not in fp32  # a SwiGLU gate is not a router
    assert not plan.fp8_modules()  # no fp8 on a CPU


def test_fp8_needs_hardware_and_a_library():
    hopper = cuda_report((9, 0))
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 8))
    plan = AdaptivePolicy().plan(model, hopper)
    try:
        import torchao  # noqa: F401
        assert plan.fp8_modules() == ["0"]  # the small head stays bf16
    except ImportError:
        assert plan.fp8_modules() == [] and plan.fp8_library is None


# -- analyzer and promotion -------------------------------------------------------------------


def _fp16_forward_backward(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(16, 8)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    out.float().sum().backward()
    return out


def test_analyzer_names_the_overflowing_module_and_counts_fp16_range():
    torch.manual_seed(0)
    model = OverflowNet()
    analyzer = PrecisionAnalyzer(interval=0)
    analyzer.attach(model)
    _fp16_forward_backward(model)
    analyzer.detach()
    assert analyzer.first_culprit() == ("hot", "forward")
    assert analyzer.stats["hot"].nonfinite_forward == 1
    assert analyzer.stats["hot"].output_dtype == "float16"
    # In fp32 the same layer is finite but its values lie beyond the fp16 range: counted.
    analyzer.attach(model)
    model(torch.randn(16, 8)).sum().backward()
    analyzer.detach()
    assert analyzer.stats["hot"].act_over_fp16 > 0 and analyzer.stats["inp"].act_over_fp16 == 0
    assert "hot" in analyzer.report()


def test_sensitivity_probe_ranks_the_hot_layer_first():
    torch.manual_seed(0)
    model = OverflowNet()
    ranking = PrecisionAnalyzer().sensitivity(model, torch.randn(16, 8), dtype=torch.float16)
    assert ranking[0] == ("hot", float("inf"))
    assert all(err < 0.05 for name, err in ranking if name in ("inp", "out"))


def test_promotion_runs_the_module_in_fp32_and_demotion_reverts_it():
    torch.manual_seed(0)
    model = OverflowNet()
    promotions = PromotionManager("cpu", demote_after=2)
    promotions.bind(model)
    assert not torch.isfinite(_fp16_forward_backward(model)).all()
    assert promotions.promote("hot", "test", step=0)
    out = _fp16_forward_backward(model)
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.hot.weight.grad.dtype == torch.float32
    promotions.end_step(0, skipped=False)  # output ~1e6 this step: not quiet
    assert promotions.promotions["hot"].quiet_steps == 0
    # Quiet window: with a small gain the fp32 output stays far below the fp16 max.
    model.hot.gain.fill_(1.0)
    for step in range(1, 3):
        _fp16_forward_backward(model)
        promotions.end_step(step, skipped=False)
    assert "hot" not in promotions.promotions
    assert [e["event"] for e in promotions.events] == ["promote", "demote"]
    model.hot.gain.fill_(1e6)
    assert not torch.isfinite(_fp16_forward_backward(model)).all()  # low precision again


# -- loss scaler ------------------------------------------------------------------------------


def _grads(value: float) -> list[torch.Tensor]:
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.full((3,), value)
    return [p]


def test_scaler_hysteresis_growth_and_reporting(caplog):
    scaler = AdaptiveLossScaler(init_scale=1024.0, growth_interval=3, hysteresis=2)
    params = _grads(float("inf"))
    with caplog.at_level(logging.WARNING, logger="picotron_lightning.precision"):
        scaler.update(scaler.unscale_and_check(params), step=0)
    assert scaler.scale == 1024.0  # one overflow: no back-off yet
    scaler.update(True, step=1)
    assert scaler.scale == 512.0
    assert [s.step for s in scaler.skipped] == [0, 1]
    assert "skipped optimizer step 0" in caplog.text
    params = _grads(512.0)
    assert not scaler.unscale_and_check(params) and params[0].grad[0] == 1.0  # unscaled in place
    for step in range(2, 5):
        scaler.update(False, step=step)
    assert scaler.scale == 1024.0
    state = scaler.state_dict()
    fresh = AdaptiveLossScaler()
    fresh.load_state_dict(state)
    assert fresh.scale == 1024.0 and fresh.skipped_steps == 2


def test_scaler_floor_and_stop_with_message():
    scaler = AdaptiveLossScaler(init_scale=4.0, min_scale=2.0, hysteresis=1, max_floor_overflows=3)
    scaler.update(True, 0)
    assert scaler.scale == 2.0
    scaler.update(True, 1)
    scaler.update(True, 2)
    assert scaler.scale == 2.0  # never below the floor
    with pytest.raises(LossScaleError, match="stuck at its floor"):
        scaler.update(True, 3)


def test_a_promoted_module_deep_copied_runs_its_own_weights() -> None:
    """The tensor-parallel dry run deep-copies blocks to the meta device; a promoted norm in the copy must call the
    copy's forward (a closure over the original's bound forward ran the CPU weights on meta inputs and failed)."""
    import copy

    import torch
    from torch import nn

    from picotron_lightning.precision.promotion import PromotionManager

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    manager = PromotionManager("cpu")
    manager.bind(model)
    assert manager.promote("1", "test", step=0, source="static")
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.float32  # the promoted norm's output
    shard = copy.deepcopy(model).to("meta")
    out = shard(x.to("meta"))
    assert out.device.type == "meta" and out.dtype == torch.float32
    with torch.no_grad():
        shard_cpu = copy.deepcopy(model)
        shard_cpu[1].weight.fill_(2.0)  # the copy's weights, not the original's, are used
        shard_cpu[1].bias.zero_()
        expected = nn.functional.layer_norm(model[0](x), (4,)) * 2.0
        assert torch.allclose(shard_cpu(x), expected, atol=1e-6)
