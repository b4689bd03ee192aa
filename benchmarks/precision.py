"""Step time of AdaptivePrecision vs Lightning's plain "bf16-mixed", same model, same run.

    python benchmarks/precision.py --preset small --steps 40 --rounds 2

Runs alternate (plain, adaptive, plain, adaptive, ...) so that load from other processes on the
machine hits both alike. Each run times its optimizer steps with a callback after ``--warmup``
steps; the script prints the median and mean step time of each and their ratio (target <= 1.05).
On a machine without native bf16 the adaptive plugin would choose fp32 and the comparison is
moot; the script says so (``--mode bf16`` forces bf16 there: both runs then emulate it, and the
ratio still measures what the plugin adds per step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from picotron_lightning.data import ByteCorpus, stdlib_bytes
from picotron_lightning.models import CausalLMModule
from picotron_lightning.precision import AdaptivePrecision


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)


def run(kind: str, args: argparse.Namespace, data: bytes) -> tuple[list[float], str]:
    torch.manual_seed(0)
    module = CausalLMModule(args.preset, config={"max_seq_len": args.seq_len})
    timer = StepTimer(args.warmup)
    plugin = AdaptivePrecision(mode=args.mode, analysis_interval=args.analysis_interval) if kind == "adaptive" else None
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, max_steps=args.steps + args.warmup, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        **({"plugins": [plugin]} if plugin else {"precision": "bf16-mixed"}),
    )
    loader = DataLoader(ByteCorpus(data, args.seq_len), batch_size=args.batch_size, shuffle=False)
    trainer.fit(module, loader)
    mode = plugin.plan.mode if plugin is not None and plugin.plan is not None else "bf16"
    return timer.times, mode


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--analysis-interval", type=int, default=100)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--mode", default="auto", choices=["auto", "bf16"],
                        help="bf16: force it where the detector finds no native bf16 (both runs then emulate it)")
    args = parser.parse_args()
    data = stdlib_bytes(2_000_000)
    times: dict[str, list[float]] = {"bf16-mixed": [], "adaptive": []}
    mode = "?"
    for _ in range(args.rounds):
        times["bf16-mixed"] += run("plain", args, data)[0]
        adaptive, mode = run("adaptive", args, data)
        times["adaptive"] += adaptive
    if mode != "bf16":
        print(f"note: AdaptivePrecision chose {mode} here, so this is not a bf16-vs-bf16 comparison")
    med = {k: statistics.median(v) for k, v in times.items()}
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    print(f"preset={args.preset} batch={args.batch_size} seq={args.seq_len} steps/run={args.steps} "
          f"rounds={args.rounds} torch={torch.__version__} threads={torch.get_num_threads()}")
    for k in times:
        print(f"{k:12s} median {med[k] * 1e3:8.2f} ms  mean {mean[k] * 1e3:8.2f} ms  ({len(times[k])} steps)")
    print(f"ratio adaptive / bf16-mixed: median {med['adaptive'] / med['bf16-mixed']:.3f}x, "
          f"mean {mean['adaptive'] / mean['bf16-mixed']:.3f}x (target <= 1.05)")


if __name__ == "__main__":
    main()
