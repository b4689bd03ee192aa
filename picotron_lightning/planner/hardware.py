"""Devices and links the planner knows: peak FLOP/s, memory, and link bandwidth / latency.

Peaks come from the monitoring FLOPs table (``monitoring/flops.py``, the vendors' dense numbers).
Link numbers are *bus bandwidths* as nccl-tests reports them (bytes of the whole buffer moved per
second, after the ring's 2(n-1)/n or (n-1)/n factor is taken out), for the common fabrics of each
device generation. A planner run on the real cluster can replace them with a measured probe
(``planner/probe.py`` measures a CPU machine's rates and its gloo link this way).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from picotron_lightning.monitoring.flops import PEAK_TABLE, TFLOP, lookup_peak

if TYPE_CHECKING:
    from picotron_lightning.planner.calibration import BlockCalibration

GiB = 1 << 30


@dataclass(frozen=True)
class Link:
    """One kind of link: bus bandwidth (bytes/s) and per-collective latency (s)."""

    name: str
    bandwidth: float
    latency: float


NVLINK4 = Link("NVLink 4 (H100/H200)", 360e9, 8e-6)
NVLINK3 = Link("NVLink 3 (A100)", 230e9, 8e-6)
NVLINK5 = Link("NVLink 5 (B200)", 720e9, 8e-6)
INFINIBAND_NDR = Link("InfiniBand NDR 400G per GPU", 45e9, 20e-6)
INFINIBAND_HDR = Link("InfiniBand HDR 200G per GPU", 22e9, 20e-6)
PCIE5 = Link("PCIe Gen5 x16", 40e9, 15e-6)
PCIE4 = Link("PCIe Gen4 x16", 20e9, 15e-6)
# gloo between processes of this project's 2-core CPU machine; `plan --probe` re-measures it.
GLOO_CPU = Link("gloo on CPU (shared memory / loopback TCP)", 1.0e9, 150e-6)


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator: its peak, its memory and the links inside and between its nodes."""

    name: str
    peak_flops: dict[str, float]
    memory_bytes: int
    intra_node: Link
    inter_node: Link
    efficiency: float = 0.5
    """Fraction of peak a transformer's matmuls reach (model FLOPs utilisation of the compute alone)."""
    op_seconds: float = 0.0
    """Host time of one aten operation on plain tensors (dispatch, Python). 0 on GPUs: kernel launches are
    asynchronous there and hide behind the kernels running (a 7B step's matmuls take far longer than the
    launches); on CPU the op runs on the calling thread, so the host cost adds to the step."""
    dtensor_op_seconds: float = 0.0
    """The same for an operation on DTensors (sharding propagation, local-tensor unwrapping); 0 on GPUs."""
    copy_bandwidth: float = 0.0
    """Bytes per second one process copies tensor to tensor (``dst.copy_(src)``); what FSDP's buffer copies,
    DDP's gradient division and the optimizer's elementwise passes are charged at. 0: not charged (GPUs:
    HBM copies are under 1% of a large model's step and overlap other streams)."""
    cores: int | None = None
    """Cores the processes of one node share (CPU only); more processes than cores slow each one down."""
    rates_processes: int = 1
    """How many processes ran at once when the rates above were measured (a probe runs all of them)."""
    calibration: BlockCalibration | None = None
    """CPU only, from ``plan --calibrate`` (``block_probe.py``): measured seconds of one block per parallel
    style; where present, a candidate of a measured style is timed from it instead of FLOPs and host rates."""

    def sharing_factor(self, processes: int) -> float:
        """How much slower each of ``processes`` processes on one node runs than the rates say: 1 on GPUs;
        on a CPU with fewer cores than processes they share the cores (relative to the measurement's sharing)."""
        if not self.cores:
            return 1.0
        return max(1.0, processes / self.cores) / max(1.0, self.rates_processes / self.cores)

    def flops_per_second(self, precision: str) -> float:
        if precision not in self.peak_flops:
            raise ValueError(f"{self.name} has no {precision} peak; known: {sorted(self.peak_flops)}.")
        return self.peak_flops[precision] * self.efficiency


# (name pattern, memory GiB, intra-node link, inter-node link); the FLOPs come from PEAK_TABLE.
_MEMORY_AND_LINKS: list[tuple[str, float, Link, Link]] = [
    (r"gh200", 96, NVLINK4, INFINIBAND_NDR),
    (r"gb200", 186, NVLINK5, INFINIBAND_NDR),
    (r"b200", 180, NVLINK5, INFINIBAND_NDR),
    (r"h200.*nvl", 141, PCIE5, INFINIBAND_NDR),
    (r"h200", 141, NVLINK4, INFINIBAND_NDR),
    (r"h100.*(nvl|pcie)", 94, PCIE5, INFINIBAND_NDR),
    (r"h100|h800", 80, NVLINK4, INFINIBAND_NDR),
    (r"a100.*40", 40, NVLINK3, INFINIBAND_HDR),
    (r"a100|a800", 80, NVLINK3, INFINIBAND_HDR),
    (r"l40", 48, PCIE4, INFINIBAND_HDR),
    (r"\bl4\b", 24, PCIE4, INFINIBAND_HDR),
    (r"a10", 24, PCIE4, INFINIBAND_HDR),
    (r"rtx 4090", 24, PCIE4, INFINIBAND_HDR),
    (r"v100", 32, NVLINK3, INFINIBAND_HDR),
    (r"mi300x", 192, NVLINK4, INFINIBAND_NDR),
    (r"mi250x", 128, NVLINK3, INFINIBAND_HDR),
]

# A CPU's peak has no datasheet; this is the fp32 matmul rate measured on one core of the project's
# CI machine (`measure_cpu_peak_flops`, 512^3 matmuls). Fixed, so every rank plans identically.
CPU_FP32_FLOPS = 40e9
# Host costs on the same machine, one process alone (`probe_cpu(1)`, planner/probe.py, 2026-11-30, load
# under 1); fixed for the same reason. `plan --probe` replaces all of them with a measurement.
CPU_OP_SECONDS = 3e-6  # measured 2.7 us (torch.add on 8x8 tensors)
CPU_DTENSOR_OP_SECONDS = 60e-6  # measured 57 us (the same add on DTensors, Shard(0))
CPU_COPY_BANDWIDTH = 5e9  # measured 4.9 GB/s (16 MiB copy_)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def known_devices() -> list[str]:
    """Names the table recognises (pass one of these, or a name containing them, as ``--device``)."""
    return [peak.name for _, peak in PEAK_TABLE] + ["cpu"]


def device_spec(name: str, memory_bytes: int | None = None) -> DeviceSpec:
    """The spec of a device by name (``torch.cuda.get_device_name()`` style, or ``"cpu"``)."""
    lowered = name.strip().lower()
    if lowered == "cpu":
        return DeviceSpec("cpu", {"fp32": CPU_FP32_FLOPS, "bf16": CPU_FP32_FLOPS / 4}, memory_bytes or 16 * GiB,
                          GLOO_CPU, GLOO_CPU, efficiency=1.0, op_seconds=CPU_OP_SECONDS,
                          dtensor_op_seconds=CPU_DTENSOR_OP_SECONDS, copy_bandwidth=CPU_COPY_BANDWIDTH,
                          cores=_cores())
    peak = lookup_peak(name)
    if peak is None:
        raise ValueError(f"--device {name!r} is not in the device table; known devices: {known_devices()} "
                         "(a name containing one of them, as torch.cuda.get_device_name() returns, also works).")
    row = next((r for r in _MEMORY_AND_LINKS if re.search(r[0], lowered)), None)
    if row is None:  # pragma: no cover - every PEAK_TABLE entry has a row above
        raise ValueError(f"--device {name!r}: no memory/link entry.")
    _, gib, intra, inter = row
    precisions = {p: v * TFLOP for p in ("fp32", "tf32", "bf16", "fp16", "fp8") if (v := peak.tflops(p))}
    spec = DeviceSpec(peak.name, precisions, int(gib * GiB), intra, inter)
    return replace(spec, memory_bytes=memory_bytes) if memory_bytes else spec


def link_from_all_reduce_times(world_size: int, nbytes: int, big: float, small: float) -> Link:
    """A ring all-reduce's bus bandwidth and latency from the times of an ``nbytes`` one and a one-element one."""
    factor = 2 * (world_size - 1) / world_size
    return Link("gloo on CPU (measured)", bandwidth=factor * nbytes / max(big - small, 1e-9), latency=small)


def time_all_reduces(nbytes: int, repeats: int) -> tuple[float, float]:
    """In a running process group: the best of ``repeats`` all-reduce times of ``nbytes`` and of one element."""
    import torch
    import torch.distributed as dist

    def best(numel: int) -> float:
        x = torch.ones(numel)
        dist.all_reduce(x)
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(nbytes // 4), best(1)
