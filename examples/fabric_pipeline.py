"""A plain Fabric loop with pipeline (and data and tensor) parallelism.

    python examples/fabric_pipeline.py                                  # pp=2 on 2 CPU processes
    python examples/fabric_pipeline.py --devices 8 --pp 2 --tp 2        # pp=2 x dp=2 x tp=2
    python examples/fabric_pipeline.py --schedule interleaved_1f1b      # any pipeline_schedule

The loop is an ordinary Fabric loop. The two lines that differ from one without pipelines are marked
"(1)" and "(2)": a pipeline stage cannot run ``model(x)`` alone, so ``forward_backward`` takes the batch
and the loss function and runs forward and backward through the schedule. It works the same with
pp=1, and with any other Fabric strategy.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from picotron_lightning import Picotron3DFabricStrategy, evaluate, forward_backward  # (1) the import
from picotron_lightning.data import ByteCorpus, stdlib_bytes
from picotron_lightning.models.llama import Llama, llama_config


def next_byte_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2, help="pipeline_parallel_size")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--schedule", default="1f1b", help="pipeline_schedule")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per data-parallel rank and step")
    args = parser.parse_args()
    if os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(1)  # many CPU ranks on few cores

    strategy = Picotron3DFabricStrategy(pipeline_parallel_size=args.pp, tensor_parallel_size=args.tp,
                                        pipeline_schedule=args.schedule)
    fabric = L.Fabric(accelerator="cpu", devices=args.devices, strategy=strategy)
    fabric.launch()
    fabric.seed_everything(0)

    model = Llama(llama_config("tiny", num_layers=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = fabric.setup(model, optimizer)
    corpus = ByteCorpus(stdlib_bytes(400_000), seq_len=64)
    loader = fabric.setup_dataloaders(DataLoader(corpus, batch_size=args.batch_size, shuffle=True))

    model.train()
    for step, batch in zip(range(args.steps), loader, strict=False):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        loss = forward_backward(fabric, model, inputs, targets, next_byte_loss)  # (2) forward and backward
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss = fabric.all_reduce(loss, reduce_op="mean")
        if step % 10 == 0:
            fabric.print(f"step {step:3d}  loss {loss.item():.4f}")

    val = evaluate(fabric, model, inputs, targets, next_byte_loss)
    fabric.print(f"layout {strategy.layout}; last batch without gradients: loss {val.item():.4f}")
    fabric.save("checkpoints/fabric_pipeline", {"model": model, "optimizer": optimizer, "step": args.steps})
    fabric.print("saved checkpoints/fabric_pipeline (sharded; fabric.load restores it at any layout)")


if __name__ == "__main__":
    main()
