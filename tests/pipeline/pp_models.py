"""Models and runs for the pipeline tests: a plain GPT, a tiny Hugging Face Llama, generic fit and reference.

Every LightningModule here is an ordinary one: nothing in it knows about pipeline parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from picotron_lightning import Picotron3DStrategy
from picotron_lightning.testing import COLLECTIVE_TIMEOUT
from tests.fitting import fit_and_record
from tests.parity import TokenDataset, train_reference

VOCAB = 256


# ---------------------------------------------------------------------- a plain-PyTorch GPT, written here
class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token and position embeddings summed, blocks, final LayerNorm, untied head."""

    def __init__(self, d: int = 64, layers: int = 4, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, d)
        self.wpe = nn.Embedding(max_len, d)
        self.drop = nn.Dropout(0.0)
        self.h = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def tiny_hf_llama(tie_word_embeddings: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config)


def tiny_hf_llama_tied() -> nn.Module:
    """As Llama 3.2 1B/3B ship: ``lm_head.weight`` is ``model.embed_tokens.weight``."""
    model = tiny_hf_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


class LMModule(L.LightningModule):
    """Next-token loss around any ``model(tokens)`` returning logits (or an HF output with ``.logits``)."""

    def __init__(self, build: Callable[[], nn.Module], lr: float = 1e-2) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = build()
        self.lr = lr

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.net(batch[:, :-1])
        logits = getattr(out, "logits", out)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def two_stream_gpt() -> nn.Module:
    """The user-path GPT whose blocks pass two tensors to each other (``tests/user_path/scripts/user_models.py``)."""
    import sys
    from pathlib import Path

    scripts = str(Path(__file__).parents[1] / "user_path" / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    from user_models import TwoStreamGPT

    return TwoStreamGPT()


BUILDERS: dict[str, Callable[[], nn.Module]] = {"gpt": TinyGPT, "hf_llama": tiny_hf_llama,
                                                "hf_llama_tied": tiny_hf_llama_tied, "two_stream": two_stream_gpt}


def reference(build: str, data: torch.Tensor, steps: int, global_batch: int) -> list[float]:
    """One process, plain loop, the Trainer's shuffled order (seed 0 + epoch)."""
    module = LMModule(BUILDERS[build])
    return train_reference(module, data, steps, global_batch, loss_fn=module.loss)["losses"]


def fit(world: int, build: str, data: torch.Tensor, micro: int, steps: int, strategy_kwargs: dict) -> dict:
    """``Trainer.fit`` of an :class:`LMModule` under picotron3d; this rank's losses."""

    strategy = Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, **strategy_kwargs)
    fitted = fit_and_record(LMModule(BUILDERS[build]), DataLoader(TokenDataset(data), batch_size=micro),
                            strategy=strategy, devices=world, max_steps=steps)
    return {"losses": fitted.losses, "logged": float(fitted.trainer.callback_metrics["train_loss"])}
