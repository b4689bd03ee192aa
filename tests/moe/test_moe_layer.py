"""Single-process behaviour of Router, ExpertLayer, LoadBalancer and MoELayer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from picotron_lightning.moe import ExpertLayer, MoELayer, Router, grouped_matmul, sort_by_expert

torch.set_num_threads(1)


def _naive_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Loop over tokens and their chosen experts: the definition the fast path must match."""
    tokens = x.reshape(-1, x.shape[-1])
    route = layer.router(tokens)
    w1, w2 = layer.experts.gate_up_proj, layer.experts.down_proj
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(layer.top_k):
            e = route.indices[t, j]
            gate, up = (tokens[t] @ w1[e]).chunk(2)
            out[t] = out[t] + route.weights[t, j] * ((F.silu(gate) * up) @ w2[e])
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(tokens)
    return out.view_as(x)


def test_routing_matches_hand_computed_example() -> None:
    router = Router(hidden_size=2, num_experts=3, top_k=2)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    out = router(x)
    # Token 0: logits (2, 0, 2) -> softmax (e^2, 1, e^2) / (2e^2 + 1); top-2 = experts 0 and 2, tied,
    # renormalised to 1/2 each. Token 1: logits (0, 1, 1) -> experts 1 and 2, 1/2 each.
    e2 = math.exp(2.0)
    assert torch.allclose(out.scores[0], torch.tensor([e2, 1.0, e2]) / (2 * e2 + 1))
    assert sorted(out.indices[0].tolist()) == [0, 2]
    assert sorted(out.indices[1].tolist()) == [1, 2]
    assert torch.allclose(out.weights, torch.full((2, 2), 0.5))
    assert torch.allclose(out.logits, torch.tensor([[2.0, 0.0, 2.0], [0.0, 1.0, 1.0]]))
    # Without renormalisation the weights are the raw probabilities.
    router.renormalize = False
    raw = router(x).weights
    assert torch.allclose(raw[0], torch.full((2,), e2 / (2 * e2 + 1)))
    assert torch.allclose(raw[1], torch.full((2,), math.e / (2 * math.e + 1)))


def test_sigmoid_scores_and_route_scale() -> None:
    router = Router(hidden_size=2, num_experts=3, top_k=1, score_func="sigmoid", route_scale=2.5)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    out = router(torch.tensor([[0.0, 3.0]]))
    assert out.indices.tolist() == [[1]]
    assert torch.allclose(out.scores, torch.sigmoid(torch.tensor([[0.0, 3.0, 0.0]])))
    assert torch.allclose(out.weights, torch.tensor([[2.5]]))  # renormalised to 1, then scaled
    assert torch.allclose(out.probs.sum(-1), torch.ones(1))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_gate_weights_sum_to_route_scale(score_func: str) -> None:
    router = Router(16, 8, top_k=3, score_func=score_func, route_scale=1.5)
    weights = router(torch.randn(50, 16)).weights
    assert weights.dtype == torch.float32
    assert torch.allclose(weights.sum(-1), torch.full((50,), 1.5), atol=1e-6)


def test_router_runs_in_fp32_for_bf16_inputs() -> None:
    router = Router(16, 4).to(torch.bfloat16)
    out = router(torch.randn(10, 16, dtype=torch.bfloat16))
    assert out.logits.dtype == out.weights.dtype == torch.float32


def test_bias_changes_choice_not_weights() -> None:
    router = Router(4, 4, top_k=1, renormalize=False)
    x = torch.randn(20, 4)
    before = router(x)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    after = router(x)
    assert (after.indices == 0).all()
    assert torch.allclose(after.weights, before.scores[:, :1])  # unbiased score of expert 0


def test_sort_by_expert_counts_and_drops() -> None:
    # 4 tokens, top-2: experts per token (0,1) (0,2) (0,1) (3,0). Expert 0 gets 4 assignments.
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    order, kept, full, dropped = sort_by_expert(indices, 4, capacity=2)
    assert full.tolist() == [4, 2, 1, 1]
    assert kept.tolist() == [2, 2, 1, 1]
    assert dropped.item() == 2
    # Expert 0 keeps the first two assignments in token order: flat positions 0 and 2.
    assert order.tolist()[:2] == [0, 2]
    assert (order // 2).tolist() == [0, 1, 0, 2, 1, 3]


def test_dropped_tokens_are_reported_and_contribute_nothing() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, 16, num_experts=4, top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # everything to expert 0
    x = torch.randn(1, 16, 8)
    out = layer(x)
    # capacity = ceil(0.5 * 16 * 1 / 4) = 2: tokens 0 and 1 are served, 14 of 16 dropped.
    metrics = layer.moe_metrics()
    assert metrics["dropped_fraction"].item() == pytest.approx(14 / 16)
    assert metrics["tokens_per_expert"].tolist() == [16.0, 0.0, 0.0, 0.0]
    assert torch.count_nonzero(out[0, 2:]) == 0
    layer.capacity_factor = None
    assert torch.allclose(layer(x)[0, :2], out[0, :2])


@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped_mm", "padded_bmm"])
def test_grouped_matmul_equals_per_group_matmul(use_grouped_mm: bool) -> None:
    if use_grouped_mm and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    counts = torch.tensor([3, 0, 5, 1])  # includes an empty group
    x = torch.randn(9, 8, requires_grad=True)
    w = torch.randn(4, 8, 12, requires_grad=True)  # rows of 16-byte multiples, as the kernel needs
    out = grouped_matmul(x, w, counts, use_grouped_mm=use_grouped_mm)
    out.sum().backward()  # a stride-0 gradient: the case torch._grouped_mm rejects on its own
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    bounds = torch.cumsum(counts, 0).tolist()
    ref = torch.cat([x[s - c:s] @ w[g] for g, (s, c) in enumerate(zip(bounds, counts.tolist(), strict=True))])
    ref.sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(gx, x.grad, atol=1e-5) and torch.allclose(gw, w.grad, atol=1e-5)
    assert gw[1].abs().sum() == 0


@pytest.mark.parametrize("num_shared", [0, 1])
@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped_mm", "padded_bmm"])
def test_moe_layer_matches_naive_loop(use_grouped_mm: bool, num_shared: int) -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 24, num_experts=6, top_k=2, num_shared_experts=num_shared, aux_loss_coeff=0.0,
                     z_loss_coeff=0.0)
    layer.experts.use_grouped_mm = use_grouped_mm
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0, 0, 0, 0, -9.0, -9.0]))  # experts 4, 5 stay empty
    x = torch.randn(2, 5, 16)
    out = layer(x)
    ref = _naive_moe(layer, x)
    assert torch.allclose(out, ref, atol=1e-6)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    ref.square().sum().backward()
    for n, p in layer.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n
    assert grads["experts.gate_up_proj"][4:].abs().sum() == 0  # empty experts get zero gradient


def test_aux_gradient_reaches_router_without_user_loss() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    layer = MoELayer(16, 24, num_experts=4, top_k=2, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    out = layer(x)
    out.sum().backward()  # the user's loss knows nothing about balancing
    injected = layer.router.weight.grad.clone()
    # The same gradient from a loss that adds the balancing terms by hand, injection off.
    layer.zero_grad()
    layer.balancer.aux_loss_coeff = layer.balancer.z_loss_coeff = 0.0
    out = layer(x)
    route = layer.router(x.reshape(-1, 16))
    counts = torch.bincount(route.indices.reshape(-1), minlength=4).float()
    aux = 4 * (counts / (16 * 2) * route.probs.mean(0)).sum()
    z = torch.logsumexp(route.logits, -1).pow(2).mean()
    (out.sum() + 0.1 * aux + 0.01 * z).backward()
    assert torch.allclose(injected, layer.router.weight.grad, rtol=1e-5, atol=1e-8)
    layer.zero_grad()
    layer(x).sum().backward()
    assert not torch.allclose(injected, layer.router.weight.grad, rtol=1e-3)
    assert layer.moe_metrics()["aux_loss"].item() == pytest.approx(aux.item(), rel=1e-6)


def test_aux_loss_scale_scales_injected_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 32, 16)
    layer = MoELayer(16, 24, num_experts=4, top_k=2, aux_loss_coeff=1.0, z_loss_coeff=0.0)
    grads = []
    for scale in (1.0, 0.25):
        layer.balancer.aux_loss_scale = scale
        layer.zero_grad()
        (layer(x) * 0).sum().backward()  # only the injected gradient remains
        grads.append(layer.router.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[1], 0.25 * grads[0], atol=1e-9)


def test_no_statistics_or_bias_update_without_backward() -> None:
    layer = MoELayer(16, 24, num_experts=4, bias_update_rate=0.1)
    with torch.no_grad():
        layer(torch.randn(1, 8, 16))
    layer.balancer.update_bias()
    assert layer.router.expert_bias.abs().sum() == 0


def _imbalance(layer: MoELayer, x: torch.Tensor) -> float:
    with torch.no_grad():
        layer(x)
    return layer.moe_metrics()["load_imbalance"].item()


@pytest.mark.parametrize("rate", [0.0, 0.01])
def test_bias_balancing_evens_out_skewed_router(rate: float) -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 8, num_experts=8, top_k=2, aux_loss_coeff=0.0, z_loss_coeff=0.0,
                     bias_update_rate=rate)
    with torch.no_grad():
        layer.router.weight.normal_(std=0.3)
        layer.router.weight[0] += 0.3  # with inputs shifted by +0.3, a router that loves experts 0 and 1
        layer.router.weight[1] += 0.24
    g = torch.Generator().manual_seed(1)
    held_out = torch.randn(8, 64, 16, generator=g) + 0.3
    start = _imbalance(layer, held_out)
    # lr 0: the optimizer step moves no weight but still triggers the bias update.
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    late = []
    for step in range(60):
        layer(torch.randn(4, 32, 16, generator=g) + 0.3).sum().backward()
        opt.step()
        opt.zero_grad()
        if step >= 40:
            late.append(_imbalance(layer, held_out))
    assert start > 2.0
    if rate:
        # sign() updates keep jittering around balance; judge the average of the last steps.
        assert sum(late) / len(late) < 1.5, f"imbalance {start:.2f} -> {late}"
        assert layer.router.expert_bias[0] < 0 < layer.router.expert_bias[5]
        route = layer.router(held_out.reshape(-1, 16))
        assert torch.allclose(route.weights.sum(-1), torch.ones(512), atol=1e-6)  # weights stay unbiased
    else:
        assert late[-1] == start


def test_metrics_keys_and_values() -> None:
    layer = MoELayer(16, 8, num_experts=4, top_k=1)
    assert layer.moe_metrics() == {}
    layer(torch.randn(2, 8, 16))
    m = layer.moe_metrics()
    assert set(m) == {"tokens_per_expert", "load_imbalance", "load_cv", "dropped_fraction", "router_entropy",
                      "aux_loss", "z_loss"}
    counts = m["tokens_per_expert"]
    assert counts.sum().item() == 16
    assert m["load_imbalance"].item() == pytest.approx((counts.max() / counts.mean()).item())
    assert 0 < m["router_entropy"].item() <= math.log(4) + 1e-6


class _GeluExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def test_custom_expert_modules() -> None:
    torch.manual_seed(0)
    experts = ExpertLayer(8, 12, num_experts=3, expert_factory=_GeluExpert)
    assert experts.custom__fc1__weight.shape == (3, 12, 8)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 8, requires_grad=True)
    out = experts(x, counts)
    out.sum().backward()
    # The same computation with ordinary modules holding expert e's slice.
    ref = []
    for e, rows in zip((0, 2), (x[:2], x[2:]), strict=True):
        m = _GeluExpert()
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(getattr(experts, "custom__" + name.replace(".", "__"))[e])
        ref.append(m(rows))
    assert torch.allclose(out, torch.cat(ref), atol=1e-6)
    assert experts.custom__fc1__weight.grad[1].abs().sum() == 0
    layer = MoELayer(8, 12, num_experts=3, top_k=2, expert_factory=_GeluExpert)
    assert layer(torch.randn(2, 4, 8)).shape == (2, 4, 8)


def test_llama_moe_variant_uses_moe_layer() -> None:
    from picotron_lightning.models.llama import Llama, llama_config

    model = Llama(llama_config("tiny-moe"))
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(layers) == 2 and layers[0].num_experts == 4
    logits = model(torch.randint(0, 256, (2, 8)))
    logits.float().mean().backward()
    assert layers[0].router.weight.grad is not None and layers[0].experts.gate_up_proj.grad is not None


def test_activation_checkpointing_gives_same_gradients_and_counts_once() -> None:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = MoELayer(16, 24, num_experts=4, top_k=2, bias_update_rate=0.1)
    x = torch.randn(2, 8, 16)
    layer(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in layer.named_parameters()}
    counts = layer.balancer._pending_counts.clone()
    layer.balancer._pending_counts = None
    layer.zero_grad()
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()  # recomputes the forward
    for n, p in layer.named_parameters():
        assert torch.allclose(plain[n], p.grad, atol=1e-7), n
    assert torch.equal(layer.balancer._pending_counts, counts)  # the recompute did not count twice
