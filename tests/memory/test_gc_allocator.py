"""Garbage collection and allocator control: the decisions as pure functions, and GC on real ranks.

The multi-rank test starts the way users start: a script run with ``python script.py`` and nothing
in the environment, so Lightning's own launcher starts the second rank.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from picotron_lightning.memory.allocator import (
    expandable_segments_action,
    fragmentation,
    is_check_step,
    should_empty_cache,
    with_expandable_segments,
)
from picotron_lightning.memory.gc_control import GarbageCollection, is_collection_step
from picotron_lightning.memory.options import MemoryOptions

REPO = Path(__file__).resolve().parents[2]


def test_collection_steps() -> None:
    assert [s for s in range(0, 11) if is_collection_step(s, 5)] == [5, 10]
    assert not any(is_collection_step(s, None) for s in range(10))


def test_garbage_collection_runs_only_when_scheduled() -> None:
    seen: list[int] = []
    step = [0]

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append(step[0])

    control = GarbageCollection(every_n_steps=3)
    control.start()
    gc.callbacks.append(record)
    try:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        for step[0] in range(1, 10):
            for _ in range(5000):  # allocations that would trigger automatic collections
                [[] for _ in range(3)]  # noqa: B018 - garbage on purpose
            control.step(step[0])
    finally:
        gc.callbacks.remove(record)
        control.stop()
    assert seen == [3, 6, 9]
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert control.collections == 3


def test_expandable_segments_setting() -> None:
    assert with_expandable_segments(None) == "expandable_segments:True"
    assert with_expandable_segments("max_split_size_mb:128") == "max_split_size_mb:128,expandable_segments:True"
    assert with_expandable_segments("expandable_segments:False") == "expandable_segments:False"  # user's choice
    assert expandable_segments_action(None, cuda_initialized=False) == ("expandable_segments:True", None)
    new, warning = expandable_segments_action("", cuda_initialized=True)
    assert new is None and "no effect" in warning and "PYTORCH_CUDA_ALLOC_CONF" in warning
    assert expandable_segments_action("expandable_segments:True", cuda_initialized=True) == (None, None)


def test_fragmentation_decision() -> None:
    gib = 1 << 30
    assert fragmentation(0, 0) == 0.0
    assert fragmentation(4 * gib, 1 * gib) == 0.75
    assert should_empty_cache(4 * gib, 1 * gib, threshold=0.5, min_bytes=gib)
    assert not should_empty_cache(4 * gib, 3 * gib, threshold=0.5, min_bytes=gib)  # not fragmented enough
    assert not should_empty_cache(4 << 20, 1 << 20, threshold=0.5, min_bytes=gib)  # too few bytes to matter
    assert not should_empty_cache(4 * gib, 0, threshold=1.0, min_bytes=0)  # 1.0 turns it off
    assert [s for s in range(0, 7) if is_check_step(s, 3)] == [3, 6]


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"activation_checkpointing": "half"}, "activation_checkpointing='half'"),
    ({"checkpoint_every": 0}, "checkpoint_every=0"),
    ({"gc_every_n_steps": -1}, "gc_every_n_steps=-1"),
    ({"fragmentation_threshold": 1.5}, "fragmentation_threshold=1.5"),
    ({"gc_freeze_after_setup": "yes"}, "gc_freeze_after_setup"),
])
def test_bad_memory_options_name_the_argument(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        MemoryOptions(**kwargs)
    with pytest.raises(ValueError, match="unknown keys"):
        MemoryOptions.from_arg({"gc_every": 3})


SCRIPT = '''
import gc, json, sys
import lightning as L
import torch
from torch.utils.data import DataLoader
from picotron_lightning import Picotron3DStrategy
from picotron_lightning.models import CausalLMModule

out_dir = sys.argv[1]

class RecordCollections(L.Callback):
    """Every collection during training, with the optimizer step it happened after."""
    def __init__(self):
        self.steps, self.trainer = [], None
    def _record(self, phase, info):
        if phase == "start" and self.trainer is not None:
            self.steps.append(self.trainer.global_step)
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.trainer is None:
            self.trainer = trainer
            gc.callbacks.append(self._record)
    def on_train_end(self, trainer, pl_module):
        gc.callbacks.remove(self._record)
        self.trainer = None

recorder = RecordCollections()
data = torch.randint(0, 256, (64, 17), generator=torch.Generator().manual_seed(0))
trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=7, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                    strategy=Picotron3DStrategy(memory={"gc_every_n_steps": 3}))
trainer.fit(CausalLMModule("tiny"), DataLoader(data, batch_size=2))
with open(f"{out_dir}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"steps": recorder.steps, "world": trainer.world_size}, f)
'''


def _user_env() -> dict[str, str]:
    """The environment of a user's shell: no launcher variables, this checkout importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
                        "LOCAL_WORLD_SIZE", "GROUP_RANK")
           and not k.startswith(("TORCHELASTIC", "SLURM", "PL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_gc_collects_at_the_same_steps_on_every_rank_under_lightnings_launcher(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], env=_user_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    # Only the scheduled collections, after optimizer steps 3 and 6, on both ranks.
    assert ranks[0]["steps"] == ranks[1]["steps"] == [3, 6], ranks
