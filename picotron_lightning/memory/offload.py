"""Offload to host memory: the tensors autograd saves for backward, and FSDP2's sharded training state.

Two policies, both applied from outside the model:

* activation offload: :class:`ActivationOffload` is ``torch.autograd.graph.save_on_cpu`` that also
  counts the bytes it moves, entered around each training step (forward and loss) by the strategy;
* parameter and optimizer-state offload: FSDP2's ``CPUOffloadPolicy``, passed to every
  ``fully_shard`` call (see :func:`fsdp_offload_policy`).

On a CPU device the host *is* the device: ``save_on_cpu`` hands back the same tensors and FSDP2
keeps its shards where they were, so neither saves memory there; the numbers stay the same, which
is what the parity tests check on CPU.
"""

from __future__ import annotations

from typing import Any

import torch


class ActivationOffload(torch.autograd.graph.save_on_cpu):
    """``save_on_cpu`` (pinned host memory on CUDA) that adds up the bytes it packs into ``packed_bytes``.

    One instance lives for the whole run; ``packed_bytes`` grows by every saved tensor's size, so a
    step moves ``2 * packed`` bytes (to the host in forward, back in backward).
    """

    def __init__(self, device: torch.device) -> None:
        accelerator = device.type != "cpu"
        super().__init__(pin_memory=accelerator, device_type=device.type if accelerator else "cuda")
        self.packed_bytes = 0
        pack = self.pack_hook

        def counting_pack(tensor: torch.Tensor) -> Any:
            self.packed_bytes += tensor.numel() * tensor.element_size()
            return pack(tensor)

        self.pack_hook = counting_pack


def fsdp_offload_policy(device: torch.device) -> Any:
    """FSDP2's ``CPUOffloadPolicy``: pinned host memory on an accelerator (pinning needs one)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    return CPUOffloadPolicy(pin_memory=device.type != "cpu")
