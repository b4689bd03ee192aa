"""Measuring a CPU machine's rates for the cost model, with every process of the plan running at once.

The cost model's CPU constants (``hardware.DeviceSpec``): fp32 matmul FLOP/s, the host time of one aten
operation on plain tensors and on DTensors, the copy bandwidth, and gloo's all-reduce bus bandwidth and
latency. Each is timed on every rank at the same moment (a barrier before each repeat), so with more
processes than cores the rates already include the sharing (each timing lasts ``min_seconds``, longer than
the scheduler's slices); the median of the repeats, averaged over ranks. On a machine shared with other
work the rates include that work's share too, at the moment of the probe.
Nothing here is fitted to step times: each rate comes from its own microbenchmark.
"""

from __future__ import annotations

import statistics
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


def _seconds_per_call(work: Callable[[], object], repeats: int, min_seconds: float) -> float:
    """Seconds of one ``work()``, timed in stretches of at least ``min_seconds`` on every rank at once.

    A stretch longer than the scheduler's time slices makes ranks that share a core really share it (a
    burst of a few milliseconds can run alone while another rank waits); the median of the stretches.
    """
    import torch.distributed as dist

    calls = 1
    while True:  # no collective in here: ranks may stop at different counts
        start = time.perf_counter()
        for _ in range(calls):
            work()
        if time.perf_counter() - start >= min_seconds / 4:
            break
        calls *= 2
    agreed = torch.tensor([calls * 4], dtype=torch.int64)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    calls = int(agreed.item())
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            work()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def measure_rates(rows: int = 512, width: int = 256, ffn: int = 704, ops: int = 400, copy_bytes: int = 16 << 20,
                  link_bytes: int = 4 << 20, repeats: int = 5, min_seconds: float = 0.2) -> dict[str, float]:
    """In a running gloo group, on every rank at once: the rates of :class:`DeviceSpec` (mean over ranks).

    ``rows x width @ width x ffn`` is the matmul (a block's linear); ``ops`` small adds time one operation,
    on plain tensors and on DTensors sharded over all ranks (sharding propagation, no communication).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    world = dist.get_world_size()
    x, w = torch.randn(rows, width), torch.randn(width, ffn)
    matmul = _seconds_per_call(lambda: x @ w, repeats, min_seconds)
    small = torch.ones(8, 8)

    def adds(t: torch.Tensor) -> None:
        for _ in range(ops):
            torch.add(t, t)

    plain = _seconds_per_call(lambda: adds(small), repeats, min_seconds) / ops
    mesh = init_device_mesh("cpu", (world,))
    sharded = DTensor.from_local(small, mesh, [Shard(0)], run_check=False)
    dtensor = _seconds_per_call(lambda: adds(sharded), repeats, min_seconds) / ops
    src, dst = torch.randn(copy_bytes // 4), torch.empty(copy_bytes // 4)
    copy = _seconds_per_call(lambda: dst.copy_(src), repeats, min_seconds)
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
