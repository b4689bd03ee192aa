"""Pipeline splitting, schedules options and bad input: fast, mostly single-process checks."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn

from picotron_lightning.parallel.pipeline_parallel import (
    PipelineOptions,
    PipelinePlan,
    PipelineSplitError,
    balance_stages,
    choose_microbatches,
    find_pipeline_parts,
    plan_pipeline,
    stage_ids,
    theoretical_bubble,
)
from picotron_lightning.testing import run_ranks
from picotron_lightning.topology import LayoutError
from tests.pipeline.pp_models import TinyGPT, tiny_hf_llama


class Wrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.model = inner


def _llama(layers: int = 4, **kw: object) -> nn.Module:
    from picotron_lightning.models.llama import Llama, llama_config

    return Wrap(Llama(llama_config("tiny", num_layers=layers, **kw)))


def test_parts_of_the_reference_llama():
    parts = find_pipeline_parts(_llama())
    assert (parts.inner_name, parts.blocks_name, parts.num_blocks) == ("model", "model.layers", 4)
    assert parts.first == ["model.embed_tokens"] and parts.last == ["model.norm", "model.output"]


def test_parts_of_hf_llama_and_plain_gpt():
    hf = find_pipeline_parts(Wrap(tiny_hf_llama()))
    assert hf.blocks_name == "model.model.layers"
    assert hf.first == ["model.model.embed_tokens"] and hf.last == ["model.model.norm", "model.lm_head"]
    gpt = find_pipeline_parts(Wrap(TinyGPT()))
    assert gpt.first == ["model.wte", "model.wpe"] and gpt.last == ["model.ln_f", "model.lm_head"]


def test_balance_counts_embedding_and_head():
    assert balance_stages([1.0] * 4, 2) == [range(0, 2), range(2, 4)]
    # A heavy head pushes blocks towards the first stage.
    assert balance_stages([1.0] * 6, 2, first_cost=0.0, last_cost=2.0) == [range(0, 4), range(4, 6)]
    assert balance_stages([1.0] * 5, 2, first_cost=0.0, last_cost=3.0) == [range(0, 4), range(4, 5)]
    assert balance_stages([1.0] * 5, 2, first_cost=3.0, last_cost=0.0) == [range(0, 1), range(1, 5)]


def test_more_stages_than_blocks_is_refused_naming_the_block_count():
    with pytest.raises(LayoutError, match="only 2 blocks .*model.layers"):
        plan_pipeline(_llama(layers=2), 4, PipelineOptions())
    with pytest.raises(LayoutError, match="virtual_stages=2 = 4 stages.*only 3 blocks"):
        plan_pipeline(_llama(layers=3), 2, PipelineOptions(schedule="interleaved_1f1b"))


def test_unsplittable_model_names_the_hook():
    model = Wrap(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    with pytest.raises(PipelineSplitError, match="configure_pipeline_stages"):
        plan_pipeline(model, 2, PipelineOptions())


def test_the_hook_declares_stages():
    class Declared(Wrap):
        def configure_pipeline_stages(self) -> PipelinePlan:
            return PipelinePlan("model.body", first=("model.inp",), last=("model.head",))

    inner = nn.Module()
    inner.inp = nn.Linear(4, 8)
    inner.body = nn.ModuleList([nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8))])  # mixed classes
    inner.head = nn.Linear(8, 2)
    parts, assignment = plan_pipeline(Declared(inner), 2, PipelineOptions())
    assert parts.blocks_name == "model.body" and assignment == [range(0, 1), range(1, 2)]


def test_tied_embeddings_across_stages_are_found():
    from picotron_lightning.parallel.pipeline_parallel.tied import find_tied_across_stages

    root = _llama(tie_embeddings=True)
    parts, _ = plan_pipeline(root, 2, PipelineOptions())  # accepted: each end keeps a copy
    pairs = find_tied_across_stages(root, parts)
    assert [(p.first, p.last) for p in pairs] == [("model.embed_tokens.weight", "model.output.weight")]
    assert find_tied_across_stages(_llama(), find_pipeline_parts(_llama())) == []
    hf = tiny_hf_llama(tie_word_embeddings=True)
    pairs = find_tied_across_stages(hf, find_pipeline_parts(hf))
    assert [(p.first, p.last) for p in pairs] == [("model.embed_tokens.weight", "lm_head.weight")]


@pytest.mark.parametrize("options, match", [
    ({"schedule": "zbv"}, "pipeline_schedule='zbv'.*same rank"),
    ({"split": "trace"}, "pipeline_split='trace'"),
])
def test_tied_embeddings_refused_where_the_ends_cannot_be_copies(options, match):
    with pytest.raises(PipelineSplitError, match=match):
        plan_pipeline(_llama(tie_embeddings=True), 2, PipelineOptions(**options))


def test_options_are_checked_at_construction():
    from picotron_lightning import Picotron3DFabricStrategy, Picotron3DStrategy

    with pytest.raises(LayoutError, match="pipeline_schedule='pipedream'"):
        Picotron3DStrategy(pipeline_parallel_size=2, pipeline_schedule="pipedream")
    with pytest.raises(LayoutError, match="virtual_stages=2.*interleaved"):
        Picotron3DStrategy(pipeline_parallel_size=2, virtual_stages=2)
    with pytest.raises(LayoutError, match="num_microbatches"):
        Picotron3DStrategy(pipeline_parallel_size=2, num_microbatches=0)
    # Fabric runs pipelines too (through `forward_backward`) and checks the same options.
    assert Picotron3DFabricStrategy(pipeline_parallel_size=2).layout.pp == 2
    with pytest.raises(LayoutError, match="pipeline_schedule='pipedream'"):
        Picotron3DFabricStrategy(pipeline_parallel_size=2, pipeline_schedule="pipedream")


def test_microbatch_default_and_bubble_warning():
    opts = PipelineOptions()
    assert choose_microbatches(32, 2, opts) == 8  # the smallest divisor >= 4 x pp
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert choose_microbatches(2, 2, opts) == 2
    assert any("idle about 33%" in str(w.message) for w in caught)
    with pytest.raises(LayoutError, match="does not divide"):
        choose_microbatches(8, 2, PipelineOptions(num_microbatches=3))
    with pytest.raises(LayoutError, match="at least 4 microbatches"):
        choose_microbatches(2, 4, opts)
    assert theoretical_bubble(4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble(4, 8, 2) < theoretical_bubble(4, 8)


def test_stage_placement():
    assert stage_ids(1, 4, PipelineOptions()) == [1]
    assert stage_ids(1, 4, PipelineOptions(schedule="interleaved_1f1b")) == [1, 5]
    assert stage_ids(1, 4, PipelineOptions(schedule="zbv")) == [1, 6]


def _too_many_stages(rank: int, world: int) -> None:
    from tests.parity import make_data, trainer_run

    # two blocks, pp=2 x 2 virtual stages: must fail in setup, before any collective can hang
    trainer_run(world, make_data(8), 4, 2, {"pipeline_parallel_size": 2, "pipeline_schedule": "interleaved_1f1b"},
                config={"num_layers": 2})


@pytest.mark.slow
def test_too_many_stages_fails_fast_in_a_real_run():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="only 2 blocks"):
        run_ranks(_too_many_stages, 2, timeout=120)
    assert time.monotonic() - start < 90


def test_microbatch_split_is_exact():
    from picotron_lightning.parallel.pipeline_parallel.user_step import merge_outputs, split_batch

    batch = {"x": torch.arange(12).reshape(6, 2), "n": 3}
    parts = split_batch(batch, 3)
    assert [p["x"].shape[0] for p in parts] == [2, 2, 2] and all(p["n"] == 3 for p in parts)
    assert torch.equal(merge_outputs([p["x"] for p in parts]), batch["x"])


def test_unknown_split_is_refused():
    assert PipelineOptions(split="trace").split == "trace"
    with pytest.raises(LayoutError, match="pipeline_split='graph'.*'structural', 'trace'"):
        PipelineOptions(split="graph")
