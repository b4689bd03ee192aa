"""What the planner knows about a model: sizes, divisibility, FLOPs and saved activations.

Everything is measured on the **meta device** (no memory, no data): the model is built under
``torch.device("meta")``, one forward and backward of a batch of one sample runs under
``FlopCounterMode`` (exact FLOPs of every matmul and attention op), and one forward under
``saved_tensors_hooks`` records the bytes autograd keeps per block. FLOPs and activations are
linear in the number of samples, so a plan for micro-batch ``b`` multiplies these by ``b``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from picotron_lightning.memory.flops import FlopCount
from picotron_lightning.structure import find_main_block_stack

_HEADS = ("num_heads", "num_attention_heads", "n_head")
_KV_HEADS = ("num_kv_heads", "num_key_value_heads")
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts")
_TOP_K = ("moe_top_k", "num_experts_per_tok", "top_k")


@dataclass(frozen=True)
class ModelSpec:
    """Sizes and per-sample costs of a model at one sequence length (all counts for ONE sample)."""

    name: str
    seq_len: int
    num_blocks: int
    block_params: tuple[int, ...]
    """Parameter elements of each block (in order)."""
    block_expert_params: tuple[int, ...]
    """Of which routed-expert weights (sharded by ep, not by tp)."""
    block_norm_params: tuple[int, ...]
    """Of which 1-D weights (norms, biases): kept whole under tp."""
    embed_params: int
    head_params: int
    """Output projection (0 if tied to the embedding)."""
    other_params: int
    """Everything outside the blocks, embedding and head (the final norm, ...)."""
    hidden: int
    vocab: int
    heads: int | None
    kv_heads: int | None
    ffn: int | None
    num_experts: int
    top_k: int
    block_flops: tuple[float, ...]
    """Forward + backward FLOPs of each block for one sample."""
    block_forward_flops: tuple[float, ...]
    block_linear_forward_flops: tuple[float, ...]
    """Of the forward FLOPs, those of nn.Linear layers (selective checkpointing keeps their outputs)."""
    outer_flops: float
    """Forward + backward FLOPs outside the blocks (output projection, loss) for one sample."""
    block_saved_bytes: tuple[int, ...]
    """Bytes autograd saves in each block's forward for one sample (fp32; no checkpointing)."""
    block_matmul_out_bytes: tuple[int, ...]
    """Bytes of the block's matmul outputs (what selective checkpointing keeps) for one sample."""
    block_input_bytes: int
    """The hidden state entering a block, one sample (what full checkpointing keeps)."""
    outer_saved_bytes: int
    """Bytes saved outside the blocks (embedding output, final norm, logits, loss) for one sample."""
    logits_bytes: int
    dims: dict[str, int] = field(default_factory=dict)
    """Output sizes of every Linear in one block (for divisibility by tp)."""
    block_ops: tuple[int, ...] = ()
    """aten operations one block dispatches in one forward + backward pass (any batch size: a count of
    calls, not of work); what a per-op dispatch overhead is charged on."""
    block_forward_ops: tuple[int, ...] = ()
    """Of which forward (what full checkpointing runs again)."""
    block_linear_forward_ops: tuple[int, ...] = ()
    """Of the forward, those inside nn.Linear layers (selective checkpointing does not rerun them)."""
    outer_ops: int = 0
    """aten operations outside the blocks (embedding, final norm, head, loss), forward + backward."""
    block_param_tensors: tuple[int, ...] = ()
    """Parameter tensors of each block (the optimizer's per-tensor work)."""
    outer_param_tensors: int = 0

    @property
    def total_params(self) -> int:
        return sum(self.block_params) + self.embed_params + self.head_params + self.other_params

    @property
    def total_flops(self) -> float:
        return sum(self.block_flops) + self.outer_flops


def _config_value(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for holder in (module, getattr(module, "model", None)):
        config = getattr(holder, "config", None)
        for obj in (config, holder):
            for name in names:
                value = getattr(obj, name, None) if obj is not None else None
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


def _embedding(module: nn.Module) -> nn.Embedding:
    embeddings = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        raise ValueError("The planner needs a token embedding (an nn.Embedding) to know the vocabulary size.")
    return max(embeddings, key=lambda e: e.num_embeddings)


def _params(module: nn.Module, seen: set[int]) -> int:
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a model on the meta device: shapes only, no memory, seconds for 70B parameters."""
    with torch.device("meta"):
        return factory()


def _loss(output: object, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    assert isinstance(logits, torch.Tensor), "the model's forward must return logits (or an object with .logits)"
    if logits.dim() == 3 and logits.size(-1) == vocab:
        return F.cross_entropy(logits.reshape(-1, vocab).float(), tokens.reshape(-1))
    return logits.float().sum()


def describe_model(module: nn.Module, seq_len: int, name: str = "model") -> ModelSpec:
    """Measure ``module`` (best built with :func:`build_on_meta`) for one sample of ``seq_len`` tokens."""
    stack = find_main_block_stack(module)
    if stack is None:
        raise ValueError(f"{name}: no stack of repeated blocks found (an nn.ModuleList of same-class blocks); "
                         "the planner splits models by block.")
    blocks = stack.blocks
    seen: set[int] = set()
    block_params, expert_params, norm_params = [], [], []
    for block in blocks:
        block_params.append(_params(block, seen))
        expert_params.append(sum(p.numel() for n, p in block.named_parameters() if ".experts." in f".{n}"))
        norm_params.append(sum(p.numel() for p in block.parameters() if p.dim() == 1))
    embedding = _embedding(module)
    embed = _params(embedding, seen)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    head_modules = [m for m in linears if m.out_features == embedding.num_embeddings]
    head = sum(_params(m, seen) for m in head_modules)
    other = _params(module, seen)
    dims = {f"{n}": m.out_features for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}
    vocab, hidden = embedding.num_embeddings, embedding.embedding_dim
    tokens = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    forward, meta_params = _meta_forward(module)
    flops, forward_flops, linear_flops, outer_flops = _count_flops(forward, blocks, tokens, vocab)
    saved, matmul_out, outer_saved, logits_bytes = _count_saved(forward, meta_params, blocks, tokens, vocab)
    ops, forward_ops, linear_ops, outer_ops = _count_ops(forward, blocks, tokens, vocab)
    block_tensors = tuple(len(list(b.parameters())) for b in blocks)
    return ModelSpec(
        name=name, seq_len=seq_len, num_blocks=len(blocks), block_params=tuple(block_params),
        block_expert_params=tuple(expert_params), block_norm_params=tuple(norm_params),
        embed_params=embed, head_params=head, other_params=other, hidden=hidden, vocab=vocab,
        heads=_config_value(module, _HEADS), kv_heads=_config_value(module, _KV_HEADS) or _config_value(module, _HEADS),
        ffn=_config_value(module, ("ffn_size", "ffn_hidden_size", "intermediate_size")),
        num_experts=_config_value(module, _EXPERTS) or 0, top_k=_config_value(module, _TOP_K) or 1,
        block_flops=flops, block_forward_flops=forward_flops, block_linear_forward_flops=linear_flops,
        outer_flops=outer_flops,
        block_saved_bytes=saved, block_matmul_out_bytes=matmul_out, block_input_bytes=seq_len * hidden * 4,
        outer_saved_bytes=outer_saved, logits_bytes=logits_bytes, dims=dims,
        block_ops=ops, block_forward_ops=forward_ops, block_linear_forward_ops=linear_ops, outer_ops=outer_ops,
        block_param_tensors=block_tensors,
        outer_param_tensors=len(list(module.parameters())) - sum(block_tensors),
    )


def _meta_forward(module: nn.Module) -> tuple[Callable[[torch.Tensor], object], list[torch.Tensor]]:
    """``module``'s forward on meta stand-ins of its parameters and buffers (a real model is not touched)."""
    if all(t.device.type == "meta" for t in (*module.parameters(), *module.buffers())):
        return module, list(module.parameters())
    state = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
             for name, t in (*module.named_parameters(), *module.named_buffers())}
    params = [state[name] for name, _ in module.named_parameters()]
    return (lambda tokens: torch.func.functional_call(module, state, (tokens,), tie_weights=True)), params


def _count_flops(module: Callable[[torch.Tensor], object], blocks: list[nn.Module], tokens: torch.Tensor,
                 vocab: int) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...], float]:
    """Exact FLOPs: forward+backward per block, forward per block, Linear forward per block, outside blocks."""
    names = {id(b): f"block{i}" for i, b in enumerate(blocks)}
    forward: dict[str, float] = {}
    linear = [0.0] * len(blocks)
    counter = FlopCounterMode(display=False)
    in_backward = [False]

    def linear_hooks(i: int) -> tuple[Callable[..., None], Callable[..., None]]:
        def pre(*_: object) -> None:
            if not in_backward[0]:
                linear[i] -= counter.get_total_flops()

        def post(*_: object) -> None:
            if not in_backward[0]:
                linear[i] += counter.get_total_flops()
        return pre, post

    def pre(block: nn.Module, args: object) -> None:
        forward[names[id(block)]] = -counter.get_total_flops()

    def post(block: nn.Module, args: object, out: object) -> None:
        forward[names[id(block)]] += counter.get_total_flops()

    handles = [b.register_forward_pre_hook(pre) for b in blocks] + [b.register_forward_hook(post) for b in blocks]
    for i, b in enumerate(blocks):
        for m in b.modules():
            if isinstance(m, nn.Linear):
                lin_pre, lin_post = linear_hooks(i)
                handles += [m.register_forward_pre_hook(lin_pre), m.register_forward_hook(lin_post)]
    try:
        with counter:
            loss = _loss(module(tokens), tokens, vocab)
            total_forward = counter.get_total_flops()
            in_backward[0] = True
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    total = counter.get_total_flops()
    block_forward = tuple(float(forward[names[id(b)]]) for b in blocks)
    # Backward FLOPs of a block are (total backward) split in proportion to its forward share of the
    # blocks' matmul work: exact for identical blocks, which is what the search assumes anyway.
    backward = total - total_forward
    outer_forward = total_forward - sum(block_forward)
    # The output projection's backward is 2x its forward (grad input + grad weight); the embedding has none.
    outer_backward = 2.0 * outer_forward
    block_backward_total = backward - outer_backward
    share = [f / max(sum(block_forward), 1.0) for f in block_forward]
    flops = tuple(f + s * block_backward_total for f, s in zip(block_forward, share, strict=True))
    return flops, block_forward, tuple(linear), float(outer_forward + outer_backward)


def _count_ops(module: Callable[[torch.Tensor], object], blocks: list[nn.Module], tokens: torch.Tensor,
               vocab: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
    """aten calls of one forward + backward: per block (forward + backward, forward, Linear forward), outside."""
    counter = FlopCount()
    forward = [0] * len(blocks)
    linear = [0] * len(blocks)

    def around(counts: list[int], i: int, sign: int) -> Callable[..., None]:
        def hook(*_: object) -> None:
            if torch.is_grad_enabled():  # not during a checkpointed block's recomputation
                counts[i] += sign * counter.ops
        return hook

    handles = []
    for i, b in enumerate(blocks):
        handles += [b.register_forward_pre_hook(around(forward, i, -1)), b.register_forward_hook(around(forward, i, 1))]
        for m in b.modules():
            if isinstance(m, nn.Linear):
                handles += [m.register_forward_pre_hook(around(linear, i, -1)),
                            m.register_forward_hook(around(linear, i, 1))]
    try:
        with counter:
            loss = _loss(module(tokens), tokens, vocab)
            total_forward = counter.ops
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    backward = counter.ops - total_forward
    # The backward's calls are split over blocks and the rest in proportion to their forward calls (the
    # engine runs a block's backward ops in one stretch, but it has no hook that says where it starts).
    share = [f / max(total_forward, 1) for f in forward]
    per_block = tuple(f + round(s * backward) for f, s in zip(forward, share, strict=True))
    return per_block, tuple(forward), tuple(linear), counter.ops - sum(per_block)


class _AttentionFlag(TorchFunctionMode):
    """Sets ``flag[0]`` while ``F.scaled_dot_product_attention`` runs (its saved tensors are packed then)."""

    def __init__(self, flag: list[bool]) -> None:
        super().__init__()
        self.flag = flag

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.flag[0] = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.flag[0] = False


def _count_saved(module: Callable[[torch.Tensor], object], parameters: list[torch.Tensor],
                 blocks: list[nn.Module], tokens: torch.Tensor,
                 vocab: int) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """Bytes autograd saves per block and outside the blocks; matmul outputs per block."""
    # Parameters are saved too (often as transposed views): they are counted as parameters, not here.
    params = {p.untyped_storage()._cdata for p in parameters}
    seq_len = tokens.size(-1)
    current: list[int | None] = [None]
    saved = [0] * len(blocks)
    matmul_out = [0] * len(blocks)
    outer = [0]
    seen: set[int] = set()

    in_attention = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        # The meta device runs attention's math path, which saves the (s x s) probabilities; the fused
        # kernels that run on real devices (flash, memory-efficient, CPU flash) never store them. Only
        # what `scaled_dot_product_attention` itself saves can be them: a block's (s x hidden) states
        # have the same shape when hidden == s (the tiny model at s=64, 1b at s=2048) and are real.
        probabilities = in_attention[0] and t.dim() >= 2 and t.shape[-1] == t.shape[-2] == seq_len
        if key not in params and key not in seen and t.dtype.is_floating_point and not probabilities:
            seen.add(key)
            index = current[0]
            nbytes = storage.nbytes()
            if index is None:
                outer[0] += nbytes
            else:
                saved[index] += nbytes
        return t

    def enter(i: int) -> Callable[..., None]:
        def hook(*_: object) -> None:
            current[0] = i
        return hook

    def leave(*_: object) -> None:
        current[0] = None

    def linear_out(i: int) -> Callable[..., None]:
        def hook(_: nn.Module, __: object, out: torch.Tensor) -> None:
            matmul_out[i] += out.numel() * out.element_size()
        return hook

    handles = []
    for i, b in enumerate(blocks):
        handles += [b.register_forward_pre_hook(enter(i)), b.register_forward_hook(leave)]
        handles += [m.register_forward_hook(linear_out(i)) for m in b.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _AttentionFlag(in_attention):
            output = module(tokens)
            loss = _loss(output, tokens, vocab)
    finally:
        for h in handles:
            h.remove()
    del loss
    logits = tokens.numel() * vocab * 4
    return tuple(saved), tuple(matmul_out), outer[0], logits


def divisible(n: int | None, by: int) -> bool:
    """``n`` divisible by ``by`` (unknown sizes do not constrain)."""
    return n is None or n % by == 0


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["ModelSpec", "build_on_meta", "ceil_div", "describe_model", "divisible", "math"]
