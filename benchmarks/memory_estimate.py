"""Predicted vs measured per-rank peak memory of one training step, for layouts x checkpointing modes.

    PYTHONPATH=. python benchmarks/memory_estimate.py [--layouts ddp,fsdp,tp2,pp2,dp2-tp2,hsdp]

The prediction (``estimate_memory``) is made in this process before any rank starts; the
measurement is ``Trainer.fit`` on real gloo ranks with ``PeakProbe`` (live tensor bytes of the
smallest of the third to fifth steps). Prints one Markdown table row per (layout, mode, rank).
"""

from __future__ import annotations

import argparse
import functools

import torch

LAYOUTS = {
    "ddp": ({"data_parallel_mode": "ddp"}, (2, 1, 1), "ddp"),
    "fsdp": ({"data_parallel_mode": "fsdp"}, (2, 1, 1), "fsdp"),
    "tp2": ({"tensor_parallel_size": 2}, (1, 2, 1), "fsdp"),
    "pp2": ({"pipeline_parallel_size": 2}, (1, 1, 2), "fsdp"),
    "dp2-tp2": ({"tensor_parallel_size": 2}, (2, 2, 1), "fsdp"),
    "hsdp": ({"data_parallel_mode": "hsdp", "hsdp_shard_size": 2}, (4, 1, 1), "hsdp"),
}
MODES = ("none", "selective", "full")
MICRO, SEQ = 4, 16


def _measure(rank: int, world: int, strategy_kwargs: dict) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from picotron_lightning import Picotron3DStrategy
    from picotron_lightning.models import CausalLMModule
    from picotron_lightning.testing_memory import PeakProbe

    out = {}
    data = torch.randint(0, 256, (64, SEQ + 1), generator=torch.Generator().manual_seed(0))
    for mode in MODES:
        probe = PeakProbe(steps=(2, 3, 4))
        trainer = L.Trainer(strategy=Picotron3DStrategy(memory={"activation_checkpointing": mode}, **strategy_kwargs),
                            accelerator="cpu", devices=world, max_steps=5, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
        trainer.fit(CausalLMModule("tiny", seed=0), DataLoader(data, batch_size=MICRO))
        out[mode] = probe.peak
    return out


def main() -> None:
    from picotron_lightning.memory.estimate import estimate_memory
    from picotron_lightning.models import CausalLMModule
    from picotron_lightning.options import Picotron3DOptions
    from picotron_lightning.parallel.data import DataParallelOptions
    from picotron_lightning.testing import run_ranks
    from picotron_lightning.topology import ParallelLayout

    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    print("| layout | checkpointing | rank | trace | predicted (KiB) | measured (KiB) | error |")
    print("|---|---|---|---|---|---|---|")
    for name in args.layouts.split(","):
        kwargs, (dp, tp, pp), dp_mode = LAYOUTS[name]
        layout = ParallelLayout(dp, tp, pp, 1)
        measured = run_ranks(_measure, layout.world_size, kwargs, timeout=1800)
        config = Picotron3DOptions(data_parallel=DataParallelOptions(
            mode=dp_mode, hsdp_shard_size=kwargs.get("hsdp_shard_size", "auto")))
        build = functools.partial(CausalLMModule, "tiny", seed=0)
        batch = torch.zeros(MICRO, SEQ + 1, dtype=torch.long)
        for mode in MODES:
            for est in estimate_memory(build, batch, layout, options=config, checkpointing=mode,
                                       ranks=range(layout.world_size), allow_real_trace=True):
                real = measured[est.rank][mode]
                error = (est.traced_peak - real) / real
                print(f"| {name} | {mode} | {est.rank} | {est.method} | {est.traced_peak / 1024:.1f} | "
                      f"{real / 1024:.1f} | {error:+.2%} |", flush=True)


if __name__ == "__main__":
    main()
