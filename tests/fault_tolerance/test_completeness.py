"""Complete-only checkpoints, clean-up of half-written ones, retention, resume discovery, data order (one process)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from picotron_lightning.fault_tolerance import (
    CheckpointWriter,
    FaultToleranceOptions,
    clean_incomplete,
    complete_checkpoints,
    is_complete,
    newest_complete_checkpoint,
    wants_resume,
)
from picotron_lightning.fault_tolerance.data_order import ResumableSampler, make_resumable
from picotron_lightning.strategies.checkpoint import CheckpointError, collect_state, load_sharded


def _save(tmp_path, name, step, keep=None):
    model = torch.nn.Linear(4, 4)
    CheckpointWriter(keep_last=keep).save(tmp_path / name, collect_state(model), {"global_step": step, "epoch": 0})
    return model


def test_a_checkpoint_is_complete_only_with_its_marker(tmp_path):
    model = _save(tmp_path, "step=2.ckpt", 2)
    assert is_complete(tmp_path / "step=2.ckpt")
    (tmp_path / "step=2.ckpt" / "COMPLETE").unlink()  # as if a rank died before the marker
    with pytest.raises(CheckpointError, match="incomplete"):
        load_sharded(tmp_path / "step=2.ckpt", model)
    assert newest_complete_checkpoint([tmp_path]) is None


def test_the_newest_complete_checkpoint_wins_and_half_written_ones_are_removed(tmp_path):
    _save(tmp_path, "step=2.ckpt", 2)
    _save(tmp_path, "step=4.ckpt", 4)
    (tmp_path / "step=6.ckpt.partial").mkdir()  # a crash mid-save: shards, no marker
    (tmp_path / "step=6.ckpt.partial" / "__0_0.distcp").write_bytes(b"half")
    newest = newest_complete_checkpoint([tmp_path])
    assert newest is not None and newest.path.name == "step=4.ckpt" and newest.global_step == 4
    assert not (tmp_path / "step=6.ckpt.partial").exists()


def test_a_finished_but_unrenamed_checkpoint_is_kept(tmp_path):
    _save(tmp_path, "step=2.ckpt", 2)
    (tmp_path / "step=2.ckpt").rename(tmp_path / "step=2.ckpt.partial")  # the crash came between marker and rename
    clean_incomplete(tmp_path)
    assert [c.path.name for c in complete_checkpoints(tmp_path)] == ["step=2.ckpt"]


def test_retention_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, f"step={step}.ckpt", step, keep=2)
    assert [c.global_step for c in complete_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=3.ckpt", "step=4.ckpt"]


def test_resume_modes():
    assert wants_resume("on_restart", {"TORCHELASTIC_RESTART_COUNT": "1"})
    assert not wants_resume("on_restart", {"TORCHELASTIC_RESTART_COUNT": "0"})
    assert wants_resume("on_restart", {"SLURM_RESTART_COUNT": "2"})
    assert wants_resume("auto", {}) and not wants_resume("never", {"TORCHELASTIC_RESTART_COUNT": "3"})


@pytest.mark.parametrize(("arguments", "message"), [
    ({"resume": "always"}, "resume='always'"),
    ({"keep_last_checkpoints": 0}, "keep_last_checkpoints=0"),
    ({"heartbeat_timeout": -1}, "heartbeat_timeout=-1"),
    ({"max_checkpoints_in_flight": 0}, "max_checkpoints_in_flight=0"),
])
def test_bad_options_are_refused_by_name(arguments, message):
    with pytest.raises(ValueError, match=message):
        FaultToleranceOptions(**arguments)


def _epoch_positions(replicas: int, batch: int, data: int, epoch: int, skip_samples: int = 0) -> list[list[int]]:
    """Each step's global batch (all ranks), as permutation positions, for ``replicas`` ranks."""
    per_rank = []
    for rank in range(replicas):
        sampler = DistributedSampler(list(range(data)), num_replicas=replicas, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(list(range(data)), batch_size=batch, sampler=sampler)
        resumable = make_resumable(loader)
        assert isinstance(resumable, ResumableSampler)
        if skip_samples:
            resumable.resume_at(epoch, skip_samples)
        else:
            resumable.set_epoch(epoch)
        per_rank.append([b.tolist() for b in loader])
    return [sorted(sum((r[i] for r in per_rank), [])) for i in range(len(per_rank[0]))]


@pytest.mark.parametrize("new_replicas", [4, 2])
def test_the_sampler_resumes_after_the_samples_all_ranks_consumed(new_replicas):
    full = _epoch_positions(4, 2, 32, epoch=1)  # 4 steps of 8 samples
    resumed = _epoch_positions(new_replicas, 2 * 4 // new_replicas, 32, epoch=1, skip_samples=16)
    assert resumed == full[2:]  # the same global batches after the first two steps, even with half the ranks


@pytest.mark.parametrize(("batch", "warns"), [(4, False), (2, True)])
def test_resuming_with_another_global_batch_is_reported(batch, warns, recwarn):
    # Written by 4 ranks x batch 2 (8 samples per step); resumed on 2 ranks with batch 4 (the same 8) or 2 (4).
    from picotron_lightning.fault_tolerance.runtime import CHECKPOINT_KEY, FaultToleranceRuntime

    runtime = FaultToleranceRuntime(FaultToleranceOptions())
    sampler = DistributedSampler(list(range(32)), num_replicas=2, rank=0, shuffle=False)
    runtime.process_dataloader(DataLoader(list(range(32)), batch_size=batch, sampler=sampler))
    position = {"epoch": 0, "samples_consumed": 16, "samples_per_batch": 8}
    runtime.restore_from_checkpoint({CHECKPOINT_KEY: {"data_position": position}}, rank=0)
    messages = [str(w.message) for w in recwarn if "samples per batch" in str(w.message)]
    assert (len(messages) == 1) == warns, messages
    if warns:
        assert "this run has 4 (batch_size 2 x 2 data-parallel ranks)" in messages[0]
