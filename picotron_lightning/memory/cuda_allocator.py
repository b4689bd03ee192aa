"""What CUDA's caching allocator reserves for a set of live tensors: a model of its rounding, as pure functions.

The estimate counts live tensor bytes; on CUDA the caching allocator hands out larger blocks and
holds whole segments. Its rules (``c10/cuda/CUDACachingAllocator.cpp``):

* every block is rounded up to a multiple of 512 bytes (``kMinBlockSize``);
* blocks up to 1 MiB (``kSmallSize``) come from the small pool, in 2 MiB segments (``kSmallBuffer``);
* larger blocks under 10 MiB (``kMinLargeAlloc``) share 20 MiB segments (``kLargeBuffer``);
* blocks of 10 MiB and more get a segment of their own, rounded up to 2 MiB (``kRoundLarge``);
* with ``expandable_segments`` each pool is one segment that grows in 2 MiB pages.

:func:`cuda_memory` applies them to the storages live at the peak: ``active`` is what
``torch.cuda.memory_allocated`` would report (rounded blocks) and ``reserved`` the segments needed to
hold them when packed without gaps, a lower bound of ``memory_reserved`` (a real run's reuse
pattern can leave holes; the fragmentation control in ``allocator.py`` watches those).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_SEGMENT = 2 << 20
MIN_LARGE_ALLOC = 10 << 20
LARGE_SEGMENT = 20 << 20
ROUND_LARGE = 2 << 20
PAGE = 2 << 20  # expandable segments map physical memory in pages of this size


def round_up(nbytes: int, multiple: int) -> int:
    """``nbytes`` rounded up to a multiple of ``multiple``."""
    return -(-nbytes // multiple) * multiple


def block_size(nbytes: int) -> int:
    """The block the allocator hands out for a request of ``nbytes`` (at least 512 bytes)."""
    return max(MIN_BLOCK, round_up(nbytes, MIN_BLOCK))


@dataclass(frozen=True)
class CudaMemory:
    """Bytes the caching allocator would report for a set of live tensors."""

    requested: int  # the tensors' own bytes
    active: int  # rounded blocks: torch.cuda.memory_allocated
    reserved: int  # segments holding them: a lower bound of torch.cuda.memory_reserved


def cuda_memory(sizes: Iterable[int], expandable_segments: bool = False) -> CudaMemory:
    """Active and reserved bytes of CUDA's caching allocator holding storages of ``sizes`` bytes at once."""
    requested = small = medium = 0
    large_segments = 0
    large_blocks = 0
    for nbytes in sizes:
        if nbytes <= 0:
            continue
        requested += nbytes
        block = block_size(nbytes)
        if block <= SMALL_SIZE:
            small += block
        elif block < MIN_LARGE_ALLOC:
            medium += block
        else:
            large_blocks += block
            large_segments += round_up(block, ROUND_LARGE)
    active = small + medium + large_blocks
    if expandable_segments:
        reserved = round_up(small, PAGE) + round_up(medium + large_blocks, PAGE)
    else:
        reserved = round_up(small, SMALL_SEGMENT) + round_up(medium, LARGE_SEGMENT) + large_segments
    return CudaMemory(requested=requested, active=active, reserved=reserved)
