"""Workers for the planner's budget test: run planned layouts with ``Trainer.fit`` and measure per-rank peaks."""

from __future__ import annotations

from typing import Any

SEQ = 64
LOCAL_BATCH = 8  # samples per data-parallel rank and optimizer step
LAYERS = 4


def build_module() -> Any:
    from picotron_lightning.models import CausalLMModule

    return CausalLMModule("tiny", {"num_layers": LAYERS})


def strategy_kwargs(c: Any, reshard_after_forward: bool | None) -> dict[str, Any]:
    """The strategy's arguments that run candidate ``c`` as the planner described it."""
    kwargs: dict[str, Any] = {"data_parallel_size": c.dp, "tensor_parallel_size": c.tp,
                              "pipeline_parallel_size": c.pp, "activation_checkpointing": c.checkpointing}
    if c.dp > 1:
        kwargs["data_parallel_mode"] = c.dp_mode
    if reshard_after_forward is not None:
        kwargs["reshard_after_forward"] = reshard_after_forward
    if c.pp > 1:
        kwargs.update(pipeline_schedule=c.schedule, num_microbatches=c.num_microbatches)
        if c.virtual_stages > 1:
            kwargs["virtual_stages"] = c.virtual_stages
    return kwargs


def measure_plans(rank: int, world: int, plans: list[tuple[Any, bool | None]], steps: int = 4) -> list[int]:
    """For each (candidate, reshard_after_forward): ``Trainer.fit`` for ``steps`` optimizer steps; the live
    tensor bytes (``PeakProbe``) of a steady step's last micro-batch on this rank (the smallest over the third
    step on). Without pp, M > 1 is
    Lightning's gradient accumulation over loader batches of the micro-batch size."""
    import lightning as L
    from torch.utils.data import DataLoader

    from picotron_lightning import Picotron3DStrategy
    from picotron_lightning.testing import COLLECTIVE_TIMEOUT, TokenDataset, token_data
    from picotron_lightning.testing_memory import PeakProbe

    peaks = []
    for c, reshard in plans:
        accumulate = c.num_microbatches if c.pp == 1 else 1
        loader_batch = c.micro_batch_size if c.pp == 1 else LOCAL_BATCH
        # The last micro-batch of each step from the third (see PeakProbe for why more than one).
        probe = PeakProbe(steps=[(step + 1) * accumulate - 1 for step in range(2, steps)])
        strategy = Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, **strategy_kwargs(c, reshard))
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world, max_steps=steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            accumulate_grad_batches=accumulate, callbacks=[probe])
        data = token_data(steps * LOCAL_BATCH * c.dp, seq_len=SEQ)
        trainer.fit(build_module(), DataLoader(TokenDataset(data), batch_size=loader_batch, shuffle=False))
        assert probe.peak is not None, "the probe did not see its step"
        peaks.append(probe.peak)
    return peaks
