"""The example's LightningCLI accepts picotron3d by name, by class path with arguments, and from YAML."""

from __future__ import annotations

import os
import subprocess
import sys
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
    assert strategy._parallel_config.data_parallel.mode == "fsdp"


def test_cli_reports_bad_size_by_name():
    with pytest.raises(Exception, match="data_parallel_size=4"):  # noqa: B017 - LayoutError or CLI wrapper
        _cli("--trainer.strategy=picotron_lightning.Picotron3DStrategy", "--trainer.strategy.data_parallel_size=4")


@pytest.mark.slow
def test_example_trains_from_yaml_and_writes_tensorboard(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, str(ROOT / "examples/pretrain.py"), "fit",
        "--config", str(ROOT / "examples/configs/pretrain_dp.yaml"),
        "--trainer.max_steps=3", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--trainer.val_check_interval=3",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.max_bytes=200000",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train_loss" in acc.Tags()["scalars"]
