"""Models a user brings, each in an ordinary LightningModule that knows nothing about parallelism.

* ``llama``: the package's reference Llama (``CausalLMModule``).
* ``moe``: the reference Llama with MoE layers (``tiny-moe``).
* ``gpt``: a plain GPT with its own naming (``blocks.*.attn.query/key/value``, ``ff.up/down``,
  LayerNorm, biases, GELU, learned position embedding): no plan source knows it, so tensor parallelism must
  come from the data-flow detector. ``"vocab"`` and ``"ffn"`` give it sizes tp does not divide.
* ``two_stream``: a GPT whose blocks pass two tensors to each other (the hidden state and a running
  sum of the block outputs that the head reads): only ``pipeline_split="trace"`` carries both
  across a stage boundary (the structural split carries one tensor).
* ``gpt2``: Hugging Face ``GPT2LMHeadModel`` from a tiny config (``Conv1D`` projections, one fused
  ``c_attn``), vocabulary ``"vocab"`` (odd by default), ``"tied"`` input/output embeddings or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256
WIDTH = 64
HEADS = 4
GPT2_VOCAB = 101  # odd, as GPT-2's own 50257


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
    def __init__(self, ffn: int = 4 * WIDTH) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, ffn)
        self.down = nn.Linear(ffn, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, ffn: int = 4 * WIDTH) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        self.attn = Attention()
        self.norm2 = nn.LayerNorm(WIDTH)
        self.ff = FeedForward(ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, num_blocks: int = 4, vocab: int = VOCAB, ffn: int = 4 * WIDTH) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, WIDTH)
        self.wpe = nn.Embedding(64, WIDTH)
        self.blocks = nn.ModuleList(Block(ffn) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class TwoStreamBlock(Block):
    """A block of two streams: the hidden state, and the running sum of every block's output."""

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x = super().forward(x)
        return x, memory + x


class TwoStreamGPT(GPT):
    """The head reads the hidden state plus the sum of all block outputs: two tensors flow between blocks."""

    def __init__(self, num_blocks: int = 4) -> None:
        super().__init__(num_blocks)
        self.blocks = nn.ModuleList(TwoStreamBlock() for _ in range(num_blocks))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        memory = torch.zeros_like(x)
        for block in self.blocks:
            x, memory = block(x, memory)
        return self.lm_head(self.norm(x + memory / len(self.blocks)))


class GPTModule(L.LightningModule):
    """Next-token prediction with the plain GPT."""

    def __init__(self, num_blocks: int = 4, lr: float = 1e-2, vocab: int = VOCAB, ffn: int = 4 * WIDTH,
                 net: Callable[[], nn.Module] | None = None) -> None:
        super().__init__()
        self.lr = lr
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = net() if net is not None else GPT(num_blocks, vocab, ffn)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = self.net(idx)
        return out.logits if hasattr(out, "logits") else out

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def hf_gpt2(vocab: int, tied: bool) -> nn.Module:
    """A tiny GPT-2 from a config (no download): 2 blocks of width 64, 4 heads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_embd=WIDTH, n_layer=2, n_head=HEADS, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied, attn_implementation="sdpa",
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def vocab_size(spec: dict[str, Any]) -> int:
    """The model's vocabulary: the token data must stay below it."""
    return spec.get("vocab", GPT2_VOCAB if spec.get("kind") == "gpt2" else VOCAB)


def build_module(spec: dict[str, Any]) -> L.LightningModule:
    """``{"kind": "llama" | "moe" | "gpt" | "two_stream" | "gpt2", ...}`` -> a fresh module, the same everywhere."""
    kind = spec.get("kind", "llama")
    if kind == "gpt":
        return GPTModule(num_blocks=spec.get("num_blocks", 4), lr=spec.get("lr", 1e-2), vocab=vocab_size(spec),
                         ffn=spec.get("ffn", 4 * WIDTH))
    if kind == "two_stream":
        return GPTModule(lr=spec.get("lr", 1e-2), net=lambda: TwoStreamGPT(spec.get("num_blocks", 4)))
    if kind == "gpt2":
        vocab, tied = vocab_size(spec), spec.get("tied", True)
        return GPTModule(lr=spec.get("lr", 1e-2), net=lambda: hf_gpt2(vocab, tied))
    from picotron_lightning.models import CausalLMModule

    preset = "tiny-moe" if kind == "moe" else spec.get("preset", "tiny")
    return CausalLMModule(preset=preset, config=spec.get("config"), learning_rate=spec.get("lr", 1e-2), seed=0)
