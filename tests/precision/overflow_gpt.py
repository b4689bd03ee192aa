"""The model of issue 16: an unseen 4-block GPT whose MLP output leaves the fp16 range on a few elements.

Plain PyTorch, written the way a user would (nothing in it knows about precision). Each block
scales its MLP output by a large constant and layer-normalises it (a "temperature" trick): in
fp32 the scale cancels, in fp16 the few largest products overflow. ``where="block"`` does this
in the block's own ``forward`` (the culprit is the block), ``where="mlp"`` inside the MLP's
``forward`` (the culprit is ``blocks.i.mlp``, a block's child, which has structural siblings).

Imported by the precision tests, by the user-path script they write, and by
``benchmarks/precision_overflow.py``, so the table in ``docs/precision.md`` and the tests measure
the same model.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256
Where = Literal["block", "mlp"]


def scaled_norm(x: torch.Tensor, gain: float) -> torch.Tensor:
    # x * gain stays in x's dtype: in fp16 the largest products overflow; layer_norm removes the gain.
    return F.layer_norm(x * gain, x.shape[-1:])


class MLP(nn.Module):
    def __init__(self, d: int, gain: float, where: Where) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.gain, self.where = gain, where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.proj(F.gelu(self.fc(x)))
        return scaled_norm(out, self.gain) if self.where == "mlp" else out


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(d, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, gain: float, where: Where) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, gain, where)
        self.gain, self.where = gain, where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        m = self.mlp(self.ln2(x))
        return x + (scaled_norm(m, self.gain) if self.where == "block" else m)


class OverflowGPT(nn.Module):
    def __init__(self, d: int = 64, layers: int = 4, heads: int = 4, max_len: int = 64, gain: float = 2.6e4,
                 where: Where = "block") -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, d)
        self.wpe = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, gain, where) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=1 / math.sqrt(p.shape[1]))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class OverflowGPTModule(L.LightningModule):
    """Next-byte prediction with :class:`OverflowGPT`; records the loss of every step."""

    def __init__(self, where: Where = "block", gain: float = 2.6e4, lr: float = 3e-3, seed: int = 0) -> None:
        super().__init__()
        self.lr = lr
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = OverflowGPT(gain=gain, where=where)
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    def on_train_batch_end(self, outputs: dict, batch: torch.Tensor, batch_idx: int) -> None:
        # The loss of the closure the optimizer step used (a retried step runs training_step twice).
        self.losses.append(float(outputs["loss"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
