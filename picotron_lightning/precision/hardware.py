"""What the device really supports for low-precision training, and optionally how fast.

"Supported" here means *native*: the hardware has instructions that compute in that dtype. torch
runs bf16 and fp16 autocast on any CPU, but without native instructions it converts to fp32 and
back around every op, which is correct and slower than plain fp32. The report keeps the two apart
(``bf16`` vs ``bf16_emulated``) so the policy never picks a dtype that only costs time.

Rules:

* CUDA: bf16 and TF32 from compute capability 8.0 (Ampere), fp8 from 8.9 (Ada, Hopper), fp16
  tensor cores from 7.0. ROCm asks torch, which knows the gfx generation.
* CPU (x86): bf16 with ``avx512_bf16`` or ``amx_bf16``; fp16 with ``avx512_fp16`` or ``amx_fp16``.
  CPU (Arm): bf16 with the ``bf16`` feature (Armv8.6), fp16 with ``asimdhp``/``fphp``.
* MPS: fp16 always; bf16 where the OS/torch accepts a bf16 tensor on the device.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class HardwareReport:
    """What :class:`HardwareDetector` found. ``print(report)`` gives a short table."""

    device_type: str
    name: str
    bf16: bool = False
    fp16: bool = False
    fp8: bool = False
    tf32: bool = False
    bf16_emulated: bool = True  # bf16 autocast runs but converts around each op
    fp16_emulated: bool = True
    compute_capability: tuple[int, int] | None = None
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    # dtype name -> measured matmul TFLOP/s (only with ``benchmark=True``)
    matmul_tflops: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def supports(self, dtype: torch.dtype) -> bool:
        """True when the device computes natively in ``dtype`` (fp32 always)."""
        if dtype == torch.float32:
            return True
        if dtype == torch.bfloat16:
            return self.bf16
        if dtype == torch.float16:
            return self.fp16
        return False

    def speedup(self, dtype_name: str) -> float | None:
        """Measured matmul throughput of ``dtype_name`` relative to fp32, if benchmarked."""
        if dtype_name not in self.matmul_tflops or not self.matmul_tflops.get("fp32"):
            return None
        return self.matmul_tflops[dtype_name] / self.matmul_tflops["fp32"]

    def __str__(self) -> str:
        def yes(native: bool, emulated: bool) -> str:
            return "native" if native else ("emulated" if emulated else "no")

        lines = [f"Hardware: {self.name} ({self.device_type})"]
        if self.compute_capability is not None:
            lines.append(f"  compute capability: {self.compute_capability[0]}.{self.compute_capability[1]}")
        lines.append(f"  bf16: {yes(self.bf16, self.bf16_emulated)}")
        lines.append(f"  fp16: {yes(self.fp16, self.fp16_emulated)}")
        lines.append(f"  fp8:  {'yes' if self.fp8 else 'no'}")
        if self.device_type == "cuda":
            lines.append(f"  tf32: {'yes' if self.tf32 else 'no'}")
        if self.cpu_flags:
            lines.append(f"  cpu flags: {', '.join(sorted(self.cpu_flags))}")
        for name, tflops in self.matmul_tflops.items():
            ratio = self.speedup(name)
            extra = f" ({ratio:.2f}x fp32)" if ratio is not None and name != "fp32" else ""
            lines.append(f"  matmul {name}: {tflops:.3f} TFLOP/s{extra}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


# The /proc/cpuinfo flags that matter for low precision; everything else is noise in the report.
_X86_FLAGS = {"avx2", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16"}
_ARM_FLAGS = {"bf16", "fphp", "asimdhp", "sve", "sve2", "i8mm"}


def read_cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """Low-precision-relevant CPU flags from ``/proc/cpuinfo`` text (read from disk when None)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        # x86 calls the line "flags", Arm calls it "Features"; the first CPU is representative.
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break
    return frozenset(flags & (_X86_FLAGS | _ARM_FLAGS))


def cpu_report(flags: frozenset[str], name: str | None = None) -> HardwareReport:
    """Apply the CPU rules to a set of flags (pure, so tests can feed any flag set)."""
    bf16 = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    fp16 = bool(flags & {"avx512_fp16", "amx_fp16", "fphp", "asimdhp"})
    report = HardwareReport(
        device_type="cpu",
        name=name or platform.processor() or platform.machine() or "cpu",
        bf16=bf16,
        fp16=fp16,
        bf16_emulated=not bf16,
        fp16_emulated=not fp16,
        cpu_flags=flags,
    )
    if bf16 and "amx_bf16" in flags:
        report.notes.append("AMX tiles: bf16 matmuls use the matrix engine")
    if not bf16:
        report.notes.append("no native bf16: autocast would convert around every op and run slower than fp32")
    return report


def cuda_report(capability: tuple[int, int], name: str = "cuda") -> HardwareReport:
    """Apply the CUDA compute-capability rules (pure, so tests can feed any capability)."""
    ampere = capability >= (8, 0)
    return HardwareReport(
        device_type="cuda",
        name=name,
        compute_capability=capability,
        bf16=ampere,
        fp16=capability >= (6, 0),
        fp8=capability >= (8, 9),
        tf32=ampere,
        bf16_emulated=not ampere,
        fp16_emulated=capability < (6, 0),
    )


class HardwareDetector:
    """Detects native low-precision support of one device.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``; ``None`` picks
            CUDA, then MPS, then CPU.
        benchmark: also time a square matmul per dtype (a fraction of a second per dtype).
        benchmark_size: side of the benchmark matmul.
    """

    def __init__(self, device: str | torch.device | None = None, benchmark: bool = False,
                 benchmark_size: int = 1024) -> None:
        if device is None:
            if torch.cuda.is_available():
                device = "cuda"
            elif _mps_available():
                device = "mps"
            else:
                device = "cpu"
        self.device = torch.device(device)
        self.benchmark = benchmark
        self.benchmark_size = benchmark_size

    def detect(self) -> HardwareReport:
        """Build the report for the device (and run the micro-benchmark when asked)."""
        kind = self.device.type
        if kind == "cuda":
            report = self._detect_cuda()
        elif kind == "mps":
            report = self._detect_mps()
        elif kind == "cpu":
            report = cpu_report(read_cpu_flags(), _cpu_model_name())
        else:
            report = HardwareReport(device_type=kind, name=kind, notes=[f"no rules for device type {kind!r}"])
        if self.benchmark:
            report.matmul_tflops = matmul_throughput(self.device, self.benchmark_size)
        return report

    def _detect_cuda(self) -> HardwareReport:
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        capability = torch.cuda.get_device_capability(index)
        report = cuda_report(capability, torch.cuda.get_device_name(index))
        if torch.version.hip is not None:
            # Compute capability means nothing on ROCm; torch knows which gfx parts do bf16.
            report.bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            report.bf16_emulated = not report.bf16
            report.fp8 = False
            report.notes.append("ROCm: fp8 detection not implemented")
        return report

    def _detect_mps(self) -> HardwareReport:
        report = HardwareReport(device_type="mps", name="Apple GPU (MPS)", fp16=True, fp16_emulated=False)
        try:
            torch.ones(1, dtype=torch.bfloat16, device="mps")
            report.bf16, report.bf16_emulated = True, False
        except (RuntimeError, TypeError):
            report.notes.append("this macOS/torch rejects bf16 on MPS")
        return report


def matmul_throughput(device: torch.device, size: int = 1024, repeats: int = 5) -> dict[str, float]:
    """TFLOP/s of a ``size`` x ``size`` matmul for fp32, bf16 and fp16 on ``device``."""
    out: dict[str, float] = {}
    for name, dtype in _DTYPES.items():
        try:
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            a @ b  # warm-up: kernel selection, lazy init
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            _sync(device)
            elapsed = (time.perf_counter() - start) / repeats
        except (RuntimeError, TypeError):
            continue  # dtype unsupported on this device: leave it out of the report
        out[name] = 2 * size**3 / max(elapsed, 1e-9) / 1e12
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _cpu_model_name() -> str | None:
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return None
