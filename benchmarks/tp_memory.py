"""Per-rank parameter memory under tensor parallelism, as a ratio to one rank holding the whole model.

Builds the reference Llama on every rank, shards it with the strategy's own tensor-parallel step
(``parallel.tensor_parallel.shard_tensor_parallel``, default options: sequence parallel on, gathered
logits) over a ``tp`` mesh of each size, and counts the bytes of the parameters each rank holds
(``DTensor.to_local()``). tp=1 is the unsharded model in the same run. Exact, not sampled: the
numbers depend only on the plan, not on the machine.

    OMP_NUM_THREADS=1 python benchmarks/tp_memory.py --preset small --tp 2 4
"""

from __future__ import annotations

import argparse


def _measure(rank: int, world: int, preset: str) -> dict:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from picotron_lightning.models.llama import Llama, llama_config
    from picotron_lightning.parallel.tensor_parallel import TensorParallelOptions, shard_tensor_parallel

    config = llama_config(preset, num_kv_heads=llama_config(preset).num_heads) if world > 2 else llama_config(preset)
    torch.manual_seed(0)
    model = Llama(config)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    plan = shard_tensor_parallel(model, mesh["tp"], TensorParallelOptions())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                for p in model.parameters())
    return {"full": full, "local": local, "sequence_parallel": plan.sequence_parallel,
            "kv_heads": config.num_kv_heads}


def main() -> None:
    from picotron_lightning.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="reference Llama preset (tiny, small, base, ...)")
    parser.add_argument("--tp", type=int, nargs="+", default=[2])
    args = parser.parse_args()
    print(f"reference Llama '{args.preset}', fp32 parameters")
    print(f"{'tp':>3} {'params/rank (MiB)':>18} {'full (MiB)':>11} {'ratio':>7}")
    for tp in args.tp:
        results = run_ranks(_measure, tp, args.preset, timeout=600)
        worst = max(r["local"] for r in results)  # the most loaded rank
        full = results[0]["full"]
        print(f"{tp:>3} {worst / 2**20:>18.3f} {full / 2**20:>11.3f} {worst / full:>7.3f}"
              f"   (kv heads {results[0]['kv_heads']}, sequence parallel {results[0]['sequence_parallel']})")


if __name__ == "__main__":
    main()
