"""Models for the tensor-parallel tests, each wrapped in a plain LightningModule.

* ``hf``: a tiny Hugging Face ``LlamaForCausalLM`` built from a config (its own ``_tp_plan``).
* ``gpt``: a plain-PyTorch GPT whose names mean nothing to the package (``mix``, ``spread``...),
  pre-LayerNorm, biases, GELU MLP; its plan must come from the data-flow detector.
* ``gpt_fused``: the same GPT with one linear producing q, k and v, split by position.
* ``gpt_hardcoded``: the same GPT reshaping with a hard-coded head count.
* ``gpt_odd``: the plain GPT with sizes tp does not divide: vocabulary ``ODD_VOCAB``, MLP width ``ODD_FFN``.
* ``gpt2``: a tiny Hugging Face ``GPT2LMHeadModel`` (``Conv1D`` projections, fused ``c_attn``) with an odd
  vocabulary ``GPT2_VOCAB``, head untied so the vocabulary is sharded; ``gpt2_tied``: GPT-2's default tying.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256
WIDTH = 64
HEADS = 4
ODD_VOCAB = 97  # prime: no tp > 1 divides it
ODD_FFN = 129
GPT2_VOCAB = 101


class Mixer(nn.Module):
    """Causal self-attention with arbitrary names; ``fused`` / ``hardcoded`` are the two bad variants."""

    def __init__(self, fused: bool = False, hardcoded: bool = False) -> None:
        super().__init__()
        self.fused, self.hardcoded = fused, hardcoded
        self.hd = WIDTH // HEADS
        if fused:
            self.abc = nn.Linear(WIDTH, 3 * WIDTH)
        else:
            self.a = nn.Linear(WIDTH, WIDTH)
            self.b = nn.Linear(WIDTH, WIDTH)
            self.c = nn.Linear(WIDTH, WIDTH)
        self.back = nn.Linear(WIDTH, WIDTH)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        n, t, _ = u.shape
        if self.fused:
            q, k, v = self.abc(u).split(WIDTH, dim=-1)
        else:
            q, k, v = self.a(u), self.b(u), self.c(u)
        heads = HEADS if self.hardcoded else -1
        q, k, v = (z.view(n, t, heads, self.hd).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.back(y.transpose(1, 2).reshape(n, t, -1))


class Spread(nn.Module):
    def __init__(self, ffn: int = 4 * WIDTH) -> None:
        super().__init__()
        self.widen = nn.Linear(WIDTH, ffn)
        self.narrow = nn.Linear(ffn, WIDTH)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.narrow(F.gelu(self.widen(u)))


class Cell(nn.Module):
    def __init__(self, ffn: int = 4 * WIDTH, **kw: bool) -> None:
        super().__init__()
        self.ln_a = nn.LayerNorm(WIDTH)
        self.mix = Mixer(**kw)
        self.ln_b = nn.LayerNorm(WIDTH)
        self.spread = Spread(ffn)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u = u + self.mix(self.ln_a(u))
        return u + self.spread(self.ln_b(u))


class TinyGPT(nn.Module):
    def __init__(self, layers: int = 2, vocab: int = VOCAB, ffn: int = 4 * WIDTH, **kw: bool) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, WIDTH)
        self.pos = nn.Parameter(torch.randn(64, WIDTH) * 0.02)
        self.cells = nn.ModuleList(Cell(ffn, **kw) for _ in range(layers))
        self.ln_out = nn.LayerNorm(WIDTH)
        self.unembed = nn.Linear(WIDTH, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        u = self.tok(idx) + self.pos[: idx.shape[1]]
        for cell in self.cells:
            u = cell(u)
        return self.unembed(self.ln_out(u))


def hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def hf_gpt2(tied: bool = False) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=GPT2_VOCAB, n_embd=WIDTH, n_layer=2, n_head=HEADS, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied, attn_implementation="sdpa", bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def vocab_of(kind: str) -> int:
    """The vocabulary of a model kind (the token data must stay below it)."""
    return {"gpt_odd": ODD_VOCAB, "gpt2": GPT2_VOCAB, "gpt2_tied": GPT2_VOCAB}.get(kind, VOCAB)


class LMModule(L.LightningModule):
    """Next-token loss over batches (batch, seq + 1) for any of the models above."""

    def __init__(self, kind: str = "gpt", lr: float = 1e-2) -> None:
        super().__init__()
        self.kind, self.lr = kind, lr
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if kind == "hf":
                self.net = hf_llama()
            elif kind.startswith("gpt2"):
                self.net = hf_gpt2(tied=kind == "gpt2_tied")
            elif kind == "gpt_odd":
                self.net = TinyGPT(vocab=ODD_VOCAB, ffn=ODD_FFN)
            else:
                self.net = TinyGPT(fused=kind == "gpt_fused", hardcoded=kind == "gpt_hardcoded")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.net(inputs)
        return out.logits if hasattr(out, "logits") else out

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = self(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
