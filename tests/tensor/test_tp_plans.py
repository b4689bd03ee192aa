"""Single-process checks of where tensor-parallel plans come from and how bad models are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from picotron_lightning.parallel.tensor_parallel import resolve_plan, validate_plan
from picotron_lightning.parallel.tensor_parallel.detect import classify_block, example_block_call, trace_block
from picotron_lightning.structure import find_main_block_stack
from picotron_lightning.topology import LayoutError
from tests.tensor.tp_models import HEADS, WIDTH, Cell, LMModule, TinyGPT

torch.set_num_threads(1)


def _classify(block: nn.Module) -> dict[str, str]:
    x = torch.randn(1, 8, WIDTH)
    return classify_block(block, trace_block(block, (x,), {}), "block")


def test_detector_classifies_linears_by_data_flow_not_names():
    styles = _classify(Cell())
    assert styles == {
        "mix.a": "colwise", "mix.b": "colwise", "mix.c": "colwise", "spread.widen": "colwise",
        "mix.back": "rowwise", "spread.narrow": "rowwise", "ln_a": "norm", "ln_b": "norm",
    }


class _Renamed(nn.Module):
    """The same data flow with misleading names: 'down' reads the input, 'up' writes back."""

    def __init__(self) -> None:
        super().__init__()
        self.o_proj = nn.Linear(WIDTH, 2 * WIDTH)  # name of a row-wise layer elsewhere; here a reader
        self.q_proj = nn.Linear(2 * WIDTH, WIDTH)  # name of a column-wise layer elsewhere; here a writer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.q_proj(F.relu(self.o_proj(x)))


def test_detector_ignores_misleading_names():
    assert _classify(_Renamed()) == {"o_proj": "colwise", "q_proj": "rowwise"}


class _DeepMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.l3(F.relu(self.l2(F.relu(self.l1(x)))))


def test_detector_refuses_a_linear_outside_the_megatron_pattern():
    with pytest.raises(LayoutError, match=r"\['l2'\] neither read"):
        _classify(_DeepMLP())


def test_detector_refuses_fused_qkv_split_by_position():
    with pytest.raises(LayoutError, match="fused"):
        _classify(Cell(fused=True))


class _UnbindFused(nn.Module):
    """Fused qkv split through a view and unbind: the shapes fit at tp=2, the numbers do not."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, t, 3, -1, WIDTH // HEADS).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.out(y.transpose(1, 2).reshape(n, t, -1))


class _UnbindModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, WIDTH)
        self.blocks = nn.ModuleList(_UnbindFused() for _ in range(2))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        for b in self.blocks:
            h = b(h)
        return h


def test_numeric_shard_check_catches_fused_projection_the_shapes_allow():
    root = _UnbindModel()
    plan = resolve_plan(root, None)
    assert plan.styles["blocks.0.qkv"] == "colwise"  # the trace alone cannot tell
    with pytest.raises(LayoutError, match="fused"):
        validate_plan(root, plan, 2)


def test_tp3_on_four_heads_names_heads_and_working_sizes():
    from tests.parity import make_module

    module = make_module()
    with pytest.raises(LayoutError, match=r"tensor_parallel_size=3 does not divide num_attention_heads=4.*\[1, 2\]"):
        validate_plan(module, resolve_plan(module, None), 3)


def test_hard_coded_head_count_names_module_and_fix():
    module = LMModule("gpt_hardcoded")
    with pytest.raises(LayoutError, match=r"dry run \(meta device\).*`net\.cells\.0\.mix` \(Mixer\).*-1"):
        validate_plan(module, resolve_plan(module, None), 2)


def test_hugging_face_plan_is_translated_with_norms_and_embedding():
    plan = resolve_plan(LMModule("hf"), None)
    assert plan.source == "huggingface"
    assert plan.head_counts == {"num_attention_heads": 4, "num_key_value_heads": 2}
    s = plan.styles
    assert s["net.model.layers.1.self_attn.k_proj"] == "colwise" and s["net.model.layers.1.mlp.down_proj"] == "rowwise"
    assert s["net.model.layers.1.post_attention_layernorm"] == "norm"
    assert s["net.lm_head"] == "head" and s["net.model.embed_tokens"] == "embedding"


class _Hooked(LMModule):
    def tensor_parallel_plan(self) -> dict:
        return {"cells.*.mix.a": "colwise", "cells.*.mix.back": "rowwise"}


def test_user_plan_and_module_hook_come_first():
    module = _Hooked("gpt")
    plan = resolve_plan(module, None)
    assert plan.source == "module hook"
    assert plan.styles == {"net.cells.0.mix.a": "colwise", "net.cells.1.mix.a": "colwise",
                           "net.cells.0.mix.back": "rowwise", "net.cells.1.mix.back": "rowwise"}
    given = resolve_plan(module, {"unembed": "head"})
    assert given.source == "tp_plan argument" and given.styles == {"net.unembed": "head"}
    with pytest.raises(LayoutError, match="matches no module"):
        resolve_plan(module, {"nothing.here": "colwise"})


def test_example_call_of_a_plain_block_uses_the_embedding_width():
    root = TinyGPT()
    (x,), _ = example_block_call(root, find_main_block_stack(root))
    assert x.shape[-1] == WIDTH
