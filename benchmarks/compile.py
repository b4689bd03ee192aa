"""Eager vs ``compile=True`` (each block compiled by the strategy) step time, on 2 CPU processes, in one run.

    python benchmarks/compile.py [--preset small] [--steps 20] [--rounds 2]

Four configurations train the same module on the same data at dp=2: picotron3d eager, picotron3d with
``compile=True``, and, for comparison, Lightning's ``"ddp"`` eager and with the user compiling the
model inside the LightningModule (``module.model.compile()``; compiling the whole LightningModule fails
under "ddp", see the code). Rounds run the configurations in A-B-B-A order (forward, then backward) so
machine noise hits all alike. Steady-state step time is the median after 5 warm-up steps; compile
time is reported apart (first step of a compiled run minus the eager one's).
"""

from __future__ import annotations

import argparse
import statistics
import time

CONFIGS = {
    "picotron3d eager": ("picotron3d", False),
    "picotron3d compile=True": ("picotron3d", True),
    "lightning ddp eager": ("ddp", False),
    "lightning ddp + user compile": ("ddp", True),
}
WARMUP = 5


def _worker(rank: int, world: int, preset: str, steps: int, rounds: int, batch: int, seq: int) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from picotron_lightning import Picotron3DStrategy
    from picotron_lightning.models import CausalLMModule

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (world * batch * (steps + WARMUP), seq + 1), generator=generator)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    first: dict[str, list[float]] = {name: [] for name in CONFIGS}

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_start(self, *args: object) -> None:
            self.stamps.append(time.perf_counter())

        def on_train_batch_end(self, *args: object) -> None:
            self.stamps.append(time.perf_counter())

    order = list(CONFIGS)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):  # A-B-B-A across rounds
            kind, compiled = CONFIGS[name]
            strategy = Picotron3DStrategy(compile=compiled) if kind == "picotron3d" else "ddp"
            module = CausalLMModule(preset=preset)
            if kind == "ddp" and compiled:
                # The user compiles the model inside their LightningModule. (Compiling the whole LightningModule,
                # `trainer.fit(torch.compile(module))`, failed here under "ddp" with an InternalTorchDynamoError in
                # Lightning's forward redirection, torch 2.13 / Lightning 2.6.)
                module.model.compile()
            timer = StepTimer()
            trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world, max_steps=steps + WARMUP,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=[timer])
            trainer.fit(module, DataLoader(data, batch_size=batch))
            stamps = timer.stamps
            first[name].append(stamps[1] - stamps[0])
            intervals = [b - a for a, b in zip(stamps[WARMUP + 1:], stamps[WARMUP + 2:], strict=False)]
            times[name].append(statistics.median(intervals))
    return {name: {"step": statistics.median(times[name]), "first_step": first[name][0]} for name in CONFIGS}


def main() -> None:
    from picotron_lightning.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    results = run_ranks(_worker, 2, args.preset, args.steps, args.rounds, args.batch, args.seq, timeout=3600)
    rank0 = results[0]
    eager = rank0["picotron3d eager"]
    print(f"preset={args.preset} batch/rank={args.batch} seq={args.seq} steps={args.steps} rounds={args.rounds}")
    print(f"{'configuration':<32} {'step ms':>9} {'eager / this':>13} {'compile s':>10}")
    for name, r in rank0.items():
        compile_s = r["first_step"] - eager["first_step"] if CONFIGS[name][1] else 0.0
        print(f"{name:<32} {r['step'] * 1e3:9.1f} {eager['step'] / r['step']:13.3f} {compile_s:10.1f}")


if __name__ == "__main__":
    main()
