"""Pretrain the reference Llama on the built-in corpus with LightningCLI.

    python examples/pretrain.py fit --config examples/configs/pretrain_3d.yaml
    python examples/pretrain.py fit --trainer.strategy picotron3d --trainer.devices 2 --trainer.max_steps 20
    python examples/pretrain.py fit --trainer.strategy picotron_lightning.Picotron3DStrategy \\
        --trainer.strategy.tensor_parallel_size 2 --trainer.devices 4

The module and data module are ordinary Lightning code; the only picotron-specific line is the
import, which registers the strategy name "picotron3d".
"""

import os

import torch
from lightning.pytorch.cli import LightningCLI

import picotron_lightning  # noqa: F401 - registers strategy="picotron3d"
from picotron_lightning.data import StdlibDataModule
from picotron_lightning.models import CausalLMModule


def main() -> None:
    # Many CPU ranks on few cores: one thread each avoids oversubscription.
    if os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(1)
    cli = LightningCLI(CausalLMModule, StdlibDataModule, save_config_kwargs={"overwrite": True})
    trainer, logger = cli.trainer, cli.trainer.logger
    # The logger's own log_dir: Trainer.log_dir is a collective, and the other ranks have finished.
    if trainer.is_global_zero and logger is not None and logger.log_dir is not None:
        print(f"TensorBoard logs are in {logger.log_dir}; open them with: tensorboard --logdir {logger.save_dir}")


if __name__ == "__main__":
    main()
