"""Workers for the memory-policy tests: Trainer runs on real gloo ranks, one per policy or budget."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

LAYERS = 4  # enough blocks that the policies' peaks differ: none > selective > every 2nd block > full
MICRO = 16  # per-rank micro-batch (samples of SEQ + 1 tokens)
STEPS = 4
SCRIPT_STEPS = 3  # max_steps of tests/user_path/scripts/train_budget.py, a user's script
POLICY_FIELDS = ("activation_checkpointing", "checkpoint_every", "activation_offload", "cpu_offload")


def build_module(preset: str = "tiny") -> Any:
    """The 4-layer tiny Llama; ``"tiny-moe"``: the MoE preset as it is (2 layers, 4 experts, top-2)."""
    from tests.parity import make_module

    return make_module(preset, {"num_layers": LAYERS} if preset == "tiny" else None)


def sample_batch() -> torch.Tensor:
    from tests.parity import make_data

    return make_data(MICRO)


def fit_with_memory(rank: int, world: int, memory: dict[str, Any], data_samples: int = 128,
                    layout: dict[str, Any] | None = None, preset: str = "tiny") -> dict[str, Any]:
    """``Trainer.fit`` (FSDP2 over the data-parallel ranks unless ``layout`` sets ``data_parallel_mode``;
    ``layout``'s strategy arguments) of :func:`build_module` ``(preset)`` with ``memory`` options; losses, the
    live bytes of a steady step on this rank (``PeakProbe``, the smaller of the third and fourth), and evidence
    of what the strategy applied."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    from picotron_lightning import Picotron3DStrategy
    from picotron_lightning.testing import COLLECTIVE_TIMEOUT, TokenDataset
    from picotron_lightning.testing_memory import PeakProbe
    from tests.fitting import fit_and_record
    from tests.parity import make_data

    probe = PeakProbe(steps=(2, 3))  # steady steps, after DDP rebuilt its buckets (see PeakProbe for why two)
    strategy = Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, memory=memory,
                                  **{"data_parallel_mode": "fsdp", **(layout or {})})
    module = build_module(preset)
    loader = DataLoader(TokenDataset(make_data(data_samples)), batch_size=MICRO, shuffle=False)
    fitted = fit_and_record(module, loader, callbacks=[probe], strategy=strategy, devices=world, max_steps=STEPS)
    groups = [m._get_fsdp_state()._fsdp_param_group for m in module.modules() if isinstance(m, FSDPModule)]
    offload_policies = {type(group.offload_policy).__name__ for group in groups if group is not None}
    chosen = strategy.memory_policy
    return {
        "losses": fitted.losses, "peak": probe.peak,
        "checkpointed_blocks": sum(isinstance(m, CheckpointWrapper) for m in module.modules()),
        "offloaded_activation_bytes": strategy.offloaded_activation_bytes,
        "cpu_offload": offload_policies == {CPUOffloadPolicy.__name__},
        "applied": {name: getattr(strategy.options.memory, name) for name in POLICY_FIELDS},
        "chosen": None if chosen is None else chosen.policy.name, "reason": strategy.memory_policy_reason,
        "traced_on_process_group": bool(strategy._real_trace_reason), "dp_mode": strategy.data_parallel_mode,
    }


def fit_each(rank: int, world: int, memories: list[dict[str, Any]],
             layout: dict[str, Any] | None = None, preset: str = "tiny") -> list[dict[str, Any]]:
    """:func:`fit_with_memory` for each of ``memories`` in turn, in the same ranks."""
    return [fit_with_memory(rank, world, memory, layout=layout, preset=preset) for memory in memories]


def fit_with_unreadable_data(rank: int, world: int) -> str:
    """``Trainer.fit`` with a budget and a datamodule whose training data cannot be read before Lightning's data
    hooks (even after ``setup``, as when ``prepare_data`` would download it); the error's message."""
    import lightning as L

    from picotron_lightning import Picotron3DStrategy
    from tests.fitting import quiet_trainer

    class DataNotDownloaded(L.LightningDataModule):
        def train_dataloader(self) -> Any:
            raise FileNotFoundError("corpus.bin (prepare_data downloads it)")

    trainer = quiet_trainer(strategy=Picotron3DStrategy(memory_budget=64 * 2**20), devices=world, max_steps=1)
    try:
        trainer.fit(build_module(), datamodule=DataNotDownloaded())
    except ValueError as error:
        return str(error)
    return "no error"


def fabric_launch_without_choosing(rank: int, world: int) -> str:
    """A Fabric script with ``memory_budget`` that launches without ``choose_memory_policy``: the error's message."""
    import lightning as L

    from picotron_lightning import Picotron3DFabricStrategy

    fabric = L.Fabric(accelerator="cpu", devices=world, strategy=Picotron3DFabricStrategy(memory_budget=64 * 2**20))
    try:
        fabric.launch()
    except ValueError as error:
        return str(error)
    return "no error"
