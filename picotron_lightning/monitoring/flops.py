"""Model FLOPs per token, dense peak FLOPs per device, and MFU.

MFU (model FLOPs utilisation) = achieved model FLOPs / peak FLOPs. "Model" FLOPs count only the
arithmetic the model needs (forward + backward, no recomputation), so activation checkpointing
does not inflate it. Peaks are the vendors' *dense* tensor-core numbers (no 2:4 sparsity) for the
precision actually in use; a CPU has no datasheet entry we can trust, so its peak is measured.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

TFLOP = 1e12


@dataclass(frozen=True)
class DevicePeak:
    """Dense peak TFLOP/s of one device per compute precision (``None``: not supported)."""

    name: str
    fp32: float
    tf32: float | None
    bf16: float | None
    fp16: float
    fp8: float | None = None

    def tflops(self, precision: str) -> float | None:
        return getattr(self, precision, None)


# Dense numbers from the vendors' datasheets, in TFLOP/s per device. Order matters: the first
# pattern that matches the lower-cased device name wins, so specific names come before general.
PEAK_TABLE: list[tuple[str, DevicePeak]] = [
    (r"gh200", DevicePeak("GH200", 66.9, 494.7, 989.4, 989.4, 1978.9)),
    (r"gb200", DevicePeak("GB200", 80.0, 1250.0, 2500.0, 2500.0, 5000.0)),
    (r"b200", DevicePeak("B200", 75.0, 1125.0, 2250.0, 2250.0, 4500.0)),
    (r"h200.*nvl", DevicePeak("H200 NVL", 60.0, 417.5, 835.5, 835.5, 1670.5)),
    (r"h200", DevicePeak("H200 SXM", 66.9, 494.7, 989.4, 989.4, 1978.9)),
    (r"h100.*nvl", DevicePeak("H100 NVL", 60.0, 417.5, 835.5, 835.5, 1670.5)),
    (r"h100.*pcie", DevicePeak("H100 PCIe", 51.2, 378.0, 756.0, 756.0, 1513.0)),
    (r"h100|h800", DevicePeak("H100 SXM", 66.9, 494.7, 989.4, 989.4, 1978.9)),
    (r"a100|a800", DevicePeak("A100", 19.5, 156.0, 312.0, 312.0)),
    (r"l40s", DevicePeak("L40S", 91.6, 183.0, 362.05, 362.05, 733.0)),
    (r"l40\b", DevicePeak("L40", 90.5, 90.5, 181.0, 181.0, 362.0)),
    (r"\bl4\b", DevicePeak("L4", 30.3, 60.0, 121.0, 121.0, 242.5)),
    (r"a10g", DevicePeak("A10G", 31.2, 35.0, 70.0, 70.0)),
    (r"\ba10\b", DevicePeak("A10", 31.2, 62.5, 125.0, 125.0)),
    (r"rtx 4090", DevicePeak("RTX 4090", 82.6, 82.6, 165.2, 165.2, 330.3)),
    (r"v100.*pcie", DevicePeak("V100 PCIe", 14.0, None, None, 112.0)),
    (r"v100", DevicePeak("V100 SXM2", 15.7, None, None, 125.0)),
    (r"mi300x", DevicePeak("MI300X", 163.4, 653.7, 1307.4, 1307.4, 2614.9)),
    (r"mi250x", DevicePeak("MI250X", 95.7, None, 383.0, 383.0)),
]


def lookup_peak(device_name: str) -> DevicePeak | None:
    """The table entry for a device name such as ``torch.cuda.get_device_name()`` returns."""
    name = device_name.lower()
    for pattern, peak in PEAK_TABLE:
        if re.search(pattern, name):
            return peak
    return None


def compute_precision(trainer_precision: str | None, device_type: str = "cuda") -> str:
    """The matmul precision a Lightning precision string ("bf16-mixed", "32-true", ...) runs at.

    fp32 matmuls on NVIDIA GPUs run on TF32 tensor cores when PyTorch allows it, which changes
    the peak by 8x, so that setting is read here rather than assumed.
    """
    p = str(trainer_precision or "32-true").lower()
    if "transformer-engine" in p or "fp8" in p or "8-" in p:
        return "fp8"
    if "bf16" in p:
        return "bf16"
    if p.startswith("16") or "fp16" in p or p == "half":
        return "fp16"
    if device_type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    if device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=8)
def measure_cpu_peak_flops(precision: str = "fp32", size: int = 512, repeats: int = 5) -> float:
    """FLOP/s of the best of a few square matmuls on this process's CPU threads.

    Measured once per process and precision (about 0.1 s): a CPU's achievable peak depends on
    its vector units, the thread count given to this process and other load, none of which a
    table can know. Low-precision matmuls that the CPU emulates get their (low) measured speed.
    """
    dtype = _DTYPES.get(precision, torch.float32)
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: first call allocates and picks kernels
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / max(best, 1e-9)


def peak_flops(device: torch.device | str, precision: str = "fp32") -> float | None:
    """Dense peak FLOP/s of one device at ``precision``; measured for CPUs, ``None`` if unknown."""
    device = torch.device(device)
    if device.type == "cpu":
        return measure_cpu_peak_flops(precision)
    if device.type == "cuda" and torch.cuda.is_available():
        entry = lookup_peak(torch.cuda.get_device_name(device))
        tflops = entry.tflops(precision) if entry else None
        return tflops * TFLOP if tflops else None
    return None


# ---------------------------------------------------------------------------------- model FLOPs
def _moe_inactive_params(module: nn.Module) -> int:
    """Parameters of experts that one token does not use, summed over the model's MoE layers.

    Duck-typed: an MoE layer is a module with ``num_experts`` and ``top_k`` whose experts live in
    a submodule named ``experts``; its expert parameters divide evenly among the experts.
    """
    inactive = 0
    for m in module.modules():
        num_experts = getattr(m, "num_experts", None)
        top_k = getattr(m, "top_k", None)
        experts = getattr(m, "experts", None)
        if not (isinstance(num_experts, int) and isinstance(top_k, int) and isinstance(experts, nn.Module)):
            continue
        expert_params = sum(p.numel() for p in experts.parameters())
        # Under expert parallelism a rank holds only its experts; the logical count is per expert.
        local_experts = getattr(experts, "num_local_experts", None) or num_experts
        per_expert = expert_params / max(local_experts, 1)
        inactive += int(per_expert * (num_experts - top_k))
    return inactive


def _find_config(module: nn.Module) -> object | None:
    for candidate in (module, getattr(module, "model", None)):
        config = getattr(candidate, "config", None)
        if config is not None:
            return config
    return None


@dataclass(frozen=True)
class ModelFlops:
    """The sizes that set a transformer's training FLOPs per token.

    ``active_params`` counts matmul parameters a token passes through: embedding tables are
    lookups and are left out unless tied to the output layer; MoE layers count only ``top_k``
    experts. ``layers`` and ``hidden`` feed the attention term.
    """

    active_params: int
    layers: int
    hidden: int

    @classmethod
    def from_module(cls, module: nn.Module) -> ModelFlops:
        """Measure a whole, unsharded model (call before the strategy shards it).

        Sizes come from ``module.config`` or ``module.model.config`` (the reference Llama or a
        Hugging Face config); without one the attention term is left out.
        """
        params = {id(p): p for p in module.parameters()}
        embedding_ids: set[int] = set()
        linear_ids: set[int] = set()
        for m in module.modules():
            if isinstance(m, nn.Embedding):
                embedding_ids.add(id(m.weight))
            elif isinstance(m, nn.Linear):
                linear_ids.add(id(m.weight))
        # A tied embedding is also the output matmul: keep it.
        n = sum(p.numel() for i, p in params.items() if i not in embedding_ids or i in linear_ids)
        n -= _moe_inactive_params(module)
        config = _find_config(module)
        layers = getattr(config, "num_layers", None) or getattr(config, "num_hidden_layers", None) or 0
        hidden = getattr(config, "hidden_size", None) or 0
        return cls(int(n), int(layers), int(hidden))

    def per_token(self, seq_len: int, include_backward: bool = True) -> float:
        """Training FLOPs per token, ``6 N_active + 12 L d s`` (Kaplan et al. 2020; PaLM appendix B).

        The attention term covers the score and value matmuls, which have no parameters.
        """
        # Forward: QK^T and AV, each s*d multiply-adds per token and layer; causal masking not halved.
        attention = 4 * self.layers * self.hidden * seq_len
        forward = 2 * self.active_params + attention
        return float(3 * forward if include_backward else forward)


def model_flops_per_token(module: nn.Module, seq_len: int, include_backward: bool = True) -> float:
    """Training FLOPs per token of a whole model at sequence length ``seq_len`` (see :class:`ModelFlops`)."""
    return ModelFlops.from_module(module).per_token(seq_len, include_backward)


def mfu(tokens_per_second_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one device, in [0, 1] (``None`` when the peak is unknown)."""
    if not peak:
        return None
    return tokens_per_second_per_device * flops_per_token / peak
