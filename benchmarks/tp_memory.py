"""Per-rank parameter memory under tensor parallelism, as a ratio to one rank holding the whole model.

Builds the model (the reference Llama, or Hugging Face GPT-2 from a config: vocabulary 50257, which
no tp > 1 divides, so its embedding and head shard unevenly) on every rank, shards it with the
strategy's own tensor-parallel step (``parallel.tensor_parallel.shard_tensor_parallel``, default
options: sequence parallel on, gathered logits) over a ``tp`` mesh of each size, and counts the
bytes of the parameters each rank holds
(``DTensor.to_local()``). tp=1 is the unsharded model in the same run. Exact, not sampled: the
numbers depend only on the plan, not on the machine.

    OMP_NUM_THREADS=1 python benchmarks/tp_memory.py --preset small --tp 2 4
    OMP_NUM_THREADS=1 python benchmarks/tp_memory.py --model gpt2-untied --tp 2 4

The most and the least loaded rank are both printed: with uneven shards they differ.
"""

from __future__ import annotations

import argparse


def _build(model_name: str, preset: str, world: int, layers: int) -> tuple:
    """(model, a note on its shape) for the benchmark's model choice."""
    if model_name.startswith("gpt2"):
        from transformers import GPT2Config, GPT2LMHeadModel

        tied = model_name == "gpt2"
        config = GPT2Config(n_layer=layers, tie_word_embeddings=tied)  # GPT-2 small shape, vocabulary 50257
        return GPT2LMHeadModel(config), (f"vocab {config.vocab_size}, {config.n_layer} layers, width {config.n_embd}, "
                                         f"{'tied' if tied else 'untied'} head")
    from picotron_lightning.models.llama import Llama, llama_config

    config = llama_config(preset, num_kv_heads=llama_config(preset).num_heads) if world > 2 else llama_config(preset)
    return Llama(config), f"kv heads {config.num_kv_heads}"


def _measure(rank: int, world: int, model_name: str, preset: str, layers: int) -> dict:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from picotron_lightning.parallel.tensor_parallel import TensorParallelOptions, shard_tensor_parallel

    torch.manual_seed(0)
    model, note = _build(model_name, preset, world, layers)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    plan = shard_tensor_parallel(model, mesh["tp"], TensorParallelOptions())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                for p in model.parameters())
    return {"full": full, "local": local, "sequence_parallel": plan.sequence_parallel, "note": note}


def main() -> None:
    from picotron_lightning.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", choices=["llama", "gpt2", "gpt2-untied"],
                        help="reference Llama, or Hugging Face GPT-2 (small shape) with its head tied or untied")
    parser.add_argument("--preset", default="small", help="reference Llama preset (tiny, small, base, ...)")
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12 for GPT-2 small)")
    parser.add_argument("--tp", type=int, nargs="+", default=[2])
    args = parser.parse_args()
    name = f"reference Llama '{args.preset}'" if args.model == "llama" else f"Hugging Face {args.model}"
    print(f"{name}, fp32 parameters")
    print(f"{'tp':>3} {'max/rank (MiB)':>15} {'min/rank (MiB)':>15} {'full (MiB)':>11} {'max ratio':>10}"
          f" {'min ratio':>10}")
    for tp in args.tp:
        results = run_ranks(_measure, tp, args.model, args.preset, args.layers, timeout=600)
        worst = max(r["local"] for r in results)  # the most loaded rank
        least = min(r["local"] for r in results)
        full = results[0]["full"]
        print(f"{tp:>3} {worst / 2**20:>15.3f} {least / 2**20:>15.3f} {full / 2**20:>11.3f} {worst / full:>10.4f}"
              f" {least / full:>10.4f}   ({results[0]['note']}, sequence parallel {results[0]['sequence_parallel']})")


if __name__ == "__main__":
    main()
