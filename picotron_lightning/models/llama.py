"""A small Llama-style decoder in plain PyTorch: RMSNorm, rotary embeddings, SwiGLU and GQA.

The model is deliberately parallelism-free; the strategy shards it from outside. Two habits make
that possible: attention infers its local head count from tensor shapes (``view(..., -1, hd)``),
so column-sharded projections just work, and the top level is ``embed -> layers -> norm -> output``
with ``layers`` a ``ModuleList`` of identical blocks, the shape the pipeline splitter looks for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    """Sizes of the reference model. ``num_experts > 0`` swaps the MLP for an MoE layer."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_hidden_size: int = 0  # 0: derived, about 8/3 * hidden rounded up to a multiple of 32
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Mixture of experts (0 = dense). MoE is used in every `moe_every`-th block.
    num_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1
    moe_ffn_hidden_size: int = 0  # 0: same as ffn_hidden_size
    moe_capacity_factor: float | None = None
    moe_aux_loss_coeff: float = 1e-2
    moe_z_loss_coeff: float = 1e-3
    moe_bias_update_rate: float = 0.0  # > 0: auxiliary-loss-free balancing through the router's expert bias
    moe_num_shared_experts: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}.")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return 32 * math.ceil(8 * self.hidden_size / 3 / 32)

    @property
    def moe_ffn_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_size

    def is_moe_layer(self, index: int) -> bool:
        return self.num_experts > 0 and index % self.moe_every == self.moe_every - 1

    def to_dict(self) -> dict:
        return asdict(self)


# Presets from ~100K to ~1B parameters (byte-level vocabulary unless noted).
PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),  # ~0.13M
    "small": LlamaConfig(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4),  # ~2.8M
    "base": LlamaConfig(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4),  # ~22M
    "medium": LlamaConfig(hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=8, vocab_size=32000),
    "1b": LlamaConfig(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, vocab_size=32000,
                      ffn_hidden_size=8192),  # ~1.1B
    "tiny-moe": LlamaConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                            moe_top_k=2, moe_ffn_hidden_size=64),
}


def llama_config(preset: str = "tiny", **overrides: object) -> LlamaConfig:
    """A preset by name, with any field overridden: ``llama_config("small", num_layers=2)``."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return replace(PRESETS[preset], **overrides)  # type: ignore[arg-type]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the mean of squares loses too much in bf16/fp16.
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rotary_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin of shape (seq_len, head_dim / 2), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x with shape (batch, seq, heads, head_dim)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.kv_groups = config.num_heads // config.num_kv_heads
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of the heads.
        q = self.q_proj(x).view(bsz, seq, -1, self.head_dim)
        k = self.k_proj(x).view(bsz, seq, -1, self.head_dim)
        v = self.v_proj(x).view(bsz, seq, -1, self.head_dim)
        cos, sin = rotary_tables(seq, self.head_dim, self.rope_theta, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kv_groups > 1:
            k = k.repeat_interleave(self.kv_groups, dim=2)
            v = v.repeat_interleave(self.kv_groups, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _make_mlp(config: LlamaConfig, index: int) -> nn.Module:
    if not config.is_moe_layer(index):
        return FeedForward(config.hidden_size, config.ffn_size)
    from picotron_lightning.moe import MoELayer

    return MoELayer(
        config.hidden_size,
        config.moe_ffn_size,
        config.num_experts,
        top_k=config.moe_top_k,
        capacity_factor=config.moe_capacity_factor,
        aux_loss_coeff=config.moe_aux_loss_coeff,
        z_loss_coeff=config.moe_z_loss_coeff,
        bias_update_rate=config.moe_bias_update_rate,
        num_shared_experts=config.moe_num_shared_experts,
    )


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig, index: int = 0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = _make_mlp(config, index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Decoder-only LM: tokens (batch, seq) -> logits (batch, seq, vocab)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count; ``active_only`` counts only the experts one token uses in MoE layers."""
        total = sum(p.numel() for p in self.parameters())
        if not active_only or self.config.num_experts == 0:
            return total
        c = self.config
        per_expert = 3 * c.hidden_size * c.moe_ffn_size
        n_moe = sum(c.is_moe_layer(i) for i in range(c.num_layers))
        return total - n_moe * per_expert * (c.num_experts - c.moe_top_k)
