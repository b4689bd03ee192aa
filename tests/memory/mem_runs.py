"""Workers for the memory tests: real Trainer runs on gloo ranks that measure one step's live bytes."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

MICRO = 4  # per-rank micro-batch (samples of SEQ + 1 tokens)
CHECKPOINTING = ("none", "selective", "full")


# Models the package did not write (tests/tensor/tp_models.py): Hugging Face GPT-2 (Conv1D projections, a fused
# c_attn, an odd vocabulary of 101, a key/value cache on by default), Hugging Face Llama, and a plain GPT with its
# own naming; any other name is a preset of the package's reference Llama.
FOREIGN = ("gpt2", "gpt2_tied", "hf", "gpt")


def build_module(preset: str = "tiny") -> Any:
    if preset in FOREIGN:
        from tests.tensor.tp_models import LMModule

        return LMModule(preset)
    from tests.parity import make_module

    return make_module(preset)


def _tokens(preset: str, samples: int) -> torch.Tensor:
    from picotron_lightning.testing import token_data
    from tests.parity import SEQ, make_data
    from tests.tensor.tp_models import vocab_of

    return token_data(samples, SEQ, vocab_of(preset), 1234) if preset in FOREIGN else make_data(samples)


def sample_batch(preset: str = "tiny") -> torch.Tensor:
    return _tokens(preset, MICRO)


def _data(preset: str, world: int) -> torch.Tensor:
    """The training data of the measured runs.

    For an MoE model every rank's every batch is :func:`sample_batch`, the batch the estimate traces: the
    peak depends on how many tokens the router sends to each rank's experts, and one batch's routing is all
    an estimate can see (tiny-moe, ep=2, selective: 2.01 to 2.15 MiB per rank over four batches). The
    sampler deals sample ``i`` to rank ``i % world``, so sample ``i`` is row ``(i // world) % MICRO``.
    """
    if "moe" not in preset:
        return _tokens(preset, 64)
    return sample_batch(preset)[(torch.arange(64) // world) % MICRO]


def measured_peaks(rank: int, world: int, strategy_kwargs: dict[str, Any], preset: str = "tiny",
                   ) -> dict[str, dict[str, Any]]:
    """For each checkpointing mode: ``Trainer.fit`` for 5 steps; the live bytes of a steady step on this rank (the
    smallest peak of the third to fifth, see ``PeakProbe``; the third for an MoE model)."""
    import lightning as L

    from picotron_lightning import Picotron3DStrategy
    from picotron_lightning.testing import COLLECTIVE_TIMEOUT
    from picotron_lightning.testing_memory import PeakProbe
    from tests.parity import TokenDataset

    out = {}
    for mode in CHECKPOINTING:
        # After DDP rebuilt its buckets (step 1), as in every later step; the smallest of three steps (see
        # PeakProbe), except where MoE routing follows the weights each step updates (as the estimate does).
        probe = PeakProbe(steps=(2,) if "moe" in preset else (2, 3, 4))
        strategy = Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, memory={"activation_checkpointing": mode},
                                      **strategy_kwargs)
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world, max_steps=5, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[probe])
        loader = DataLoader(TokenDataset(_data(preset, world)), batch_size=MICRO, shuffle=False)
        trainer.fit(build_module(preset), loader)
        out[mode] = {"peak": probe.peak, "breakdown": probe.breakdown, "dp_mode": strategy.data_parallel_mode}
    return out


