"""What ``memory.oom_recovery`` costs: clean steps with it on against off, and a recovered step.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/oom_recovery.py [--steps 30] [--preset small]

Two gloo ranks train the reference Llama with ``Trainer.fit`` under four layouts (DDP dp=2, FSDP2
dp=2, tp=2, pp=2 under 1F1B; ``--layouts`` picks some). For each layout, four rounds A-B-B-A in the
same processes, so both see the same machine load: A without ``oom_recovery``, B with it and no OOM.
Then one run C with it and one injected OOM in the middle of backward on rank 1 at step
``--steps // 2`` (test tooling, ``InjectOOM``): that step runs the failed attempt, the replay (FSDP2,
tp) or the rest of the schedule hollow (pp), and the retry in two micro-batches. A step's time is
from batch start to batch end, after a barrier, so it is the slowest rank's. Prints per layout the
median clean step of A and B, B / A, and the recovered step's time over C's median clean step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

LAYOUTS = {"ddp dp=2": {"data_parallel_mode": "ddp"}, "fsdp dp=2": {"data_parallel_mode": "fsdp"},
           "tp=2": {"tensor_parallel_size": 2}, "pp=2": {"pipeline_parallel_size": 2}}
# Where the OOM goes: op 200 of rank 1's backward; a pipeline stage holds half the blocks and runs its backward per
# microbatch, so there op 50 (still mid-backward of the step's first microbatches).
OOM_OP = {"pp=2": 50}
ROUNDS = ("A", "B", "B", "A")


def _run(rank: int, world: int, steps: int, preset: str, batch: int, layouts: list[str]) -> dict[str, Any]:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from picotron_lightning import Picotron3DStrategy
    from picotron_lightning.models import CausalLMModule
    from picotron_lightning.testing import COLLECTIVE_TIMEOUT, TokenDataset, token_data
    from picotron_lightning.testing_memory import InjectOOM, OOMAt

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            torch.distributed.barrier()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            torch.distributed.barrier()  # the step ends when the slowest rank's step ends
            self.times.append(time.perf_counter() - self._start)

    def fit(options: dict, recovery: bool, plan: list) -> tuple[list[float], int]:
        timer = Timer()
        strategy = Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, memory={"oom_recovery": recovery}, **options)
        callbacks: list[Any] = [timer] + ([InjectOOM(plan)] if plan else [])
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world, max_steps=steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=callbacks)
        loader = DataLoader(TokenDataset(token_data(batch * steps * world, seq_len=128)), batch_size=batch,
                            shuffle=False)
        trainer.fit(CausalLMModule(preset, seed=0), loader)
        return timer.times, strategy.oom_recovery.retries if strategy.oom_recovery is not None else 0

    result: dict[str, Any] = {}
    oom_step = steps // 2
    for name in layouts:
        options = LAYOUTS[name]
        op = OOM_OP.get(name, 200)
        plan = [OOMAt(rank=1, step=oom_step, phase="backward", op=op)]
        times: dict[str, list[float]] = {"A": [], "B": []}
        for round_name in ROUNDS:
            times[round_name].extend(fit(options, round_name == "B", [])[0][3:])  # without the warm-up steps
        recovered, retries = fit(options, True, plan)
        if retries != 1:
            raise RuntimeError(f"{name}: the injected OOM made {retries} retries, not 1 (is op {op} past backward?)")
        clean = recovered[3:oom_step] + recovered[oom_step + 1:]
        result[name] = {"A": statistics.median(times["A"]), "B": statistics.median(times["B"]),
                        "C": statistics.median(clean), "recovered": recovered[oom_step]}
    return result


def main() -> None:
    from picotron_lightning.testing import run_ranks

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30, help="steps per round (4 rounds and one recovered run)")
    parser.add_argument("--preset", default="small", help="model preset (picotron_lightning.models)")
    parser.add_argument("--batch", type=int, default=8, help="samples per data-parallel rank and step")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS), metavar="LAYOUT",
                        help=f"which layouts to run (default: all of {list(LAYOUTS)})")
    args = parser.parse_args()
    per_rank = run_ranks(_run, 2, args.steps, args.preset, args.batch, args.layouts, timeout=3600)
    print(f"preset {args.preset}, {args.batch} x 128 tokens per rank and step, {args.steps} steps per round")
    print("| layout | A: off, median ms | B: on, median ms | B / A | recovered step ms | recovered / clean median |")
    print("|---|---|---|---|---|---|")
    for name in args.layouts:
        row = per_rank[0][name]  # every rank waits at the barriers, so rank 0's times are the slowest rank's
        print(f"| {name} | {row['A'] * 1e3:.0f} | {row['B'] * 1e3:.0f} | {row['B'] / row['A']:.2f} | "
              f"{row['recovered'] * 1e3:.0f} | {row['recovered'] / row['C']:.2f} |")


if __name__ == "__main__":
    main()
