"""Step time of Lightning's "ddp" divided by picotron3d's, on 2 CPU processes, in one run.

    python benchmarks/dp_vs_ddp.py [--preset small] [--steps 30] [--rounds 3]

Every configuration trains the same module on the same data; rounds interleave the
configurations so that machine noise hits all of them alike. A ratio >= 1.0 means picotron3d
is at least as fast as Lightning's ddp.
"""

from __future__ import annotations

import argparse
import statistics
import time

CONFIGS = {
    "lightning ddp": ("ddp", {}),
    "picotron3d defaults": ("picotron3d", {}),
    "picotron3d fsdp": ("picotron3d", {"data_parallel_mode": "fsdp"}),
    "picotron3d ddp": ("picotron3d", {"data_parallel_mode": "ddp"}),
    "picotron3d hsdp": ("picotron3d", {"data_parallel_mode": "hsdp", "hsdp_shard_size": 1}),
}


def _worker(rank: int, world: int, preset: str, steps: int, rounds: int, batch: int, seq: int) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from picotron_lightning import Picotron3DStrategy
    from picotron_lightning.models import CausalLMModule

    data = torch.randint(0, 256, (world * batch * (steps + 5), seq + 1), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_end(self, *args: object) -> None:
            self.stamps.append(time.perf_counter())

    for _ in range(rounds):
        for name, (kind, kwargs) in CONFIGS.items():
            strategy = Picotron3DStrategy(**kwargs) if kind == "picotron3d" else "ddp"
            timer = StepTimer()
            trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world, max_steps=steps + 5,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=[timer])
            trainer.fit(CausalLMModule(preset=preset), DataLoader(data, batch_size=batch))
            intervals = [b - a for a, b in zip(timer.stamps[5:], timer.stamps[6:], strict=False)]  # skip warm-up steps
            times[name].append(statistics.median(intervals))
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    from picotron_lightning.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    results = run_ranks(_worker, 2, args.preset, args.steps, args.rounds, args.batch, args.seq, timeout=3600)
    rank0 = results[0]
    base = rank0["lightning ddp"]
    print(f"preset={args.preset} batch/rank={args.batch} seq={args.seq} steps={args.steps} rounds={args.rounds}")
    print(f"{'configuration':<22} {'step ms':>9} {'ddp / this':>11}")
    for name, t in rank0.items():
        print(f"{name:<22} {t * 1e3:9.1f} {base / t:11.3f}")


if __name__ == "__main__":
    main()
