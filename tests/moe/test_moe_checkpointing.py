"""MoE blocks under activation checkpointing in a process whose grouped-matmul probe has not run yet."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from picotron_lightning.memory.checkpointing import apply_activation_checkpointing
from picotron_lightning.moe.grouped import _probe_grouped_mm
from tests.parity import make_data, make_module


def _grads_after_one_step(module: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `self.log` outside a Trainer
        loss = module.training_step(batch, 0)
    loss.backward()
    # The checkpoint wrapper adds a segment to the names; compare by the original names.
    return {name.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
            for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_first_moe_forward_inside_a_checkpointed_block(mode: str) -> None:
    """The grouped-matmul probe's first run happens inside a checkpointed block's forward.

    Its backward used to run on the caller's thread, under the checkpoint's saved-tensor hooks: it
    recomputed the enclosing block once for the probe, and under selective checkpointing the real
    backward then failed with "Trying to backward an extra time" (the estimator's first real trace of
    tiny-moe hit this; ``Trainer.fit`` only passed when an earlier run in the process had cached the probe).
    """
    batch = make_data(2)
    reference = make_module("tiny-moe")
    checkpointed = copy.deepcopy(reference)
    assert apply_activation_checkpointing(checkpointed, mode=mode) == 2
    rng_before = torch.get_rng_state()
    _probe_grouped_mm.cache_clear()  # the first MoE forward of this process, as in a fresh rank
    got = _grads_after_one_step(checkpointed, batch)
    assert torch.equal(torch.get_rng_state(), rng_before), "the probe consumed the global random state"
    want = _grads_after_one_step(reference, batch)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
