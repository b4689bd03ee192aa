"""The example's LightningCLI accepts picotron3d by name, by class path with arguments, and from YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from picotron_lightning import Picotron3DStrategy
from picotron_lightning.data import StdlibDataModule
from picotron_lightning.models import CausalLMModule

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> LightningCLI:
    return LightningCLI(
        CausalLMModule, StdlibDataModule, run=False,
        args=["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.logger=false", *args],
    )


def test_strategy_by_name():
    cli = _cli("--trainer.strategy=picotron3d")
    assert isinstance(cli.trainer.strategy, Picotron3DStrategy)


def test_strategy_by_class_path_with_arguments():
    cli = _cli(
        "--trainer.strategy=picotron_lightning.Picotron3DStrategy",
        "--trainer.strategy.data_parallel_mode=fsdp",
        "--trainer.strategy.pipeline_parallel_size=2",
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, Picotron3DStrategy)
    assert strategy.layout.pp == 2 and strategy.layout.dp == 1
    assert strategy.options.data_parallel.mode == "fsdp"


def test_cli_reports_bad_size_by_name():
    with pytest.raises(Exception, match="data_parallel_size=4"):  # noqa: B017 - LayoutError or CLI wrapper
        _cli("--trainer.strategy=picotron_lightning.Picotron3DStrategy", "--trainer.strategy.data_parallel_size=4")

# Running the example configs end to end: tests/user_path/test_examples.py.
