"""Expert parallelism trains the tiny-moe Llama exactly like one process on the global batch.

Plain torch loop over real gloo processes: dense gradients averaged over dp with an all-reduce,
expert gradients through ``reduce_expert_gradients``, balancing on (aux 1e-2, z 1e-3, bias 1e-3).
Compared per step: the global loss and the global auxiliary loss; at the end: how far every
parameter (experts: this rank's slice) and every router bias moved.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from picotron_lightning.models.llama import Llama, llama_config
from picotron_lightning.moe import MoELayer, moe_metrics
from picotron_lightning.parallel.expert import (
    convert_moe_layers,
    expert_parameters,
    is_expert_parameter,
    reduce_expert_gradients,
    validate_expert_parallel,
)
from picotron_lightning.testing import init_gloo, run_ranks
from picotron_lightning.topology import LayoutError, ParallelLayout

STEPS = 8
GLOBAL_BATCH = 8
SEQ = 16
LR = 0.5
RTOL = 1e-4


def _model() -> Llama:
    torch.manual_seed(0)
    model = Llama(llama_config("tiny-moe"))
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.balancer.bias_update_rate = 1e-3
    return model


def _batches() -> torch.Tensor:
    # Learnable sequences (x -> 5x + 3 mod 64 from a random start), so the loss really falls.
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, 64, (STEPS, GLOBAL_BATCH, 1), generator=g)
    steps = [start]
    for _ in range(SEQ):
        steps.append((5 * steps[-1] + 3) % 64)
    return torch.cat(steps, dim=-1)


def _loss(model: Llama, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def _aux(model: Llama) -> list[float]:
    return [v["aux_loss"].item() for v in moe_metrics(model).values()]


def _train(model: Llama, batches: torch.Tensor, sync=None) -> tuple[list[float], list[list[float]]]:
    # SGD rather than Adam: Adam is blind to a constant gradient scale, this test must not be.
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, aux = [], []
    for batch in batches:
        loss = _loss(model, batch)
        loss.backward()
        if sync is not None:
            loss = sync(loss.detach())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        aux.append(_aux(model))
    return losses, aux


def _moved(model: Llama, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {n: (p.detach() - start[n]) for n, p in model.named_parameters()}
    out.update({n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")})
    return out


def _ep_worker(rank: int, world: int, ep: int) -> dict:
    init_gloo(rank, world)
    layout = ParallelLayout(data_parallel_size=world, expert_parallel_size=ep).resolve(world)
    mesh = layout.build_expert_mesh("cpu")
    model = _model()
    convert_moe_layers(model, mesh, layout)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    experts = expert_parameters(model)
    assert experts and all(p.shape[0] == 4 // ep for p in experts)
    dense = [p for p in model.parameters() if not is_expert_parameter(p)]
    local = GLOBAL_BATCH // world

    def sync(loss: torch.Tensor) -> torch.Tensor:
        # What a data-parallel strategy does after backward: average dense gradients over dp,
        # then the expert contract.
        flat = torch.cat([p.grad.reshape(-1) for p in dense])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in dense:
            p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
        reduce_expert_gradients(model, mesh)
        dist.all_reduce(loss)
        return loss / world

    batches = _batches()[:, rank * local:(rank + 1) * local]
    losses, aux = _train(model, batches, sync)
    coords = layout.coordinates(rank)
    return {"losses": losses, "aux": aux, "moved": _moved(model, start), "ep_rank": coords.ep}


@pytest.fixture(scope="module")
def reference() -> dict:
    torch.set_num_threads(1)
    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses, aux = _train(model, _batches())
    return {"losses": losses, "aux": aux, "moved": _moved(model, start)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.slow
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)], ids=["ep2-dp2", "ep4-dp4", "ep2-dp4"])
def test_expert_parallel_matches_one_process(reference: dict, world: int, ep: int) -> None:
    results = run_ranks(_ep_worker, world, ep, timeout=240)
    ref_losses = torch.tensor(reference["losses"], dtype=torch.float64)
    assert ref_losses[-1] < ref_losses[0] - 0.05, "the run must actually train"
    for res in results:
        losses = torch.tensor(res["losses"], dtype=torch.float64)
        rel = ((losses - ref_losses).abs() / ref_losses).max().item()
        assert rel <= RTOL, f"loss trajectory differs by {rel:.2e}"
        ref_aux = torch.tensor(reference["aux"], dtype=torch.float64)
        assert ((torch.tensor(res["aux"], dtype=torch.float64) - ref_aux).abs() / ref_aux).max() <= RTOL
        local = 4 // ep
        for name, moved in res["moved"].items():
            want = reference["moved"][name]
            if moved.shape != want.shape:  # expert stacks: this rank's slice of the reference
                want = want[res["ep_rank"] * local:(res["ep_rank"] + 1) * local]
            if name.endswith("expert_bias"):
                assert torch.equal(moved, want), name
                assert want.abs().sum() > 0, "bias balancing must have moved the bias"
            else:
                # Updates, not weights: a wrong gradient scale changes the update by a lot.
                assert _rel(moved, want) <= 10 * RTOL, f"{name}: update differs by {_rel(moved, want):.2e}"


def test_expert_parallel_size_not_dividing_experts_is_refused() -> None:
    # Pure inspection, before any process group exists: nothing can hang.
    model = Llama(llama_config("tiny-moe", num_experts=6))
    with pytest.raises(LayoutError, match=r"expert_parallel_size=4 does not divide num_experts=6 of MoE layer"
                                          r" 'layers.0.mlp'. Sizes that would work: expert_parallel_size in"
                                          r" \[1, 2, 3, 6\]"):
        validate_expert_parallel(model, 4)
    validate_expert_parallel(model, 3)


def test_expert_parallel_size_not_dividing_dp_is_refused() -> None:
    with pytest.raises(LayoutError, match="expert_parallel_size=3 must divide data_parallel_size=4"):
        ParallelLayout(data_parallel_size=4, expert_parallel_size=3).resolve(4)
