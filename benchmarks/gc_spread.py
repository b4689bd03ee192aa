"""Step-time spread (median vs p99) with and without the strategy's garbage-collection control.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/gc_spread.py [--steps 200] [--garbage 2000]

Two gloo ranks train the tiny reference Llama with ``Trainer.fit`` in four rounds, A-B-B-A in one
run (A: ``gc_every_n_steps=None``, Python's automatic collection; B: ``gc_every_n_steps=50`` with
``gc.freeze()`` after setup), so both see the same machine load. Each step makes ``--garbage``
reference cycles (the Python garbage a real loop makes: logging dicts, closures, hooks) and the
process holds a large live object graph (a tokenizer's or dataset index's worth), so that the
automatic full collections that scan it show up. A step's time is measured from batch start to
batch end on every rank and includes the gradient all-reduce, where one rank's collection makes
the other wait. Prints the median, p99 and p99/median per configuration (worst rank).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

CONFIGS = {"A: automatic gc": None, "B: gc_every_n_steps=50": 50}
ROUNDS = ("A: automatic gc", "B: gc_every_n_steps=50", "B: gc_every_n_steps=50", "A: automatic gc")


def _run(rank: int, world: int, steps: int, garbage: int, live_objects: int) -> dict[str, list[float]]:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from picotron_lightning import Picotron3DStrategy
    from picotron_lightning.models import CausalLMModule
    from picotron_lightning.testing import COLLECTIVE_TIMEOUT, TokenDataset, token_data

    class Cycles:
        def __init__(self) -> None:
            self.me = self

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            for _ in range(garbage):
                Cycles()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            torch.distributed.barrier()  # the step ends when the slowest rank's step ends
            self.times.append(time.perf_counter() - self._start)

    index = [{"token": i, "pieces": [i, str(i)]} for i in range(live_objects)]  # a long-lived object graph
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for name in ROUNDS:
        timer = Timer()
        strategy = Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, data_parallel_mode="ddp",
                                      memory={"gc_every_n_steps": CONFIGS[name]})
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world, max_steps=steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[timer])
        loader = DataLoader(TokenDataset(token_data(4 * steps * world)), batch_size=2, shuffle=False)
        trainer.fit(CausalLMModule("tiny", seed=0), loader)
        times[name].extend(timer.times[5:])  # without the first steps (warm-up)
    del index
    return times


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def main() -> None:
    from picotron_lightning.testing import run_ranks

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200, help="steps per round (4 rounds)")
    parser.add_argument("--garbage", type=int, default=2000, help="reference cycles made per step")
    parser.add_argument("--live-objects", type=int, default=300_000, help="size of the long-lived object graph")
    args = parser.parse_args()
    per_rank = run_ranks(_run, 2, args.steps, args.garbage, args.live_objects, timeout=3600)
    print("| configuration | steps | median ms | p99 ms | p99 / median | max ms |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for name in CONFIGS:
        # Every rank waits at the barrier for the slowest, so the ranks' times agree; take the worst.
        stats = []
        for times in per_rank:
            values = times[name]
            stats.append((statistics.median(values), _p99(values), max(values), len(values)))
        median, p99, worst, count = max(stats, key=lambda s: s[1])
        rows[name] = (median, p99)
        print(f"| {name} | {count} | {median * 1e3:.2f} | {p99 * 1e3:.2f} | {p99 / median:.2f} | {worst * 1e3:.2f} |")
    (a_med, a_p99), (b_med, b_p99) = rows.values()
    print(f"\nB / A: median {b_med / a_med:.2f}x, p99 {b_p99 / a_p99:.2f}x")


if __name__ == "__main__":
    main()
