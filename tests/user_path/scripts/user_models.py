"""Models a user brings, each in an ordinary LightningModule that knows nothing about parallelism.

* ``llama``: the package's reference Llama (``CausalLMModule``).
* ``moe``: the reference Llama with MoE layers (``tiny-moe``).
* ``gpt``: a plain GPT with its own naming (``blocks.*.attn.query/key/value``, ``ff.up/down``,
  LayerNorm, biases, GELU, learned position embedding): no plan source knows it, so tensor parallelism must
  come from the data-flow detector.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256
WIDTH = 64
HEADS = 4


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(WIDTH, WIDTH)
        self.key = nn.Linear(WIDTH, WIDTH)
        self.value = nn.Linear(WIDTH, WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, WIDTH // HEADS).transpose(1, 2) for f in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        self.attn = Attention()
        self.norm2 = nn.LayerNorm(WIDTH)
        self.ff = FeedForward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, num_blocks: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.wpe = nn.Embedding(64, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(num_blocks))
        self.norm = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class GPTModule(L.LightningModule):
    """Next-token prediction with the plain GPT."""

    def __init__(self, num_blocks: int = 4, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = GPT(num_blocks)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.net(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def build_module(spec: dict[str, Any]) -> L.LightningModule:
    """``{"kind": "llama" | "moe" | "gpt", ...}`` -> a fresh module, initialised identically in every process."""
    kind = spec.get("kind", "llama")
    if kind == "gpt":
        return GPTModule(num_blocks=spec.get("num_blocks", 4), lr=spec.get("lr", 1e-2))
    from picotron_lightning.models import CausalLMModule

    preset = "tiny-moe" if kind == "moe" else spec.get("preset", "tiny")
    return CausalLMModule(preset=preset, config=spec.get("config"), learning_rate=spec.get("lr", 1e-2), seed=0)
