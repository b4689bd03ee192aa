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


def test_detector_keeps_a_fused_qkv_with_its_number_of_parts():
    block = Cell(fused=True)
    trace = trace_block(block, (torch.randn(1, 8, WIDTH),), {})
    assert classify_block(block, trace, "block")["mix.abc"] == "colwise"
    assert trace.fused == {"mix.abc": 3}


def test_fused_qkv_split_by_a_hard_coded_width_is_refused_by_the_dry_run():
    module = LMModule("gpt_fused")  # `split(WIDTH)`: the rank cannot know its local width
    with pytest.raises(LayoutError, match=r"dry run.*fused projection\(s\) \['net\.cells\.0\.mix\.abc'\]"):
        validate_plan(module, resolve_plan(module, None), 2)


class _GroupedQKV(nn.Module):
    """q with more heads than k and v, fused: parts of different sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 2 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split([WIDTH, WIDTH // 2, WIDTH // 2], dim=-1)
        return x + self.out(q * torch.cat([k, v], dim=-1))


def test_fused_projection_with_unequal_parts_is_refused():
    with pytest.raises(LayoutError, match=r"\['qkv'\] is split by position into parts of different sizes"):
        _classify(_GroupedQKV())


def test_sizes_tp_does_not_divide_are_accepted_head_counts_still_must_divide():
    module = LMModule("gpt_odd")  # vocabulary 97, MLP width 129, 4 heads of 16 (not stated: the dry run finds them)
    plan = resolve_plan(module, None)
    for tp in (2, 4):
        validate_plan(module, plan, tp)
    with pytest.raises(LayoutError, match=r"tensor_parallel_size=3.*dry run.*Sizes that would work.*\[1, 2, 4\]"):
        validate_plan(module, plan, 3)


def test_a_sharded_size_smaller_than_tp_is_refused_by_name():
    module = TinyGPT(ffn=3)
    with pytest.raises(LayoutError, match=r"tensor_parallel_size=4 is larger than out_features=3 of "
                                          r"'cells\.0\.spread\.widen'.*\[1, 2\]"):
        validate_plan(module, resolve_plan(module, None), 4)


def test_hugging_face_gpt2_is_planned_from_its_conv1d_data_flow():
    module = LMModule("gpt2")
    plan = resolve_plan(module, None)
    s = plan.styles
    assert s["net.transformer.h.0.attn.c_attn"] == s["net.transformer.h.0.mlp.c_fc"] == "colwise"
    assert s["net.transformer.h.0.attn.c_proj"] == s["net.transformer.h.0.mlp.c_proj"] == "rowwise"
    assert s["net.transformer.h.0.ln_1"] == s["net.transformer.h.0.ln_2"] == "norm"
    assert s["net.lm_head"] == "head" and s["net.transformer.wte"] == "embedding"
    assert plan.fused == {"net.transformer.h.0.attn.c_attn": 3, "net.transformer.h.1.attn.c_attn": 3}
    assert plan.head_counts == {"num_attention_heads": HEADS}
    for tp in (2, 4):  # the numeric check runs the regrouped q|k|v shards and the local split_size
        validate_plan(module, plan, tp)
    with pytest.raises(LayoutError, match="num_attention_heads=4"):
        validate_plan(module, plan, 3)


def test_gpt2_sharded_contiguously_instead_of_per_part_is_refused():
    """The per-part regrouping is what makes GPT-2's fused c_attn shardable: without it, validation refuses."""
    module = LMModule("gpt2")
    plan = resolve_plan(module, None)
    plan.fused.clear()
    with pytest.raises(LayoutError, match="c_attn|attn"):
        validate_plan(module, plan, 2)


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
