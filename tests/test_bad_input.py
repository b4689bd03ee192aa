"""Bad input fails fast, with a message that names the argument, and loses nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import lightning as L
import pytest
import torch

import picotron_lightning
from picotron_lightning import LayoutError, Picotron3DFabricStrategy, Picotron3DStrategy
from picotron_lightning.models import CausalLMModule
from picotron_lightning.strategies.checkpoint import CheckpointError, collect_state, load_sharded, save_sharded


def test_name_is_registered_for_trainer_and_fabric():
    from lightning.fabric.strategies import STRATEGY_REGISTRY
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["picotron3d"]["strategy"] is Picotron3DStrategy
    assert STRATEGY_REGISTRY["picotron3d"]["strategy"] is Picotron3DFabricStrategy
    assert "parallelism" in StrategyRegistry["picotron3d"]["description"]
    trainer = L.Trainer(strategy="picotron3d", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, Picotron3DStrategy)
    assert picotron_lightning.__version__


def test_wrong_data_parallel_size_is_refused_when_the_trainer_is_built():
    with pytest.raises(LayoutError, match=r"data_parallel_size=3 .* world size 2"):
        L.Trainer(strategy=Picotron3DStrategy(data_parallel_size=3), accelerator="cpu", devices=2)
    with pytest.raises(LayoutError, match=r"data_parallel_size=3"):
        L.Fabric(strategy=Picotron3DFabricStrategy(data_parallel_size=3), accelerator="cpu", devices=2)


@pytest.mark.slow
def test_wrong_size_exits_within_seconds_from_a_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import lightning as L
        from picotron_lightning import Picotron3DStrategy
        L.Trainer(strategy=Picotron3DStrategy(data_parallel_size=3), accelerator="cpu", devices=2)
    """))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "data_parallel_size=3" in proc.stderr and "would work" in proc.stderr
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(
    "kwargs, match",
    [({"data_parallel_mode": "zero3"}, "data_parallel_mode"), ({"hsdp_shard_size": 0}, "hsdp_shard_size"),
     ({"reduce_dtype": "fp12"}, "reduce_dtype"), ({"start_method": "fork"}, "start_method"),
     ({"data_parallel_mode": "ddp", "pipeline_parallel_size": 2}, "not supported with pipeline")],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Picotron3DStrategy(**kwargs)


def _trained(config: dict | None = None) -> tuple[CausalLMModule, torch.optim.Optimizer]:
    module = CausalLMModule(config=config)
    optimizer = module.configure_optimizers()
    module._loss(torch.randint(0, 256, (2, 9))).backward()
    optimizer.step()
    return module, optimizer


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.fixture
def checkpoint(tmp_path):
    module, optimizer = _trained()
    path = tmp_path / "good.ckpt"
    save_sharded(path, collect_state(module, [optimizer]), {"epoch": 3})
    return path, module


def test_round_trip(checkpoint):
    path, saved = checkpoint
    module, optimizer = _trained({"init_std": 0.5})
    assert load_sharded(path, module, [optimizer]) == {"epoch": 3}
    assert _same_weights(module, saved)


def test_checkpoint_of_another_model_is_refused_and_changes_nothing(checkpoint):
    path, _ = checkpoint
    for config, match in [({"num_layers": 3}, "missing"), ({"ffn_hidden_size": 96}, "shape")]:
        module, optimizer = _trained(config)
        before = _snapshot(module)
        with pytest.raises(CheckpointError, match=match):
            load_sharded(path, module, [optimizer])
        assert _unchanged(module, before)


def test_corrupt_shard_is_refused_and_changes_nothing(checkpoint):
    path, _ = checkpoint
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    module, optimizer = _trained({"init_std": 0.5})
    before = _snapshot(module)
    with pytest.raises(CheckpointError, match="could not be read.*unchanged"):
        load_sharded(path, module, [optimizer])
    assert _unchanged(module, before)


@pytest.mark.parametrize("what", ["missing", "file", "no_meta"])
def test_not_a_checkpoint(tmp_path, checkpoint, what):
    path, _ = checkpoint
    if what == "missing":
        target, match = tmp_path / "nope.ckpt", "does not exist"
    elif what == "file":
        target, match = tmp_path / "plain.ckpt", "not a sharded"
        target.write_bytes(b"not a checkpoint")
    else:
        (path / "meta.pt").unlink()
        target, match = path, "incomplete"
    module, optimizer = _trained()
    with pytest.raises(CheckpointError, match=match):
        load_sharded(target, module, [optimizer])


def test_failed_save_keeps_the_previous_checkpoint(checkpoint):
    path, saved = checkpoint
    other, optimizer = _trained({"init_std": 0.5})
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save
        save_sharded(path, collect_state(other, [optimizer]), {"bad": lambda: 0})
    module, optimizer = _trained({"init_std": 0.1})
    load_sharded(path, module, [optimizer])
    assert _same_weights(module, saved)


@pytest.mark.slow
@pytest.mark.parametrize("bad_rank", [0, 1])
def test_a_failing_rank_brings_the_launched_run_down_with_its_error(tmp_path, bad_rank):
    """Lightning's own launcher (popen), a rank raising mid-training: no rank is left waiting."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(f"""
        import lightning as L, torch
        import picotron_lightning
        from picotron_lightning.models import CausalLMModule
        from torch.utils.data import DataLoader

        class Failing(CausalLMModule):
            def training_step(self, batch, i):
                if i == 2 and self.global_rank == {bad_rank}:
                    raise ValueError("boom on rank {bad_rank}")
                return super().training_step(batch, i)

        trainer = L.Trainer(strategy="picotron3d", accelerator="cpu", devices=2, max_steps=10, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(Failing(), DataLoader(torch.randint(0, 256, (64, 17)), batch_size=2))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode != 0
    assert f"boom on rank {bad_rank}" in proc.stdout + proc.stderr
