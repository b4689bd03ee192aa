"""Grouped matrix products: one matmul per expert over its contiguous slice of sorted tokens.

Tokens arrive sorted by expert, ``counts[g]`` rows for group ``g``. ``torch._grouped_mm`` does all
groups in one kernel; where the platform lacks it (old torch, CUDA without support for the
dtype, misaligned sizes) the rows are scattered into a padded ``(groups, max_count, in)`` buffer
and multiplied with one ``bmm``. Neither path loops over experts in Python.
"""

from __future__ import annotations

import functools
import threading

import torch

__all__ = ["grouped_matmul", "grouped_mm_available", "pad_by_group", "unpad_by_group"]


@functools.cache
def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward for this device and dtype.

    The probe runs in a thread of its own. Its first call usually comes from inside a model's forward,
    where the caller's thread may carry activation checkpointing's saved-tensor hooks, selective
    checkpointing's caching dispatch mode, a ``FakeTensorMode`` or a counting mode (all thread-local).
    Run there, the probe's own backward unpacked the enclosing checkpointed block, which recomputed it
    once for the probe and used up selective checkpointing's cache, so the real backward failed
    ("Trying to backward an extra time"); its values came back fake under a fake-tensor trace.
    """
    result: list[bool] = []
    probe = threading.Thread(target=lambda: result.append(_run_probe(device_type, dtype)), name="grouped-mm-probe")
    probe.start()
    probe.join()
    return bool(result and result[0])


def _run_probe(device_type: str, dtype: torch.dtype) -> bool:
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    try:
        with torch.enable_grad():
            # A private generator: the probe leaves the global random state (and so the caller's
            # dropout masks and checkpoint recompute) as it found it.
            gen = torch.Generator(device=device_type).manual_seed(0)
            x = torch.randn(8, 16, device=device_type, dtype=dtype, generator=gen).requires_grad_()
            w = torch.randn(2, 16, 16, device=device_type, dtype=dtype, generator=gen).requires_grad_()
            offs = torch.tensor([3, 8], device=device_type, dtype=torch.int32)
            out = fn(x, w, offs=offs)
            out.backward(torch.ones_like(out))
            ref = x.detach()[:3] @ w.detach()[0]
            return bool(torch.allclose(out.detach()[:3].float(), ref.float(), rtol=1e-2, atol=1e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where ``torch._grouped_mm`` can be used for tensors of this device and dtype."""
    return _probe_grouped_mm(device.type, dtype)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense.

    Applied to a grouped product's output: ``torch._grouped_mm``'s backward rejects stride-0
    gradients such as those of ``out.sum()``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def _group_positions(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sorted row: its group and its position inside the group."""
    groups = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(groups.numel(), device=counts.device) - starts[groups]
    return groups, positions


def pad_by_group(x: torch.Tensor, counts: torch.Tensor, max_count: int | None = None) -> torch.Tensor:
    """Rows of ``x`` sorted by group -> a zero-padded ``(groups, max_count, *rest)`` tensor."""
    groups, positions = _group_positions(counts)
    cap = int(counts.max().item()) if max_count is None and counts.numel() else (max_count or 0)
    out = x.new_zeros((counts.numel(), cap) + tuple(x.shape[1:]))
    # index_put with accumulate=False is differentiable and keeps padding rows at zero.
    return out.index_put((groups, positions), x)


def unpad_by_group(padded: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pad_by_group`: the real rows, back in sorted order."""
    groups, positions = _group_positions(counts)
    return padded[groups, positions]


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                   use_grouped_mm: bool | None = None) -> torch.Tensor:
    """``out[rows of g] = x[rows of g] @ weight[g]`` for rows sorted by group.

    Args:
        x: ``(rows, in)`` with the rows of group 0 first, then group 1, ...
        weight: ``(groups, in, out)``; a transposed view is fine.
        counts: ``(groups,)`` integer rows per group, summing to ``rows``.
        use_grouped_mm: force a path; ``None`` picks ``torch._grouped_mm`` where it works.
    """
    if use_grouped_mm is None:
        # CUDA kernels need 16-byte aligned rows; the padded path has no such constraint.
        aligned = all(s * x.element_size() % 16 == 0 for s in (weight.shape[1], weight.shape[2]))
        use_grouped_mm = aligned and x.dtype == weight.dtype and grouped_mm_available(x.device, x.dtype)
    if use_grouped_mm:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x, weight, offs=offs))
    padded = pad_by_group(x, counts)
    return unpad_by_group(torch.bmm(padded, weight), counts)
