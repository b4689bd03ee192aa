"""``pipeline_split="trace"`` with MoE layers, at ``expert_parallel_size`` 1 and 2.

Each ``MoELayer`` is one opaque custom op in the traced graph whose backward recomputes the layer
(``parallel/pipeline_parallel/traced_moe.py``). The reference ``tiny-moe`` Llama trains like one
process (fp32, relative 1e-4 per step, the plain loop of ``tests/parity.py`` accumulating over the
pipeline's microbatches, since the auxiliary loss is per microbatch), and the routing statistics the
layers keep for monitoring are the one-process ones of the same microbatch: global over the
data-parallel ranks and counted once, although the recompute routes every microbatch twice.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from picotron_lightning.testing import COLLECTIVE_TIMEOUT, run_ranks
from tests.fitting import fit_and_record
from tests.parity import RTOL, TokenDataset, make_data, make_module, max_relative_diff, mean_over_ranks, train_reference

STEPS = 6
MICRO = 2  # samples per data-parallel rank and step: two pipeline microbatches of one sample
TRACE = {"pipeline_parallel_size": 2, "pipeline_split": "trace"}


def _fit(world: int, strategy_kwargs: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
    from picotron_lightning import Picotron3DStrategy
    from picotron_lightning.moe.layer import moe_metrics

    strategy = Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, **strategy_kwargs)
    module = make_module("tiny-moe", config)
    dp = world // strategy_kwargs["pipeline_parallel_size"] // strategy_kwargs.get("tensor_parallel_size", 1)
    loader = DataLoader(TokenDataset(make_data(STEPS * MICRO * dp)), batch_size=MICRO, shuffle=False)
    fitted = fit_and_record(module, loader, strategy=strategy, devices=world, max_steps=STEPS)
    coords = strategy.layout.coordinates(fitted.trainer.global_rank)
    return {
        "losses": fitted.losses, "dp_rank": coords.dp, "mode": strategy.data_parallel_mode,
        "metrics": {name: {k: v.tolist() for k, v in m.items()} for name, m in moe_metrics(module).items()},
        "experts": {n: tuple(p.shape) for n, p in module.named_parameters() if "experts" in n},
        "biases": _expert_biases(module),
    }


def _expert_biases(module: Any) -> dict[str, list[float]]:
    """The routers' bias-balancing offsets this rank holds, by name."""
    return {n: b.tolist() for n, b in module.named_buffers() if n.endswith("expert_bias")}


def _reference(dp: int, config: dict[str, Any] | None = None) -> dict[str, Any]:
    from picotron_lightning.moe.layer import moe_metrics

    out = train_reference(make_module("tiny-moe", config), make_data(STEPS * MICRO * dp), STEPS, MICRO * dp,
                          chunks=MICRO)
    # The layers' statistics are those of the last chunk (= the last microbatch of every replica together).
    metrics = {name: {k: v.tolist() for k, v in m.items()} for name, m in moe_metrics(out["module"]).items()}
    return {"losses": out["losses"], "metrics": metrics, "biases": _expert_biases(out["module"])}


def _check(results: list[dict[str, Any]], dp: int, name: str, config: dict[str, Any] | None = None) -> None:
    ref = _reference(dp, config)
    by_dp = {r["dp_rank"]: r["losses"] for r in results}
    assert len(by_dp) == dp and all(len(losses) == STEPS for losses in by_dp.values()), by_dp
    got = mean_over_ranks(list(by_dp.values()))
    diff = max_relative_diff(got, ref["losses"])
    print(f"trace tiny-moe {name}: max relative diff {diff:.2e}")
    assert diff <= RTOL, (got, ref["losses"])
    held = set()
    for r in results:
        for layer, metrics in r["metrics"].items():
            held.add(layer)
            expected = ref["metrics"][layer]
            # Counts are exact integers: global over dp, and not counted again by the recompute.
            assert metrics["tokens_per_expert"] == expected["tokens_per_expert"], (layer, metrics, expected)
            for key in ("aux_loss", "z_loss", "router_entropy"):
                assert abs(metrics[key] - expected[key]) <= RTOL * abs(expected[key]), (layer, key, metrics, expected)
    assert held == set(ref["metrics"]), (held, set(ref["metrics"]))  # every MoE layer is on some stage
    # Bias balancing moves each router's offsets by +-rate per step from the step's global counts: equal to one
    # process's only if every microbatch was counted once (shape inference counted none).
    compared = set()
    for r in results:
        for name, bias in r["biases"].items():
            compared.add(name)
            assert torch.allclose(torch.tensor(bias), torch.tensor(ref["biases"][name]), atol=1e-6), (name, bias)
    assert compared == set(ref["biases"]), (compared, set(ref["biases"]))


# Bias balancing instead of an auxiliary loss (as OOM recovery needs): the routers' offsets follow the counts.
BIAS_BALANCING = {"moe_aux_loss_coeff": 0.0, "moe_bias_update_rate": 1e-2}


FOUR_LAYERS = {"num_layers": 4}  # two traced stages per rank under zbv


def _world2(rank: int, world: int) -> dict[str, Any]:
    return {"1f1b": _fit(world, TRACE),
            "zbv": _fit(world, {**TRACE, "pipeline_schedule": "zbv"}, FOUR_LAYERS),
            "structural_bias": _fit(world, {"pipeline_parallel_size": 2}, BIAS_BALANCING)}


@pytest.fixture(scope="module")
def world2() -> list[dict[str, Any]]:
    return run_ranks(_world2, 2, timeout=900)


@pytest.mark.slow
def test_traced_pp2_moe_matches_one_process(world2):
    """pp=2 (ep=1) on 2 ranks: one MoE layer per stage, each an opaque op recomputed in backward."""
    _check([r["1f1b"] for r in world2], dp=1, name="pp=2")


@pytest.mark.slow
def test_traced_moe_under_a_zero_bubble_schedule(world2):
    """zbv splits each backward into an input pass and a weight pass: the op's one backward (a recompute)
    must still give each parameter its gradient once and count the routing statistics once."""
    _check([r["zbv"] for r in world2], dp=1, name="pp=2 zbv", config=FOUR_LAYERS)


@pytest.mark.slow
def test_bias_balancing_counts_each_microbatch_once(world2, world4):
    """Before a schedule's first step torch infers the stages' shapes by running them once, a backward included on
    the later stages: that pass must not count as a microbatch for bias balancing (measured before the fix: the last
    stage counted 9 microbatches' tokens instead of 8 in the first step, and pp=2 x dp=2 drifted 5e-5 from one
    process). The structural split on 2 ranks, and the traced split as 2 replicas of 2 stages on 4."""
    _check([r["structural_bias"] for r in world2], dp=1, name="pp=2 structural, bias balancing", config=BIAS_BALANCING)
    _check([r["dp2_bias"] for r in world4], dp=2, name="pp=2 x dp=2, bias balancing", config=BIAS_BALANCING)


def _world4(rank: int, world: int) -> dict[str, Any]:
    return {"ep2": _fit(world, {**TRACE, "expert_parallel_size": 2}),
            "tp2": _fit(world, {**TRACE, "tensor_parallel_size": 2}),
            "fsdp": _fit(world, {**TRACE, "data_parallel_mode": "fsdp"}),
            "dp2_bias": _fit(world, {**TRACE, "data_parallel_mode": "ddp"}, BIAS_BALANCING)}


@pytest.fixture(scope="module")
def world4() -> list[dict[str, Any]]:
    return run_ranks(_world4, 4, timeout=1500)


@pytest.mark.slow
def test_traced_pp2_ep2_matches_one_process(world4):
    """pp=2 x ep=2 on 4 ranks (ep drawn from dp=2): each rank holds 2 of the 4 experts per layer, tokens
    travel by all-to-all inside the op (twice: forward and recompute), the dense parameters are averaged
    over the replicas and the experts are not (they differ across the ep ranks)."""
    results = [r["ep2"] for r in world4]
    assert all(r["mode"] == "ddp" for r in results)  # the traced stages as replicas
    for r in results:  # each rank holds half of each layer's experts
        assert r["experts"] and all(shape[0] == 2 for shape in r["experts"].values()), r["experts"]
    _check(results, dp=2, name="pp=2 x ep=2")


@pytest.mark.slow
def test_traced_pp2_tp2_moe_matches_one_process(world4):
    """pp=2 x tp=2 on 4 ranks: attention's linears as local twins between the Megatron ops, the MoE layer
    whole on every tp rank (same tokens, same gradients: no tp reduction of its parameters)."""
    _check([r["tp2"] for r in world4], dp=1, name="pp=2 x tp=2")


@pytest.mark.slow
def test_traced_pp2_dp2_fsdp_moe_matches_one_process(world4):
    """pp=2 x dp=2 with FSDP2 on 4 ranks: the opaque MoE op runs over FSDP2's gathered parameters and its
    recomputed gradients reach the unsharded parameters that FSDP2 reduce-scatters."""
    results = [r["fsdp"] for r in world4]
    assert all(r["mode"] == "fsdp" for r in results)
    _check(results, dp=2, name="pp=2 x dp=2 fsdp")


class _StackedExperts(nn.Module):
    """Experts stored as ``(E, ...)`` stacks, called with the routing (the Hugging Face MoE layout)."""

    def __init__(self, experts: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(experts, 2 * hidden, hidden))
        self.down_proj = nn.Parameter(torch.zeros(experts, hidden, hidden))


class _HFStyleMoE(nn.Module):
    def __init__(self, experts: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = _StackedExperts(experts, hidden)


def test_trace_accepts_moe_layers_and_refuses_other_moe_blocks():
    from picotron_lightning.models.llama import Llama, llama_config
    from picotron_lightning.parallel.pipeline_parallel import PipelineSplitError, check_traceable_layout
    from picotron_lightning.topology import ParallelLayout

    moe = Llama(llama_config("tiny-moe", num_layers=2))
    check_traceable_layout(moe, ParallelLayout(pipeline_parallel_size=2).resolve(2))
    check_traceable_layout(moe, ParallelLayout(pipeline_parallel_size=2, expert_parallel_size=2).resolve(4))
    block = nn.Sequential(nn.Linear(8, 8), _HFStyleMoE())
    with pytest.raises(PipelineSplitError, match="MoE layers of the class picotron_lightning.moe.MoELayer only; "
                                                 "'1' is a _HFStyleMoE.*pipeline_split=\"structural\""):
        check_traceable_layout(block, ParallelLayout(pipeline_parallel_size=2).resolve(2))
