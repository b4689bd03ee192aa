"""The sampler's position inside an epoch, saved and restored, so a resumed run sees each sample once.

Lightning restarts a non-resumable loader at the beginning of the epoch, so a run resumed mid-epoch
would see the epoch's first batches twice. The strategy wraps the ``DistributedSampler`` Lightning
inserted in a :class:`ResumableSampler`; a checkpoint records how many samples *all* data-parallel ranks
together consumed in the epoch, and the first iteration after a resume starts past them.

The distributed sampler gives rank ``r`` of ``R`` the permutation's positions ``r, r + R, r + 2R, ...``,
so the ranks together consume a prefix of the epoch's permutation. Resuming with a different number of
data-parallel ranks ``R'`` continues after the same prefix, as long as ``R'`` divides its length.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler


class ResumableSampler(Sampler[int]):
    """A ``DistributedSampler`` whose next iteration can start past a prefix of the epoch."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler
        self._resume_epoch: int | None = None
        self._resume_samples = 0

    def resume_at(self, epoch: int, samples_consumed: int) -> None:
        """Start the next iteration of ``epoch`` after ``samples_consumed`` samples (all ranks together)."""
        replicas = self.sampler.num_replicas
        if samples_consumed >= self.sampler.total_size:  # saved at the epoch's end: the next epoch, from its start
            epoch, samples_consumed = epoch + 1, 0
        if samples_consumed % replicas:
            raise ValueError(
                f"Cannot resume inside epoch {epoch}: the checkpoint was written after {samples_consumed} samples "
                f"of the epoch, which {replicas} data-parallel ranks cannot split evenly. Resume with a number of "
                "data-parallel ranks that divides it, or from a checkpoint at an epoch boundary."
            )
        self._resume_epoch, self._resume_samples = epoch, samples_consumed
        # Lightning creates the loader's first iterator before it sets the epoch of a resumed run.
        self.sampler.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __iter__(self) -> Iterator[int]:
        indices = iter(self.sampler)
        if self._resume_epoch is not None and self._resume_epoch == self.sampler.epoch:
            indices = itertools.islice(indices, self._resume_samples // self.sampler.num_replicas, None)
        self._resume_epoch, self._resume_samples = None, 0  # one resume, then whole epochs
        return indices

    def __len__(self) -> int:
        # The whole epoch's length: Lightning counts the batches a resumed epoch already ran.
        return len(self.sampler)


def make_resumable(dataloader: Any) -> ResumableSampler | None:
    """Put a :class:`ResumableSampler` inside ``dataloader``'s batch sampler; None if it has no distributed sampler.

    Only the batch sampler's reference changes (a ``DataLoader`` refuses new samplers after construction);
    ``dataloader.sampler`` stays the distributed sampler, so ``set_epoch`` reaches it as before.
    """
    if not isinstance(dataloader, DataLoader):
        return None
    batch_sampler = dataloader.batch_sampler
    if not isinstance(batch_sampler, BatchSampler):
        return None
    inner = batch_sampler.sampler
    if isinstance(inner, ResumableSampler):
        return inner
    if not isinstance(inner, DistributedSampler):
        return None
    wrapped = ResumableSampler(inner)
    batch_sampler.sampler = wrapped
    return wrapped


def samples_consumed(batches_done: int, batch_size: int, num_replicas: int) -> int:
    """Samples all data-parallel ranks together took from the epoch's permutation after ``batches_done`` batches."""
    return batches_done * batch_size * num_replicas
