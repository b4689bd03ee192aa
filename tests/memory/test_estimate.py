"""The per-rank memory estimate against the live bytes of real training steps on gloo ranks.

For each layout, ``Trainer.fit`` runs on real ranks with each checkpointing mode and measures the
live tensor bytes of a steady step per rank (``PeakProbe``: the smallest peak of steps 3 to 5); the
estimate, made in this process before any rank exists, must be within 5% of every rank's measurement.
"""

from __future__ import annotations

import functools

import pytest

from picotron_lightning.memory.estimate import estimate_memory
from picotron_lightning.memory.options import MemoryOptions
from picotron_lightning.options import Picotron3DOptions
from picotron_lightning.parallel.data import DataParallelOptions
from picotron_lightning.testing import run_ranks
from picotron_lightning.topology import ParallelLayout
from tests.memory.mem_runs import CHECKPOINTING, build_module, measured_peaks, sample_batch

TOLERANCE = 0.05

LAYOUTS = {
    # name: (strategy kwargs, layout, data-parallel mode[, model preset])
    "ddp": ({"data_parallel_mode": "ddp"}, ParallelLayout(2, 1, 1, 1), "ddp"),
    "fsdp": ({"data_parallel_mode": "fsdp"}, ParallelLayout(2, 1, 1, 1), "fsdp"),
    "tp2": ({"tensor_parallel_size": 2}, ParallelLayout(1, 2, 1, 1), "fsdp"),
    "pp2": ({"pipeline_parallel_size": 2}, ParallelLayout(1, 1, 2, 1), "fsdp"),
    "ep2": ({"expert_parallel_size": 2, "data_parallel_mode": "ddp"}, ParallelLayout(2, 1, 1, 2), "ddp", "tiny-moe"),
    # Models the package did not write (mem_runs.FOREIGN): Hugging Face GPT-2 and Llama, a plain GPT.
    "gpt2_fsdp": ({"data_parallel_mode": "fsdp"}, ParallelLayout(2, 1, 1, 1), "fsdp", "gpt2"),
    "gpt2_ddp": ({"data_parallel_mode": "ddp"}, ParallelLayout(2, 1, 1, 1), "ddp", "gpt2"),
    "gpt_fsdp": ({"data_parallel_mode": "fsdp"}, ParallelLayout(2, 1, 1, 1), "fsdp", "gpt"),
    "hf_llama_tp2": ({"tensor_parallel_size": 2}, ParallelLayout(1, 2, 1, 1), "fsdp", "hf"),
    # GPT-2 with a vocabulary of 101: the head's columns shard unevenly (51 and 50), the two ranks' peaks differ.
    "gpt2_tp2": ({"tensor_parallel_size": 2}, ParallelLayout(1, 2, 1, 1), "fsdp", "gpt2"),
    "dp2_tp2": ({"tensor_parallel_size": 2, "data_parallel_mode": "fsdp"}, ParallelLayout(2, 2, 1, 1), "fsdp"),
    # HSDP on 4 ranks: 2 replicas of 2-rank shard groups.
    "hsdp": ({"data_parallel_mode": "hsdp", "hsdp_shard_size": 2}, ParallelLayout(4, 1, 1, 1), "hsdp"),
    "pp2_dp2": ({"pipeline_parallel_size": 2, "data_parallel_mode": "fsdp"}, ParallelLayout(2, 1, 2, 1), "fsdp"),
    # 3D on 8 ranks: FSDP2 over dp inside each (stage, tp rank).
    "pp2_dp2_tp2": ({"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "data_parallel_mode": "fsdp"},
                    ParallelLayout(2, 2, 2, 1), "fsdp"),
}


# The 8-rank layout (four 8-process launches on 2 cores: about 15 minutes under load) is a large run.
@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.large) if n == "pp2_dp2_tp2" else n
                                  for n in LAYOUTS])
def test_estimate_within_5_percent_of_measured_peak(name: str) -> None:
    strategy_kwargs, layout, dp_mode, *preset = LAYOUTS[name]
    model = preset[0] if preset else "tiny"
    measured = run_ranks(measured_peaks, layout.world_size, strategy_kwargs, model, timeout=900)
    config = Picotron3DOptions(data_parallel=DataParallelOptions(
        mode=dp_mode, hsdp_shard_size=strategy_kwargs.get("hsdp_shard_size", "auto")))
    for mode in CHECKPOINTING:
        # The measured runs train on the batch the estimate traces (mem_runs.py), so the MoE estimate charges that
        # batch's routing here, not the worst case (tests/memory/test_routing_bound.py checks that bound).
        memory = MemoryOptions(activation_checkpointing=mode, moe_routing="measured")
        estimates = estimate_memory(functools.partial(build_module, model), sample_batch(model), layout, options=config,
                                    memory=memory, ranks=range(layout.world_size), allow_real_trace=True)
        for est in estimates:
            real = measured[est.rank][mode]
            assert real["dp_mode"] == (dp_mode if layout.dp > 1 else "none")
            error = abs(est.traced_peak - real["peak"]) / real["peak"]
            print(f"{name} {mode} rank {est.rank}: estimated {est.traced_peak / 2**20:.3f} MiB ({est.method}), "
                  f"measured {real['peak'] / 2**20:.3f} MiB, {100 * error:.2f}%")
            assert error <= TOLERANCE, (name, mode, est.rank, est.method, est.breakdown.as_dict(), real)
            # DDP's gradients are views into its buckets: counted once, as gradients (the fake trace's replica keeps
            # them through the step); the buckets' size is reported for what no dispatched op allocates.
            assert est.comm_buffers == 0 and est.peak == est.traced_peak, est
            grads = sum(p.numel() * 4 for p in build_module(model).parameters())
            if dp_mode != "ddp" or layout.dp == 1:
                assert est.gradient_buckets == 0, est
            elif layout.ep == 1:
                assert est.gradient_buckets == grads, est
            else:  # the experts' gradients are averaged apart from DDP (parameters_to_ignore): not in its buckets
                assert 0 < est.gradient_buckets < grads, est


def test_checkpointing_modes_order_the_estimate() -> None:
    """Fake-tensor trace, one process: full < selective < none in activation bytes."""
    layout = ParallelLayout(2, 1, 1, 1)
    config = Picotron3DOptions(data_parallel=DataParallelOptions(mode="fsdp"))
    acts = {mode: estimate_memory(build_module, sample_batch(), layout, options=config,
                                  checkpointing=mode)[0] for mode in CHECKPOINTING}
    assert all(e.method == "fake" for e in acts.values())
    a = {m: e.breakdown.activations for m, e in acts.items()}
    assert a["full"] < a["selective"] < a["none"], a
    # Model states: FSDP over 2 ranks holds half of the parameters (plus padding) on each.
    full_params = sum(p.numel() * 4 for p in build_module().parameters())
    assert abs(acts["none"].breakdown.params - full_params / 2) / (full_params / 2) < 0.02
