"""The strategy's memory policy: ``memory_budget``'s choice before the process group exists, and the estimate.

A mixin of :class:`~picotron_lightning.strategies.core.Picotron3DCore`, kept apart so the core stays
about parallelism. See docs/memory.md, "Memory budget".
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from picotron_lightning.memory.policy import (
    MemoryBudgetError,
    PolicyEstimate,
    choose_policy,
    format_policy_table,
    resolve_budget,
)
from picotron_lightning.parallel.data import DataParallelOptions, resolve_mode
from picotron_lightning.topology import LayoutError

if TYPE_CHECKING:
    from picotron_lightning.memory.estimate import RankEstimate
    from picotron_lightning.memory.offload import ActivationOffload
    from picotron_lightning.options import Picotron3DOptions
    from picotron_lightning.topology import ParallelLayout


class BudgetDataError(ValueError):
    """The training batch ``memory_budget`` estimates with could not be read; no trace would help."""


class MemoryPolicyMixin:
    """``memory_budget`` and ``estimate_memory`` for a strategy that has a layout, options and a device."""

    if TYPE_CHECKING:
        _options: Picotron3DOptions
        _layout: ParallelLayout | None
        _activation_offload: ActivationOffload | None
        memory_policy: PolicyEstimate | None
        memory_policy_reason: str
        _budget_module: nn.Module | None
        _real_trace_reason: str

        @property
        def root_device(self) -> torch.device: ...

        @property
        def num_processes(self) -> int: ...

        @property
        def layout(self) -> ParallelLayout: ...

        def _data_parallel_options(self, precision: Any, device: torch.device) -> DataParallelOptions: ...

        def _hsdp_shard_size(self, layout: ParallelLayout, local_processes: int) -> int | None: ...

    @property
    def offloaded_activation_bytes(self) -> int:
        """Bytes of saved tensors activation offload has copied to the host so far (0 without it)."""
        return self._activation_offload.packed_bytes if self._activation_offload is not None else 0

    def _sample_batch(self) -> Any:
        """One training batch for the memory estimate (each strategy knows where its data comes from)."""
        raise ValueError("`memory_budget` needs a training batch to estimate with; it is supported by the Trainer "
                         "strategy (Picotron3DStrategy) only.")

    def _estimate_options(self, module: nn.Module) -> Picotron3DOptions:
        """The options the estimate traces: data-parallel mode resolved as setup will resolve it, dtypes filled in."""
        device = self.root_device
        # The precision plugin's dtypes: the Trainer's strategy holds it as `precision_plugin`, Fabric's as `precision`.
        precision = getattr(self, "precision_plugin", None) or getattr(self, "precision", None)
        dp = self._data_parallel_options(precision, device)
        mode = "none" if self.layout.dp == 1 else resolve_mode(dp.mode, module, device, self.num_processes,
                                                              tensor_parallel=self.layout.tp > 1)
        # HSDP's shard groups as the strategy will build them: "auto" means one node's ranks, which the trace,
        # all of whose ranks are in one process, cannot tell from its own world size.
        shard = self._hsdp_shard_size(self.layout, self.num_processes) if mode == "hsdp" else None
        return dataclasses.replace(self._options, data_parallel=dataclasses.replace(
            dp, mode=mode if mode != "none" else dp.mode, hsdp_shard_size=shard or dp.hsdp_shard_size))

    def estimate_memory(self, model: nn.Module, batch: Any, **kwargs: Any) -> list[RankEstimate]:
        """Per-rank peak memory of one training step of ``model`` on ``batch`` (one rank's micro-batch) in this
        strategy's layout and memory policy, before launch. ``kwargs`` go to
        :func:`picotron_lightning.memory.estimate.estimate_memory` (``ranks``, ``allow_real_trace``...)."""
        from picotron_lightning.memory.estimate import estimate_memory  # not at import: `python -m ...estimate`
        if self._layout is None:
            raise RuntimeError("The layout is resolved when the strategy joins a Trainer (or Fabric): create "
                               "`Trainer(strategy=strategy, devices=...)` first, then call `estimate_memory`.")
        return estimate_memory(functools.partial(_copy_module, model), batch, self.layout,
                               options=self._estimate_options(model), memory=self._options.memory, **kwargs)

    def _apply_memory_budget(self, module: nn.Module | None) -> None:
        """With ``memory_budget``: estimate the policies in turn, apply the first that fits, log why (rank 0).

        Before the process group exists, on fake tensors. Where fake tensors cannot follow the layout
        (tensor and pipeline parallelism, MoE routing), or a process group exists already (a later fit in
        the same script), the choice waits for the process group and :meth:`_agree_on_memory_policy` makes
        it with one real step per policy on that group.
        """
        memory = self._options.memory
        if memory.memory_budget is None or self.memory_policy is not None or module is None:
            return  # no budget, chosen already, or a Fabric script's (`choose_memory_policy`)
        self._budget_module = module
        if dist.is_initialized():
            # A later fit in the same script: the fake trace needs a process group of its own, which cannot exist
            # beside this one; every rank is in the same case, and chooses with one real step on this group.
            self._real_trace_reason = "this process already has a process group (an earlier fit)"
            return
        try:
            self._choose_memory_policy(module, in_process_group=False)
        except (MemoryBudgetError, LayoutError, BudgetDataError):
            raise  # no trace would help
        except Exception as error:  # noqa: BLE001 - the real trace on the process group decides instead
            self._real_trace_reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"

    def _choose_memory_policy(self, module: nn.Module, *, in_process_group: bool) -> None:
        from lightning.fabric.utilities.rank_zero import rank_zero_info

        from picotron_lightning.memory.estimate import estimate_policies

        memory = self._options.memory
        assert memory.memory_budget is not None
        device = self.root_device
        total = memory.device_memory
        if total is None and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
        budget = resolve_budget(memory.memory_budget, device.type, total)
        results = estimate_policies(functools.partial(_copy_module, module), self._sample_batch(), self.layout,
                                    options=self._estimate_options(module), device_type=device.type,
                                    estimate_skipped=False, stop_at_budget=budget, in_process_group=in_process_group)
        chosen, reason = choose_policy(results, budget)  # the same estimates on every rank: the same choice
        self.memory_policy, self.memory_policy_reason = chosen, reason
        self._options = dataclasses.replace(self._options, memory=chosen.policy.applied_to(memory))
        trace = "a real step on the process group" if in_process_group else "fake tensors"
        rank_zero_info(f"picotron3d: {reason} (estimated with {trace})\n{format_policy_table(results, budget)}")

    def _choose_with_real_trace(self) -> None:
        """Every rank traces one real step per policy on the process group; all of them see every rank's peaks."""
        module = self._budget_module
        assert module is not None
        if dist.get_backend() != "gloo":
            raise RuntimeError(
                f"`memory_budget` could not estimate {self.layout.describe()} on fake tensors "
                f"({self._real_trace_reason}), and its real trace runs CPU tensors over a gloo process group, not "
                f"{dist.get_backend()!r}. Choose the policy yourself (`memory=`); "
                "`strategy.estimate_memory(model, batch, allow_real_trace=True)` shows each one's peak."
            )
        try:
            self._choose_memory_policy(module, in_process_group=True)
        except (MemoryBudgetError, BudgetDataError):
            raise
        except Exception as error:
            raise RuntimeError(
                f"`memory_budget` could not estimate {self.layout.describe()} on fake tensors "
                f"({self._real_trace_reason}) nor with a real step on the process group ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); choose the policy yourself: "
                "`strategy.estimate_memory(model, batch, allow_real_trace=True)` shows each one's peak."
            ) from error

    def _agree_on_memory_policy(self) -> None:
        """Apply rank 0's choice on every rank (one object broadcast, right after the process group exists).

        Each rank estimated on its own. The estimates agree today, but nothing forces them to (an
        environment difference, a data-dependent trace): a budget close to a policy's estimate could then
        split the ranks between two policies, whose collectives would not match. Where the fake trace could
        not follow the layout, the choice is made here first, on the process group (every rank alike: whether
        the fake trace failed depends on the layout and model only).
        """
        if self.memory_policy is None and self._real_trace_reason:
            self._choose_with_real_trace()
        if self.memory_policy is None:
            return
        self._budget_module = None
        box = [(self.memory_policy, self.memory_policy_reason)]
        dist.broadcast_object_list(box, src=0)
        chosen, reason = box[0]
        if chosen.policy != self.memory_policy.policy:
            self._options = dataclasses.replace(self._options, memory=chosen.policy.applied_to(self._options.memory))
        self.memory_policy, self.memory_policy_reason = chosen, reason


def _copy_module(template: nn.Module) -> nn.Module:
    """A copy of ``template`` for the estimate: under the trace's fake-tensor mode its tensors are fake (no memory)."""
    return copy.deepcopy(template)
