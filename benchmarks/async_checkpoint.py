"""Step time with a checkpoint every n steps, synchronous and asynchronous, against no checkpoints; one run.

    python benchmarks/async_checkpoint.py [--preset small] [--steps 24] [--every 4] [--rounds 2]

Two CPU ranks (gloo) train the same module on the same data under three configurations: no checkpoints,
``ModelCheckpoint(every_n_train_steps=n)`` with the default synchronous saves, and the same with
``async_checkpointing=True``. Each round runs them in the order A B C C B A, so that drifting machine load
hits all alike. The time per step is the wall time of the steps after warm-up divided by their number,
saves included (that is the cost a user pays); the ratio is against the run without checkpoints
(1.0 = saving costs nothing).
"""

from __future__ import annotations

import argparse
import statistics
import time

CONFIGS = {
    "no checkpoints": None,
    "sync every n": False,
    "async every n": True,
}
WARMUP = 3
OUT = "/tmp/picotron_async_checkpoint_benchmark"  # kept small: keep_last_checkpoints=2


def _worker(rank: int, world: int, preset: str, steps: int, every: int, rounds: int, batch: int, seq: int) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from picotron_lightning import Picotron3DStrategy
    from picotron_lightning.models import CausalLMModule

    total = WARMUP + steps
    data = torch.randint(0, 256, (world * batch * total, seq + 1), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_end(self, *args: object) -> None:
            self.stamps.append(time.perf_counter())

    order = list(CONFIGS) + list(reversed(CONFIGS))
    for _ in range(rounds):
        for name in order:
            asynchronous = CONFIGS[name]
            timer = StepTimer()
            callbacks: list[L.Callback] = [timer]
            if asynchronous is not None:
                callbacks.append(ModelCheckpoint(dirpath=f"{OUT}/{name}", save_top_k=-1, every_n_train_steps=every))
            strategy = Picotron3DStrategy(async_checkpointing=bool(asynchronous), keep_last_checkpoints=2)
            trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world, max_steps=total, logger=False,
                                enable_checkpointing=asynchronous is not None, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=callbacks)
            trainer.fit(CausalLMModule(preset=preset), DataLoader(data, batch_size=batch))
            # The stamp of step k is taken before step k's checkpoint: the last interval holds the last save.
            window = timer.stamps[WARMUP - 1:]
            times[name].append((window[-1] - window[0]) / (len(window) - 1))
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    import shutil

    from picotron_lightning.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    try:
        results = run_ranks(_worker, 2, args.preset, args.steps, args.every, args.rounds, args.batch, args.seq,
                            timeout=3600)
    finally:
        shutil.rmtree(OUT, ignore_errors=True)
    rank0 = results[0]
    base = rank0["no checkpoints"]
    print(f"preset={args.preset} batch/rank={args.batch} seq={args.seq} steps={args.steps} every={args.every} "
          f"rounds={args.rounds} (A B C C B A)")
    print(f"{'configuration':<16} {'ms/step':>9} {'this / none':>12}")
    for name, t in rank0.items():
        print(f"{name:<16} {t * 1e3:9.1f} {t / base:12.3f}")


if __name__ == "__main__":
    main()
