"""Measuring a CPU machine's rates for the cost model, with every process of the plan running at once.

The cost model's CPU constants (``hardware.DeviceSpec``): fp32 matmul FLOP/s, the host time of one aten
operation on plain tensors and on DTensors, the copy bandwidth, and gloo's all-reduce bus bandwidth and
latency. Each is timed on every rank at the same moment (a barrier before each repeat), so with more
processes than cores the rates already include the sharing; the best of the repeats (the uncontended rate,
as for the link), averaged over ranks. On a machine shared with other work that is the rate of a quiet
moment: compare it with the fastest steps, not with steps slowed by the neighbours.
Nothing here is fitted to step times: each rate comes from its own microbenchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from picotron_lightning.planner.hardware import (
    DeviceSpec,
    Link,
    device_spec,
    link_from_all_reduce_times,
    time_all_reduces,
)


def _best_seconds(work: Callable[[], object], repeats: int) -> float:
    import torch.distributed as dist

    work()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_rates(rows: int = 512, width: int = 256, ffn: int = 704, ops: int = 400, copy_bytes: int = 16 << 20,
                  link_bytes: int = 4 << 20, repeats: int = 7) -> dict[str, float]:
    """In a running gloo group, on every rank at once: the rates of :class:`DeviceSpec` (mean over ranks).

    ``rows x width @ width x ffn`` is the matmul (a block's linear); ``ops`` small adds time one operation,
    on plain tensors and on DTensors sharded over all ranks (sharding propagation, no communication).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    world = dist.get_world_size()
    x, w = torch.randn(rows, width), torch.randn(width, ffn)
    matmul = _best_seconds(lambda: [x @ w for _ in range(4)], repeats) / 4
    small = torch.ones(8, 8)

    def adds(t: torch.Tensor) -> None:
        for _ in range(ops):
            torch.add(t, t)

    plain = _best_seconds(lambda: adds(small), repeats) / ops
    mesh = init_device_mesh("cpu", (world,))
    sharded = DTensor.from_local(small, mesh, [Shard(0)], run_check=False)
    dtensor = _best_seconds(lambda: adds(sharded), repeats) / ops
    src, dst = torch.randn(copy_bytes // 4), torch.empty(copy_bytes // 4)
    copy = _best_seconds(lambda: dst.copy_(src), repeats)
    big, one = time_all_reduces(link_bytes, repeats)
    link = link_from_all_reduce_times(world, link_bytes, big, one)
    local = torch.tensor([2 * rows * width * ffn / matmul, plain, dtensor, copy_bytes / copy, link.bandwidth,
                          link.latency], dtype=torch.float64)
    dist.all_reduce(local)
    flops, op, dt_op, copy_bw, bandwidth, latency = (local / world).tolist()
    return {"flops": flops, "op_seconds": op, "dtensor_op_seconds": dt_op, "copy_bandwidth": copy_bw,
            "bandwidth": bandwidth, "latency": latency, "processes": float(world)}


def probed_spec(rates: dict[str, float], base: DeviceSpec | None = None) -> DeviceSpec:
    """The CPU table with every rate replaced by a :func:`measure_rates` result."""
    base = base or device_spec("cpu")
    link = Link(f"gloo on CPU (probed, {int(rates['processes'])} processes)", rates["bandwidth"], rates["latency"])
    return replace(base, name=f"cpu (probed, {int(rates['processes'])} processes)",
                   peak_flops={"fp32": rates["flops"], "bf16": rates["flops"] / 4}, intra_node=link,
                   inter_node=link, op_seconds=rates["op_seconds"], dtensor_op_seconds=rates["dtensor_op_seconds"],
                   copy_bandwidth=rates["copy_bandwidth"], rates_processes=int(rates["processes"]))


def probe_cpu(processes: int, rows: int = 512, width: int = 256, ffn: int = 704) -> DeviceSpec:
    """Start ``processes`` local gloo ranks, measure the rates with all of them busy, return the spec."""
    from picotron_lightning.testing import run_ranks

    return probed_spec(run_ranks(_probe_worker, processes, rows, width, ffn, timeout=300.0)[0])


def _probe_worker(rank: int, world_size: int, rows: int, width: int, ffn: int) -> dict[str, float]:
    import torch.distributed as dist

    from picotron_lightning.testing import init_gloo

    init_gloo(rank, world_size)
    try:
        return measure_rates(rows, width, ffn)
    finally:
        dist.destroy_process_group()
