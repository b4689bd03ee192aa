"""The strategies' flat arguments and the options object agree, and options are validated once, by name."""

from __future__ import annotations

import inspect
from datetime import timedelta

import pytest
import torch

from picotron_lightning import Picotron3DFabricStrategy, Picotron3DStrategy
from picotron_lightning.options import Picotron3DOptions, flat_option_names

# Arguments that belong to Lightning's Strategy base classes, not to the parallelism options.
LIGHTNING_ARGUMENTS = {"accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin",
                       "precision"}


@pytest.mark.parametrize("strategy", [Picotron3DStrategy, Picotron3DFabricStrategy])
def test_strategy_signature_matches_the_options(strategy):
    parameters = inspect.signature(strategy.__init__).parameters
    ours = [name for name in parameters if name not in LIGHTNING_ARGUMENTS | {"self"}]
    assert sorted(ours) == sorted(flat_option_names())  # every argument is an option and every option an argument
    # The signature's defaults build the default options.
    assert Picotron3DOptions.from_arguments({n: parameters[n].default for n in ours}) == Picotron3DOptions()


def test_flat_arguments_land_in_their_sections():
    options = Picotron3DOptions.from_arguments({
        "tensor_parallel_size": 2, "pipeline_schedule": "gpipe", "reduce_dtype": "fp32", "tp_plan": {"a": "colwise"},
        "activation_checkpointing": True, "timeout": timedelta(seconds=5), "self": object(),
    })
    assert options.layout.tp == 2
    assert options.pipeline.schedule == "gpipe"
    assert options.data_parallel.reduce_dtype is torch.float32  # converted once, here
    assert options.tensor_parallel.plan == {"a": "colwise"}
    assert options.memory.activation_checkpointing == "full"  # the flat True
    assert options.process.timeout == timedelta(seconds=5)
    assert Picotron3DOptions.from_arguments(options.as_arguments()) == options


@pytest.mark.parametrize(("arguments", "message"), [
    ({"data_parallel_mode": "zero3"}, "data_parallel_mode='zero3'"),
    ({"pipeline_schedule": "1b1f"}, "pipeline_schedule='1b1f'"),
    ({"reduce_dtype": "fp12"}, "reduce_dtype='fp12'"),
    ({"sequence_parallel": "yes"}, "sequence_parallel"),
    ({"hsdp_shard_size": 0}, "hsdp_shard_size"),
    ({"start_method": "fork"}, "start_method='fork'"),
    ({"data_parallel_mode": "ddp", "pipeline_parallel_size": 2}, "data_parallel_mode='ddp' is not supported"),
    ({"activation_checkpointing": "everything"}, "activation_checkpointing"),
    ({"activation_checkpointing": True, "memory": {"activation_checkpointing": "selective"}}, "disagree"),
    ({"memory": {"gc_every": 3}}, "unknown keys"),
])
def test_bad_options_are_refused_by_name(arguments, message):
    with pytest.raises(ValueError, match=message):
        Picotron3DStrategy(**arguments)


def test_options_are_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        Picotron3DStrategy().options.pipeline.schedule = "gpipe"  # type: ignore[misc]
