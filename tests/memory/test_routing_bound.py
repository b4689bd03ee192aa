"""The MoE memory estimate with expert parallelism is a bound over batches (``memory.moe_routing="worst_case"``).

The unit tests check the forced routing's counts against the bound's formula. The 2-rank test (tiny-moe, ep=2,
FSDP2, dropless and ``capacity_factor=1.5``) makes a model whose routing sends every token of both ranks to rank
0's experts (the router's choice-only ``expert_bias``, +10 on experts 0 and 1) and measures its real step on
real gloo ranks; the worst-case estimate of the ordinary model must be at least that peak, while the estimate
of the batch's own routing (the old behaviour, ``"measured"``) is below it.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from picotron_lightning.memory.routing import worst_case_choice

MIB = 1 << 20
MICRO = 8  # samples of 17 tokens per rank: 136 tokens


@pytest.mark.parametrize(("tokens", "top_k", "experts", "local", "capacity"), [
    (8, 2, 4, 2, None), (8, 2, 4, 2, 2), (8, 2, 4, 2, 4), (6, 3, 4, 2, 3), (5, 2, 8, 2, 1), (16, 2, 4, 4, 8),
    (136, 2, 4, 2, 68), (10, 1, 8, 4, 2),
])
@pytest.mark.parametrize("target", [0, 1])
def test_worst_case_choice_sends_the_bound_to_the_target(tokens: int, top_k: int, experts: int, local: int,
                                                         capacity: int | None, target: int) -> None:
    first = target * local if target * local < experts else 0
    choice = worst_case_choice(tokens, top_k, experts, first, local, capacity)
    assert choice.shape == (tokens, top_k)
    assert all(len(set(row.tolist())) == top_k for row in choice)  # a token picks distinct experts
    counts = torch.bincount(choice.reshape(-1), minlength=experts)
    kept = counts if capacity is None else counts.clamp(max=capacity)
    m = min(top_k, local)
    per_expert = tokens if capacity is None else min(tokens, capacity)
    # What the target receives from one sending rank: all it can take (tokens x distinct local picks, or capacity).
    assert kept[first:first + local].sum().item() == min(tokens * m, local * per_expert)
    if capacity is None:
        assert kept[first:first + local].max().item() == tokens  # one expert gets every token (padded bmm's worst)
    else:
        # What does not fit there is placed where it is kept, as far as the other experts' capacity allows.
        others = experts - local
        spill = tokens * top_k - kept[first:first + local].sum().item()
        assert kept.sum().item() >= kept[first:first + local].sum().item() + min(spill, others * capacity,
                                                                                  tokens * min(top_k, others))


def _skewed_module(capacity_factor: float | None):  # noqa: ANN202 - a LightningModule from tests.parity
    """tiny-moe whose routers choose experts 0 and 1 (rank 0's under ep=2) for every token: the bias changes the
    choice only, never the gate weights."""
    from picotron_lightning.moe.layer import MoELayer
    from tests.parity import make_module

    module = make_module("tiny-moe", {"moe_capacity_factor": capacity_factor})
    for layer in module.modules():
        if isinstance(layer, MoELayer):
            layer.router.expert_bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))
    return module


def _bound_and_skewed_peaks(rank: int, world: int) -> dict[str, dict[str, int]]:
    from picotron_lightning.memory.estimate import estimate_memory
    from picotron_lightning.memory.options import MemoryOptions
    from picotron_lightning.options import Picotron3DOptions
    from picotron_lightning.parallel.data import DataParallelOptions
    from picotron_lightning.testing import init_gloo
    from picotron_lightning.topology import ParallelLayout
    from tests.parity import make_data, make_module

    init_gloo(rank, world)
    layout = ParallelLayout("auto", 1, 1, 2).resolve(2)
    options = Picotron3DOptions(data_parallel=DataParallelOptions(mode="fsdp"))
    batch = make_data(MICRO)
    out: dict[str, dict[str, int]] = {}
    for name, cf in (("dropless", None), ("capacity", 1.5)):
        def peak(build, routing: str) -> int:  # noqa: ANN001 - the worst rank's peak of one real step
            estimates = estimate_memory(build, batch, layout, options=options, ranks=[0, 1], in_process_group=True,
                                        memory=MemoryOptions(moe_routing=routing))
            assert {e.routing for e in estimates} == {routing.replace("_", " ")}, estimates
            return max(e.peak for e in estimates)

        ordinary = functools.partial(make_module, "tiny-moe", {"moe_capacity_factor": cf})
        out[name] = {"bound": peak(ordinary, "worst_case"), "one_batch": peak(ordinary, "measured"),
                     "skewed": peak(functools.partial(_skewed_module, cf), "measured")}
    return out


@pytest.mark.slow
def test_ep2_estimate_bounds_a_batch_routed_to_one_rank() -> None:
    from picotron_lightning.testing import run_ranks

    runs = run_ranks(_bound_and_skewed_peaks, 2, timeout=600)
    assert runs[0] == runs[1]  # every rank gathered every rank's estimate
    for name, peaks in runs[0].items():
        print(f"{name}: " + ", ".join(f"{k} {v / MIB:.3f} MiB" for k, v in peaks.items()))
        assert peaks["bound"] >= peaks["skewed"], (name, peaks)
        assert peaks["one_batch"] < peaks["skewed"], (name, peaks)  # the gap the bound closes is real here
    # Dropless, the skewed routing is the worst case itself (every token on experts 0 and 1): the bound is attained.
    assert math.isclose(runs[0]["dropless"]["bound"], runs[0]["dropless"]["skewed"], rel_tol=0.01), runs[0]
