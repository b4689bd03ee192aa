"""Predicted FLOPs and per-dimension communication bytes equal the counted ones, on real gloo ranks.

Each layout runs ``parallelize`` (the strategy's own steps) on real ranks and counts the third
training step with :class:`~picotron_lightning.planner.comm_count.CommCounter` (every c10d and
functional collective, attributed to its mesh dimension by its group's ranks) and ``FlopCounterMode``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from picotron_lightning.models import CausalLMModule
from picotron_lightning.options import Picotron3DOptions
from picotron_lightning.parallel.data import DataParallelOptions
from picotron_lightning.planner import build_on_meta, describe_model
from picotron_lightning.planner.comm_count import count_step_worker
from picotron_lightning.planner.comm_model import bytes_per_dim, collectives
from picotron_lightning.planner.cost_model import rank_flops
from picotron_lightning.planner.search import Candidate
from picotron_lightning.testing import run_ranks
from picotron_lightning.topology import ParallelLayout

pytestmark = pytest.mark.slow

SEQ, BATCH = 16, 4
MATRIX = [  # (name, world, tp, pp, ep, mode, preset, layers)
    ("dp_ddp", 2, 1, 1, 1, "ddp", "tiny", 2),
    ("dp_fsdp", 2, 1, 1, 1, "fsdp", "tiny", 2),
    ("tp", 2, 2, 1, 1, "fsdp", "tiny", 2),
    ("pp", 2, 1, 2, 1, "fsdp", "tiny", 2),
    ("ep", 2, 1, 1, 2, "fsdp", "tiny-moe", 2),
    ("dp_tp", 4, 2, 1, 1, "fsdp", "tiny", 2),
    ("tp_pp", 4, 2, 2, 1, "fsdp", "tiny", 4),
]


def _merge(predicted: dict[str, dict[str, int]], groups: dict[str, str]) -> dict[str, dict[str, int]]:
    merged: dict[str, dict[str, int]] = {}
    for dim, kinds in predicted.items():
        key = groups.get(dim, dim)
        for kind, n in kinds.items():
            merged.setdefault(key, {}).setdefault(kind, 0)
            merged[key][kind] += n
    return merged


@pytest.mark.parametrize("name, world, tp, pp, ep, mode, preset, layers", MATRIX, ids=[m[0] for m in MATRIX])
def test_predicted_equals_counted(name, world, tp, pp, ep, mode, preset, layers) -> None:
    layout = ParallelLayout("auto", tp, pp, ep).resolve(world)
    options = Picotron3DOptions(layout=layout, data_parallel=DataParallelOptions(mode=mode))
    build = functools.partial(CausalLMModule, preset, {"num_layers": layers})
    spec = describe_model(build_on_meta(build), SEQ)
    counted = run_ranks(count_step_worker, world, build, layout, options, torch.randint(0, 256, (BATCH, SEQ + 1)),
                        timeout=600)
    micro = 1 if pp > 1 else BATCH  # the pipeline cuts each rank's 4 samples into 4 microbatches of 1
    m = BATCH // micro
    c = Candidate(layout.dp, tp, pp, ep, mode, "none", "1f1b", 1, m, micro, layout.dp if mode == "fsdp" else 1)
    # Dimensions over identical ranks are one group on the wire (dp == ep at ep == dp).
    shared = {"dp": "dp+ep", "ep": "dp+ep"} if ep > 1 and layout.dp == ep else {}
    ep_bytes: dict[str, int] = {}
    for rank, result in enumerate(counted):
        assert not result["unknown"], result["unknown"]
        stage = result["coordinates"]["pp"]
        predicted = _merge(bytes_per_dim(collectives(spec, c, stage=stage)), shared)
        got = {d: dict(k) for d, k in result["bytes"].items()}
        # The loss broadcast from the last stage is a pickled object: its call count is predicted, not its size.
        if "pp" in got:
            assert result["calls"]["pp"].pop("broadcast") == 2
            got["pp"].pop("broadcast")
        if ep > 1:  # received rows depend on routing: compare the ep group's total below, per rank the rest
            key = shared.get("ep", "ep")
            ep_bytes[str(rank)] = got[key].pop("all_to_all")
            predicted_a2a = predicted[key].pop("all_to_all")
        assert got == predicted, (rank, got, predicted)
        if pp == 1 and tp == 1 and ep == 1:  # (MoE: routed rows per rank depend on the routing)
            assert result["flops"] == pytest.approx(rank_flops(spec, c), rel=1e-9)
    if ep > 1:
        assert sum(ep_bytes.values()) == ep * predicted_a2a
        assert len(set(ep_bytes.values())) > 1  # routing really was uneven: the total is what is predictable
    if pp > 1 and tp == 1:  # every stage's FLOPs: the most loaded (the last, with the head) is predicted
        assert max(r["flops"] for r in counted) == pytest.approx(rank_flops(spec, c), rel=1e-9)
