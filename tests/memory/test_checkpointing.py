"""Checkpointing modes change memory, never the numbers: gradients equal to no checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from picotron_lightning.memory import apply_activation_checkpointing
from picotron_lightning.memory.tracker import LiveBytes
from picotron_lightning.models import CausalLMModule


def _grads_and_saved_bytes(mode: str, every: int = 1) -> tuple[dict[str, torch.Tensor], int, int]:
    module = CausalLMModule("tiny", config={"num_layers": 4}, seed=0)
    wrapped = apply_activation_checkpointing(module, every=every, mode=mode)
    batch = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(1))
    tracker = LiveBytes()
    with tracker:
        loss = module._loss(batch)
        after_forward = tracker.current  # what the forward left alive for backward
        loss.backward()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in module.named_parameters()}
    return grads, after_forward, wrapped


@pytest.mark.parametrize(("mode", "every", "blocks"), [("selective", 1, 4), ("full", 1, 4), ("full", 2, 2)])
def test_checkpointing_keeps_gradients_and_saves_memory(mode: str, every: int, blocks: int) -> None:
    reference, ref_bytes, _ = _grads_and_saved_bytes("none")
    grads, saved_bytes, wrapped = _grads_and_saved_bytes(mode, every)
    assert wrapped == blocks
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert saved_bytes < ref_bytes


def test_selective_keeps_more_than_full() -> None:
    _, selective, _ = _grads_and_saved_bytes("selective")
    _, full, _ = _grads_and_saved_bytes("full")
    assert full < selective


def test_wrappers_are_checkpoint_wrappers() -> None:
    module = CausalLMModule("tiny", seed=0)
    apply_activation_checkpointing(module, mode="selective")
    assert sum(isinstance(m, CheckpointWrapper) for m in module.modules()) == 2
    with pytest.raises(ValueError, match="mode='half'"):
        apply_activation_checkpointing(module, mode="half")


@pytest.mark.slow
def test_pipeline_stage_with_a_single_block_is_checkpointed() -> None:
    """pp=2 on the 2-block model: each stage keeps one block, which is still checkpointed; losses as one process."""
    from picotron_lightning.testing import run_ranks
    from tests.parity import RTOL, make_data, max_relative_diff, reference_losses

    data = make_data(32)
    runs = run_ranks(_pipeline_run, 2, data, timeout=600)
    assert [r["checkpointed_blocks"] for r in runs] == [1, 1], runs
    reference = reference_losses(data, 3, 4)["losses"]
    assert max_relative_diff(runs[0]["losses"], reference) <= RTOL, (runs[0]["losses"], reference)


def _pipeline_run(rank: int, world: int, data: torch.Tensor) -> dict:
    from tests.parity import trainer_run

    return trainer_run(world, data, 4, 3, {"pipeline_parallel_size": 2, "activation_checkpointing": True})
