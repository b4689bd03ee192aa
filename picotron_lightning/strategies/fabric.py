"""``Picotron3DFabricStrategy``: the same parallelism for Fabric scripts (``Fabric(strategy="picotron3d")``)."""

from __future__ import annotations

import atexit
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, Precision
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.fabric.strategies.parallel import ParallelStrategy
from lightning.fabric.strategies.strategy import _BackwardSyncControl
from lightning.fabric.utilities.distributed import (
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.types import ReduceOp
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from picotron_lightning.fault_tolerance.runtime import FaultToleranceRuntime
from picotron_lightning.memory.options import MemoryOptions
from picotron_lightning.options import Picotron3DOptions
from picotron_lightning.strategies.checkpoint import collect_state, load_sharded, save_sharded
from picotron_lightning.strategies.core import Picotron3DCore
from picotron_lightning.topology import SizeArg

if TYPE_CHECKING:
    from picotron_lightning.memory.policy import PolicyEstimate

LossFunction = Callable[[Any, Any], Tensor]
"""``loss_fn(model_output, target) -> loss``, as ``torch.distributed.pipelining`` schedules take it."""


def _unwrap(model: Module) -> Module:
    """The user's module inside Fabric's ``_FabricModule`` wrapper (and ``torch.compile``'s)."""
    from lightning.fabric.wrappers import _unwrap_objects

    return _unwrap_objects(model)


# Lightning 2.6 added the scheduler to `setup_module_and_optimizers` (and to its return value).
_FABRIC_PASSES_SCHEDULER = "scheduler" in inspect.signature(ParallelStrategy.setup_module_and_optimizers).parameters


class _Picotron3DBackwardSyncControl(_BackwardSyncControl):
    def __init__(self, strategy: Picotron3DFabricStrategy) -> None:
        self._strategy = strategy

    def no_backward_sync(self, module: Module, enabled: bool) -> AbstractContextManager:
        if not enabled:
            return ExitStack()
        return self._strategy._no_gradient_sync(module)


def _rebind_optimizer(optimizer: Optimizer, before: dict[int, list[str]], after: dict[str, torch.nn.Parameter],
                      *, pipeline: bool = False) -> None:
    """Point ``optimizer`` at the parameters that sharding created in place of the originals.

    ``fully_shard`` and tensor parallelism replace each ``nn.Parameter`` with a new (DTensor) one,
    so an optimizer built before ``fabric.setup`` would update tensors the model no longer uses.
    Parameters are matched by name, without the segment activation checkpointing's wrapper inserts
    (``blocks.0._checkpoint_wrapped_module.ff.up.weight`` is ``blocks.0.ff.up.weight``; matched with it,
    a checkpointed block's parameters left the optimizer and never trained, measured: 1.5e-2 from one
    process by the fourth step). Under pipeline parallelism (``pipeline``) a rank keeps only its stages'
    parameters: the others leave the optimizer, and a weight tied across the first and last stage is found
    under whichever of its names this rank still holds (the last stage's copy under the output's name).
    Without it, a parameter the model no longer has under any of its names is an error, not a silent drop.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    after = {name.replace(_CHECKPOINT_PREFIX, ""): p for name, p in after.items()}
    if optimizer.state:
        raise RuntimeError(
            "The optimizer already has state (it has stepped). Create it before training, or call "
            "`fabric.setup(model)` first and `fabric.setup_optimizers(optimizer)` on a new optimizer."
        )
    for group in optimizer.param_groups:
        params: list[torch.nn.Parameter] = []
        for p in group["params"]:
            names = before.get(id(p))
            if names is None:  # not a parameter of this model: leave it alone
                params.append(p)
                continue
            held = next((after[n] for n in names if n in after), None)
            if held is None and not pipeline:
                raise RuntimeError(f"The optimizer holds parameter {names[0]!r}, which the model no longer has after "
                                   "`fabric.setup`; build the optimizer from `model.parameters()` of this model.")
            if held is not None and all(held is not q for q in params):
                params.append(held)
        group["params"] = params


class Picotron3DFabricStrategy(Picotron3DCore, ParallelStrategy):
    """Data, tensor, pipeline and expert parallelism for Fabric; same arguments as the Trainer strategy.

    ``fabric.setup(model, optimizer)`` works as with ``ddp``: the optimizer is re-pointed at the
    sharded parameters. ``fabric.clip_gradients`` and ``fabric.no_backward_sync`` know the layout.
    """

    strategy_name = "picotron3d"

    def __init__(
        self,
        data_parallel_size: SizeArg = "auto",
        tensor_parallel_size: SizeArg = 1,
        pipeline_parallel_size: SizeArg = 1,
        expert_parallel_size: SizeArg = 1,
        *,
        data_parallel_mode: Literal["auto", "fsdp", "ddp", "hsdp"] = "auto",
        hsdp_shard_size: SizeArg = "auto",
        reshard_after_forward: bool = True,
        reduce_dtype: str | None = None,
        param_dtype: str | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        tp_plan: dict[str, Any] | None = None,
        sequence_parallel: bool | Literal["auto"] = "auto",
        loss_parallel: bool = False,
        pipeline_schedule: str = "1f1b",
        num_microbatches: int | None = None,
        virtual_stages: int | None = None,
        pipeline_split: str = "structural",
        activation_checkpointing: bool = False,
        memory: MemoryOptions | dict[str, Any] | None = None,
        memory_budget: int | float | None = None,
        compile: bool | dict[str, Any] = False,
        start_method: Literal["popen", "spawn"] = "popen",
        resume: Literal["on_restart", "auto", "never"] = "on_restart",
        async_checkpointing: bool = False,
        max_checkpoints_in_flight: int = 1,
        keep_last_checkpoints: int | None = None,
        heartbeat_timeout: float | None = 15.0,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
        )
        self._init_core(Picotron3DOptions.from_arguments(locals()))  # validated here, at construction
        self._budget_batch: Any = None  # the batch `choose_memory_policy` was given
        # Fault tolerance: complete-only (optionally asynchronous) checkpoints and heartbeats. A Fabric script
        # chooses where it resumes itself (`picotron_lightning.fault_tolerance.newest_complete_checkpoint`).
        self._fault_tolerance = FaultToleranceRuntime(self._options.fault_tolerance)
        if self._options.memory.oom_recovery:
            # The recovery redoes Lightning's training closure inside the optimizer step; a Fabric script's
            # loop is its own, so there is nothing the strategy could redo.
            raise ValueError(
                "`memory.oom_recovery=True` is not supported with Fabric: the script runs forward, backward and the "
                "optimizer step itself. Use the Trainer (`Picotron3DStrategy`), or catch torch.OutOfMemoryError "
                "in the script."
            )
        if self._options.layout.needs_plan:
            # Fabric sets up processes before the script hands over the model: nothing to plan from yet.
            raise ValueError(
                "tensor_parallel_size/expert_parallel_size='auto' is planned from the model, which Fabric receives "
                "only after launch; pass integers (`python -m picotron_lightning.plan --model ...` suggests them) "
                "or use the Trainer's Picotron3DStrategy, which plans them."
            )
        self._num_nodes = 1
        self._backward_sync_control = _Picotron3DBackwardSyncControl(self)
        self._module: Module | None = None
        self._in_pipeline_step = False

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls,
            description="picotron-lightning: data/tensor/pipeline/expert parallelism with FSDP2 and DTensor",
        )

    # ------------------------------------------------------------------ devices and launch
    # (root_device, num_processes, sampler kwargs and the launcher choice live in Picotron3DCore)
    _subprocess_launcher = _SubprocessScriptLauncher
    _spawn_launcher = _MultiProcessingLauncher

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    # ------------------------------------------------------------------ memory budget
    def choose_memory_policy(self, module: Module, batch: Any) -> PolicyEstimate | None:
        """``memory_budget`` in a Fabric script: estimate each memory policy for ``module`` (as the script builds it,
        before ``fabric.setup``) on ``batch`` (one rank's micro-batch, as the loop will feed it) and apply the
        cheapest whose per-rank peak fits the budget. Rank 0 logs the choice, its reason and the estimates.

        Call it before ``fabric.launch()``: the estimate runs on fake tensors with a fake process group of its
        own, which cannot exist beside the real one ``launch`` creates (Lightning's launcher runs the script
        again on every rank, so every rank calls it, and rank 0's choice is broadcast once the group exists).
        Returns the choice; None where it waits for ``launch``: where the fake trace cannot follow the layout
        (pipeline parallelism, MoE models), or where this process has a process group already (a later run in
        the same script), every rank chooses in ``launch`` with one real step per policy (gloo only), as a
        later ``Trainer.fit`` does.
        """
        if self._options.memory.memory_budget is None:
            raise ValueError("`choose_memory_policy` applies `memory_budget`, which this strategy was not given: "
                             "pass `memory_budget=` (bytes, or a fraction of the device) to the strategy.")
        self._budget_batch = batch
        self._apply_memory_budget(module)
        return self.memory_policy

    @override
    def _sample_batch(self) -> Any:
        return self._budget_batch

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        memory = self._options.memory
        if memory.memory_budget is not None and self.memory_policy is None and self._budget_module is None:
            raise ValueError(
                f"`memory_budget={memory.memory_budget!r}` in a Fabric script is chosen by "
                "`fabric.strategy.choose_memory_policy(model, batch)` before `fabric.launch()` (it estimates on "
                "fake tensors, before the process group exists); call it there, or pass the policy in `memory=`."
            )
        self._setup_processes(None)
        self._fault_tolerance.start()  # fault tolerance: heartbeats (stopped at interpreter exit)
        atexit.register(self._fault_tolerance.stop_at_exit)

    # ------------------------------------------------------------------ module and optimizers
    @override
    def setup_module_and_optimizers(
        self, module: Module, optimizers: list[Optimizer], scheduler: Any | None = None
    ) -> tuple[Module, list[Optimizer], Any | None]:
        before: dict[int, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            before.setdefault(id(p), []).append(name)
        wrapped = self.setup_module(module)
        after = dict(module.named_parameters(remove_duplicate=False))
        for optimizer in optimizers:
            _rebind_optimizer(optimizer, before, after, pipeline=self._pipeline is not None)
        if not _FABRIC_PASSES_SCHEDULER:
            return wrapped, optimizers  # type: ignore[return-value]  # Lightning 2.5 expects a pair
        return wrapped, optimizers, scheduler

    @override
    def setup_module(self, module: Module) -> Module:
        if not any(p.is_meta for p in module.parameters()):
            module.to(self.root_device)
        wrapped = self._parallelize(module, self.root_device, self.num_processes, self.precision)
        _materialize_distributed_module(module, self.root_device)
        offload = self._activation_offload
        if offload is not None:  # a Fabric script calls forward itself: offload what forward saves
            wrapped.register_forward_pre_hook(lambda *_: offload.__enter__())
            wrapped.register_forward_hook(lambda *_: offload.__exit__(), always_call=True)
        self._module = module
        if self._pipeline is not None:
            self._refuse_direct_calls(module)
        return wrapped

    @override
    def module_to_device(self, module: Module) -> None:
        if not any(p.is_meta for p in module.parameters()):
            module.to(self.root_device)

    @override
    def module_init_context(self, empty_init: bool | None = None) -> AbstractContextManager:
        stack = ExitStack()
        if empty_init:
            stack.enter_context(torch.device("meta"))  # materialized after sharding, in setup_module
        stack.enter_context(self.precision.module_init_context())
        return stack

    @override
    def clip_gradients_norm(
        self,
        module: Module,
        optimizer: Optimizer,
        max_norm: float | int,
        norm_type: float | int = 2.0,
        error_if_nonfinite: bool = True,
    ) -> Tensor:
        self.precision.unscale_gradients(optimizer)
        norm = self._clip_grad_norm(list(self.precision.main_params(optimizer)), float(max_norm), float(norm_type))
        if error_if_nonfinite and not torch.isfinite(norm):
            raise RuntimeError(f"The total norm of gradients is non-finite ({norm.item()}); not clipping.")
        return norm

    @override
    def backward(self, tensor: Tensor, module: Module | None, *args: Any, **kwargs: Any) -> None:
        # The loss-parallel cross-entropy has its own backward ops, registered only inside the context.
        with self._step_context():
            super().backward(tensor, module, *args, **kwargs)
        if self._module is not None:
            self._reduce_expert_gradients(self._module)  # skipped inside no_backward_sync

    # ------------------------------------------------------------------ pipeline steps (see fabric_steps.py)
    def pipeline_step(self, model: Module, inputs: tuple, target: Any, loss_fn: LossFunction,
                      training: bool = True) -> Tensor:
        """One batch through the pipeline schedule: forward, ``loss_fn`` on the last stage, and backward.

        Called by :func:`picotron_lightning.forward_backward` and :func:`picotron_lightning.evaluate` when
        ``pipeline_parallel_size > 1``. The batch (``inputs`` and ``target`` along dim 0) is cut into
        microbatches; the microbatch losses are averaged as one ``loss.backward()`` on the whole batch
        would, their gradients added to ``.grad``, and the batch's mean loss returned on every rank.
        """
        pipeline = self._pipeline
        if pipeline is None:
            raise RuntimeError("`pipeline_step` needs pipeline_parallel_size > 1 and `fabric.setup(model)` first.")
        if training:
            self._check_pipeline_precision()
        root = _unwrap(model)
        inputs = self.precision.convert_input(inputs)

        def step(microbatch: tuple[tuple, Any]) -> Tensor:
            return loss_fn(root(*microbatch[0]), microbatch[1])

        grad_mode = torch.enable_grad() if training else torch.no_grad()
        self._in_pipeline_step = True
        try:
            with grad_mode, self.precision.forward_context(), self._step_context():
                loss = pipeline.run_function(step, (inputs, target), training=training)
        finally:
            self._in_pipeline_step = False
        if training:
            self._reduce_expert_gradients(root)  # skipped inside no_backward_sync
        return loss

    def _check_pipeline_precision(self) -> None:
        engine = getattr(self.precision, "_engine", None)  # AdaptivePrecision's loss scaler lives in its engine
        scaler = getattr(self.precision, "scaler", None) or getattr(engine, "scaler", None)
        if scaler is not None and getattr(scaler, "enabled", True):
            raise ValueError(
                "fp16 loss scaling cannot scale the losses inside a pipeline schedule yet. With "
                "pipeline_parallel_size > 1 use precision='bf16-mixed' or '32-true', or AdaptivePrecision(mode='bf16')."
            )

    def _refuse_direct_calls(self, root: Module) -> None:
        """Under pp a rank holds only its stages: calling the model outside a pipeline step gets a clear error."""

        def guard(module: Module, args: Any) -> None:
            if not self._in_pipeline_step:
                raise RuntimeError(
                    f"With pipeline_parallel_size={self.layout.pp} this rank holds only its pipeline stages of "
                    f"{type(module).__name__}, so `model(x)` cannot run here. Replace `loss = loss_fn(model(x), y); "
                    "fabric.backward(loss)` by `loss = picotron_lightning.forward_backward(fabric, model, x, y, "
                    "loss_fn)` (and use `picotron_lightning.evaluate` without gradients)."
                )

        root.register_forward_pre_hook(guard)

    def _norm_module(self) -> Module:
        if self._module is None:
            raise RuntimeError("Call `fabric.setup(model)` before asking for the gradient norm.")
        return self._module

    # ------------------------------------------------------------------ collectives
    @override
    def all_reduce(
        self, tensor: Tensor, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean"
    ) -> Tensor:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        self._barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self._broadcast(obj, src)

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, Module | Optimizer | Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        if storage_options is not None or filter is not None:
            raise TypeError("picotron3d writes sharded checkpoints; `storage_options` and `filter` are not supported.")
        modules = {k: v for k, v in state.items() if isinstance(v, Module)}
        if len(modules) != 1:
            raise ValueError(f"Pass exactly one model in the state to save, got {sorted(modules) or 'none'}.")
        (model_key, module), = modules.items()
        optimizers = {k: v for k, v in state.items() if isinstance(v, Optimizer)}
        rest = {k: v for k, v in state.items() if k not in modules and k not in optimizers}
        rest["__model_key__"] = model_key
        tensors = collect_state(module, list(optimizers.values()), list(optimizers))
        save_sharded(Path(self.broadcast(str(path))), tensors, metadata=rest, writer=self._fault_tolerance.writer)

    @override
    def load_checkpoint(
        self,
        path: Any,
        state: Module | Optimizer | dict[str, Module | Optimizer | Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if isinstance(state, Module):
            state = {"model": state}
        if not isinstance(state, dict) or not any(isinstance(v, Module) for v in state.values()):
            raise ValueError("Pass the state to restore with its model, e.g. `fabric.load(path, {'model': model})`.")
        (module,) = [v for v in state.values() if isinstance(v, Module)]
        optimizers = {k: v for k, v in state.items() if isinstance(v, Optimizer)}
        metadata = load_sharded(Path(self.broadcast(str(path))), module, list(optimizers.values()),
                                optimizer_keys=list(optimizers), strict=strict)
        metadata.pop("__model_key__", None)
        for key in [k for k in state if k not in optimizers and not isinstance(state[k], Module)]:
            if key in metadata:
                state[key] = metadata.pop(key)
            elif strict:
                raise KeyError(f"'{key}' is not in the checkpoint {path}; it holds {sorted(metadata)}.")
        return metadata
