"""``compile=``: options, refusals before any process group, and per-block compilation in place."""

from __future__ import annotations

import pytest
import torch

from picotron_lightning import Picotron3DStrategy
from picotron_lightning.models import CausalLMModule
from picotron_lightning.parallel.compile import CompileOptions, apply_compile, check_compilable, compiled_blocks
from picotron_lightning.topology import LayoutError


def test_compile_argument_forms():
    assert Picotron3DStrategy().options.compile == CompileOptions()
    assert Picotron3DStrategy(compile=True).options.compile.enabled
    options = Picotron3DStrategy(compile={"backend": "aot_eager", "fullgraph": True}).options.compile
    assert options.enabled and options.arguments == {"backend": "aot_eager", "fullgraph": True}


@pytest.mark.parametrize(("value", "message"), [
    ({"backnd": "inductor"}, r"torch.compile does not take: \['backnd'\]"),
    ("yes", "must be True, False or a dict"),
])
def test_bad_compile_arguments_are_refused_by_name(value, message):
    with pytest.raises(ValueError, match=message):
        Picotron3DStrategy(compile=value)


def test_moe_models_are_refused_with_the_reason():
    moe = CausalLMModule(preset="tiny-moe")
    with pytest.raises(LayoutError, match="MoE layers: routing sends a different number of tokens"):
        check_compilable(moe, CompileOptions(enabled=True), moe=True, traced_pipeline=False)
    # The strategy checks it before creating any process group (in `_setup_processes`).
    with pytest.raises(LayoutError, match="compile=... is not supported for models with MoE layers"):
        Picotron3DStrategy(compile=True)._check_compilable(moe)


def test_a_model_without_blocks_is_refused():
    with pytest.raises(LayoutError, match="has no stack of repeated blocks"):
        check_compilable(torch.nn.Linear(4, 4), CompileOptions(enabled=True), moe=False, traced_pipeline=False)


def test_each_block_is_compiled_in_place_and_names_are_kept():
    torch.manual_seed(0)
    eager = CausalLMModule(preset="tiny", config={"num_layers": 3})
    compiled = CausalLMModule(preset="tiny", config={"num_layers": 3})
    names = list(compiled.state_dict())
    assert apply_compile(compiled, CompileOptions(enabled=True, arguments={"backend": "eager"})) == 3
    assert compiled_blocks(compiled) == 3 and compiled_blocks(eager) == 0
    assert list(compiled.state_dict()) == names  # checkpoints keep the model's own keys
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(compiled(tokens), eager(tokens))
