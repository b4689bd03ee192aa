"""Workers for the micro-batch finder test: a module whose DataLoader reads ``self.batch_size``."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from picotron_lightning.models import CausalLMModule


class SizedModule(CausalLMModule):
    """The reference module with a ``batch_size`` its ``train_dataloader`` reads (what the finder sets)."""

    def __init__(self, batch_size: int = 2) -> None:
        super().__init__(preset="tiny", seed=0)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        from picotron_lightning.testing import TokenDataset
        from tests.parity import make_data

        return DataLoader(TokenDataset(make_data(512)), batch_size=self.batch_size)


def build_sized() -> SizedModule:
    return SizedModule()


def finder_fit(rank: int, world: int, budget: int, strategy_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fit 2 steps with the finder; the chosen size, what it measured, and a real step's live bytes at that size."""
    from picotron_lightning import Picotron3DStrategy
    from picotron_lightning.memory.finder import MicroBatchFinder
    from picotron_lightning.testing import COLLECTIVE_TIMEOUT
    from picotron_lightning.testing_memory import PeakProbe
    from tests.fitting import quiet_trainer

    finder = MicroBatchFinder(build_sized, budget=budget)
    probe = PeakProbe(steps=(1, 2))
    trainer = quiet_trainer(strategy=Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, **strategy_kwargs),
                            devices=world, max_steps=3, callbacks=[finder, probe])
    module = SizedModule()
    trainer.fit(module)
    return {"size": finder.micro_batch_size, "estimated": finder.estimated, "measured": finder.measured,
            "module_batch_size": module.batch_size, "probe_peak": probe.peak,
            "loader_batch": trainer.train_dataloader.batch_size}
