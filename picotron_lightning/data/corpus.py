"""A byte-level corpus built from the Python standard library's own source files.

Every machine that runs Python has it, so examples and tests need no download. Files are read
in sorted order, so the corpus is the same on every rank of one machine.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


def stdlib_bytes(max_bytes: int = 4_000_000, root: str | Path | None = None) -> bytes:
    """Concatenated ``.py`` sources under ``root`` (the stdlib by default), at most ``max_bytes``."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"Corpus root {base} is not a directory; pass `root=` to a folder of text files.")
    chunks: list[bytes] = []
    total = 0
    for path in sorted(base.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total == 0:
        raise FileNotFoundError(f"No .py files found under {base}.")
    return b"".join(chunks)[:max_bytes]


class ByteCorpus(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` bytes; item i is an int64 tensor of that length."""

    def __init__(self, data: bytes, seq_len: int = 128) -> None:
        if seq_len < 1:
            raise ValueError(f"`seq_len` must be >= 1, got {seq_len}.")
        if len(data) < seq_len + 1:
            raise ValueError(f"The corpus has {len(data)} bytes, fewer than seq_len + 1 = {seq_len + 1}.")
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]


class StdlibDataModule(L.LightningDataModule):
    """Train/validation split (last ``val_fraction`` of the bytes) of the standard-library corpus."""

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 8,
        max_bytes: int = 4_000_000,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        root: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.max_bytes = seq_len, batch_size, max_bytes
        self.val_fraction, self.num_workers, self.root = val_fraction, num_workers, root
        self.train_set: ByteCorpus | None = None
        self.val_set: ByteCorpus | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = stdlib_bytes(self.max_bytes, self.root)
        split = int(len(data) * (1 - self.val_fraction))
        self.train_set = ByteCorpus(data[:split], self.seq_len)
        self.val_set = ByteCorpus(data[split:], self.seq_len)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=True,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
