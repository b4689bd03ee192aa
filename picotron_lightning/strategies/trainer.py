"""``Picotron3DStrategy``: the Trainer strategy, registered as ``strategy="picotron3d"``."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from picotron_lightning.fault_tolerance.runtime import FaultToleranceRuntime
from picotron_lightning.memory.options import MemoryOptions
from picotron_lightning.options import Picotron3DOptions
from picotron_lightning.strategies.checkpoint import (
    _optimizer_state,
    load_sharded,
    optimizer_list,
    remove_checkpoint,
    save_sharded,
)
from picotron_lightning.strategies.core import Picotron3DCore
from picotron_lightning.strategies.memory_policy import BudgetDataError
from picotron_lightning.strategies.oom_step import OOMRecoveryStep
from picotron_lightning.topology import SizeArg


class _SpawnLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher; the weights it hands back to the main process are whole tensors.

    After ``fit``, rank 0 sends the model's ``state_dict`` to the launching process. Sharded
    (DTensor) entries cannot be rebuilt there, so every rank first joins in gathering full tensors.
    """

    def _collect_rank_zero_results(self, trainer: pl.Trainer, results: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        module = trainer.lightning_module
        if cast(Picotron3DCore, self._strategy).layout.pp > 1:
            rank_zero_warn("With pipeline_parallel_size > 1 the launching process receives only the first stage's "
                           "weights after `fit`; use the checkpoint to get the whole model.")
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        module.state_dict = lambda *args, **kwargs: full  # type: ignore[method-assign,assignment]  # read once by the base
        try:
            output = super()._collect_rank_zero_results(trainer, results)
        finally:
            del module.state_dict
        torch.distributed.barrier()  # every rank is past its last collective
        torch.distributed.destroy_process_group()
        return output

    def _wrapping_function(self, process_idx: int, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(process_idx, *args, **kwargs)
        # The results are in the launching process already (the return queue writes synchronously).
        # Skip interpreter teardown: destroying the meshes' gloo groups there can abort a rank
        # ("terminate called without an active exception") after a run that succeeded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class Picotron3DStrategy(Picotron3DCore, ParallelStrategy):
    """Data, tensor, pipeline and expert parallelism for an unchanged LightningModule.

    ``Trainer(strategy="picotron3d", devices=8)`` uses the defaults; pass an instance to choose
    sizes. The model is parallelized in ``setup`` (no ``configure_model`` needed; if the module
    defines one, the Trainer runs it first). See :class:`~picotron_lightning.strategies.core.Picotron3DCore`
    for the parallelism arguments.

    Args:
        start_method: ``"popen"`` re-runs the script for each rank (as Lightning's ``ddp``);
            ``"spawn"`` starts ranks with ``torch.multiprocessing`` (for notebooks and tests).
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
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._init_core(Picotron3DOptions.from_arguments(locals()))  # validated here, at construction
        self.num_nodes = 1
        self._fault_tolerance = FaultToleranceRuntime(self._options.fault_tolerance)  # fault tolerance

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="picotron-lightning: data/tensor/pipeline/expert parallelism with FSDP2 and DTensor",
        )

    # ------------------------------------------------------------------ devices and launch
    # (root_device, num_processes, sampler kwargs and the launcher choice live in Picotron3DCore)
    _subprocess_launcher = _SubprocessScriptLauncher
    _spawn_launcher = _SpawnLauncher

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._setup_processes(self.lightning_module)
        self._fault_tolerance.start()  # fault tolerance: heartbeats, once the process group exists
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self.device_mesh  # `pl_module.device_mesh`, as Lightning does
        # Garbage collection at the same steps on every rank, allocator fragmentation: a callback observes steps.
        from picotron_lightning.memory.callback import install_memory_callback

        install_memory_callback(self.lightning_module.trainer, self._options.memory)

    # ------------------------------------------------------------------ model setup
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.precision_plugin.convert_module(self.model)
        if not any(p.is_meta for p in module.parameters()):
            module.to(self.root_device)
        self.model = self._parallelize(module, self.root_device, self.num_processes, self.precision_plugin)
        assert self.lightning_module is not None
        _materialize_distributed_module(self.lightning_module, self.root_device)
        if trainer.accumulate_grad_batches > 1:
            from picotron_lightning.parallel.expert import set_aux_loss_scale

            # Lightning divides the loss by the accumulation factor; the injected MoE auxiliary
            # gradients must be scaled the same way.
            set_aux_loss_scale(self.lightning_module, 1.0 / trainer.accumulate_grad_batches)
        self._install_gradient_clipping()
        self.barrier("picotron3d.setup")
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING and not self._options.memory.cpu_offload:
            # (FSDP2's CPU offload keeps the optimizer state on the host, where the optimizer steps.)
            _optimizers_to_device(self.optimizers, self.root_device)
        self._oom: OOMRecoveryStep | None = None
        if trainer.state.fn == TrainerFn.FITTING and self._options.memory.oom_recovery:
            self._oom = OOMRecoveryStep(self, trainer, self._options.memory)
        self._fault_tolerance.resume(trainer, self)  # fault tolerance: the newest complete checkpoint, if asked

    @override
    def process_dataloader(self, dataloader: object) -> object:
        # Fault tolerance: the training sampler's position inside the epoch is saved and resumed.
        assert self.lightning_module is not None
        if self.lightning_module.trainer.training:
            return self._fault_tolerance.process_dataloader(dataloader)
        return dataloader

    def _sample_batch(self) -> Any:
        """The first batch of the training data, for ``memory_budget``'s estimate (only its shape matters).

        Read from a fresh iterator of the loader given to ``fit`` (or ``train_dataloader()``), before
        Lightning puts its sampler in; the per-rank batch size is the same.
        """
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        if source is None or not source.is_defined():
            raise ValueError("`memory_budget` estimates with one training batch, but `trainer.fit` got no training "
                             "data; pass a dataloader (or a datamodule) to `fit`.")
        datamodule = getattr(trainer, "datamodule", None)
        try:
            return next(iter(source.dataloader()))
        except Exception as error:
            if datamodule is None:
                raise _data_not_ready(error, "its `train_dataloader()`") from error
            first_error = error
        # The choice is made before Lightning's data hooks run (it needs a process without a process group), and
        # a datamodule commonly builds its datasets in `setup`: run it for "fit" first (Lightning runs it again
        # later, as it does between fit and validate). `prepare_data` is not run here: on every rank at once,
        # without a barrier, a download would race.
        datamodule.setup("fit")
        try:
            return next(iter(source.dataloader()))
        except Exception as error:
            raise _data_not_ready(error, "the datamodule's `train_dataloader()`, even after `setup('fit')`,") \
                from first_error

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def _install_gradient_clipping(self) -> None:
        """Route the Trainer's norm clipping through the layout-aware global norm.

        Lightning clips in the precision plugin with ``torch.nn.utils.clip_grad_norm_``, which
        sees only this rank's shards. The strategy knows the layout, so it supplies the norm.
        """
        precision = self.precision_plugin

        def clip_grad_by_norm(optimizer: Optimizer, clip_val: int | float) -> None:
            self._clip_grad_norm(list(precision.main_params(optimizer)), float(clip_val))

        precision.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]

    def _norm_module(self) -> torch.nn.Module:
        assert self.lightning_module is not None
        return self.lightning_module

    # ------------------------------------------------------------------ steps
    def _redirect(self, method: str, *args: Any, **kwargs: Any) -> Any:
        # Always enter through the root module's __call__, so FSDP's root hooks run every step,
        # even when the root is the LightningModule itself.
        assert self.model is not None and self.lightning_module is not None
        with self._step_context():  # loss parallel (when on), and any other per-step context
            if self._pipeline is not None:  # pp > 1: the stages run under a pipeline schedule instead
                return self._pipeline.run_step(self.lightning_module, method, args, kwargs)
            return self._forward_redirection(self.model, self.lightning_module, method, *args, **kwargs)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        if self._pipeline is not None:
            # The pipeline schedule already ran every microbatch's backward; only Lightning's hooks remain.
            assert self.lightning_module is not None
            self.pre_backward(closure_loss)
            closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
            recovery = self.oom_recovery  # (a piece of an OOM-split step weights its gradients by its samples)
            self._pipeline.finish_backward(recovery.loss_weight if recovery is not None else None)
            closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
            self.post_backward(closure_loss)
            return closure_loss
        # The loss-parallel cross-entropy has its own backward ops, registered only inside the context.
        with self._step_context():
            recovery = self.oom_recovery
            weight = recovery.loss_weight if recovery is not None else None
            if weight is None:
                return super().backward(closure_loss, optimizer, *args, **kwargs)
            return self._weighted_backward(closure_loss, weight, optimizer, *args, **kwargs)

    def _weighted_backward(self, closure_loss: Tensor, weight: float, optimizer: Optimizer | None, *args: Any,
                           **kwargs: Any) -> Tensor:
        """Lightning's backward for one micro-batch of an OOM-split step: hooks see the micro-batch's own loss,
        the gradient is weighted by its share of the samples (so the pieces add up to the whole batch's)."""
        assert self.lightning_module is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self.precision_plugin.backward(closure_loss * weight, self.lightning_module, optimizer, *args, **kwargs)
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    @property
    def oom_recovery(self) -> OOMRecoveryStep | None:
        """The OOM recovery of this fit (``memory.oom_recovery=True``): its split, retries and their history."""
        return getattr(self, "_oom", None)

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        batch = super().batch_to_device(batch, device, dataloader_idx)
        if self.oom_recovery is not None:
            self.oom_recovery.batch = batch  # the global batch a recovered step splits
        return batch

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.oom_recovery is not None and self.oom_recovery.micro_batch is not None:
            args = (self.oom_recovery.micro_batch, *args[1:])  # one piece of an OOM-split step
        with self.precision_plugin.train_step_context():
            return self._redirect("training_step", *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self._redirect("validation_step", *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self._redirect("test_step", *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._redirect("predict_step", *args, **kwargs)

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        assert self.lightning_module is not None
        if self.oom_recovery is None:  # (OOM recovery reduces them at its agreement point, outside the attempt)
            self._reduce_expert_gradients(self.lightning_module)

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Skip gradient reduction on non-final accumulation steps (FSDP2 and DDP alike).

        Under ``memory.oom_recovery`` the recovery reduces the gradients itself (DDP's and the pipeline's after
        the optimizer step's last batch, FSDP2's in each batch's backward); it is told that the batch continues
        the step.
        """
        assert self.model is not None
        if self.oom_recovery is not None:
            with self.oom_recovery.continuing_step():
                yield
            return
        with self._no_gradient_sync(self.model):
            yield

    # ------------------------------------------------------------------ collectives
    @override
    def barrier(self, name: str | None = None) -> None:
        self._barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self._broadcast(obj, src)

    @override
    def reduce(
        self, tensor: Tensor | Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean"
    ) -> Tensor | Any:
        # Over the world: tensor-parallel ranks hold equal copies, so the mean is the data-parallel mean.
        if isinstance(tensor, Tensor):
            if self.oom_recovery is not None and self.oom_recovery.defer(tensor, group, reduce_op):
                return tensor  # inside an OOM-recoverable attempt: reduced in place at the agreement point
            return self._reduce_now(tensor, group, reduce_op)
        return tensor

    def _reduce_now(self, tensor: Tensor, group: Any | None, reduce_op: ReduceOp | str | None) -> Tensor:
        return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        assert self.lightning_module is not None
        return get_model_state_dict(self.lightning_module)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        assert self.lightning_module is not None
        # The checkpoint module's format (flattened per parameter name, so every pipeline stage keeps its own).
        return _optimizer_state(self.lightning_module, optimizer_list([optimizer])[0])

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # done in load_checkpoint, shard by shard

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # done in load_checkpoint, shard by shard

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("picotron3d writes sharded checkpoints itself; `storage_options` is not supported.")
        path = Path(self.broadcast(str(filepath)))
        state = {"model": checkpoint.pop("state_dict")}
        for i, optim_state in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{i}"] = optim_state
        assert self.lightning_module is not None
        self._fault_tolerance.add_to_checkpoint(checkpoint, self.lightning_module.trainer)  # RNG, data position
        save_sharded(path, state, metadata=checkpoint, writer=self._fault_tolerance.writer)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        assert self.lightning_module is not None
        self._fault_tolerance.writer.wait()  # an asynchronous save of this run may still be writing
        checkpoint = load_sharded(
            path, self.lightning_module, optimizer_list(self.optimizers), strict=self.lightning_module.strict_loading
        )
        self._fault_tolerance.restore_from_checkpoint(checkpoint, self.global_rank)  # RNG, data position
        return checkpoint

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        remove_checkpoint(filepath)

    @override
    def teardown(self) -> None:
        # Fault tolerance: finish asynchronous saves and stop heartbeats (after a failure, silently: the others
        # then report this rank within the heartbeat timeout instead of waiting for the collective timeout).
        trainer = getattr(self.lightning_module, "_trainer", None)
        interrupted = trainer is not None and trainer.state.status == TrainerStatus.INTERRUPTED
        self._fault_tolerance.stop(succeeded=not interrupted)
        if self.oom_recovery is not None:
            self.oom_recovery.uninstall()  # the loop's closure factory, as Lightning made it
        try:
            super().teardown()
        except RuntimeError as error:
            if not interrupted:
                raise
            # After a failure mid-step the failure's traceback still holds the step's autograd graph, which
            # references the (DTensor) parameters, so moving the module to the CPU cannot swap them. Raising
            # here would replace the failure the user needs to see; Lightning raises that one after teardown.
            warnings.warn(f"teardown after the failure could not move the model to the CPU ({error})", stacklevel=1)


def _data_not_ready(error: Exception, what: str) -> BudgetDataError:
    """The error for training data ``memory_budget`` could not read before Lightning's data hooks ran."""
    return BudgetDataError(
        f"`memory_budget` reads one training batch before the process group exists, so before Lightning runs the "
        f"data hooks (`prepare_data`, `setup`); {what} failed then: {type(error).__name__}: {error}. Make the "
        "training data readable at that point (data that `prepare_data` downloads must already exist), or choose "
        "the policy yourself with `memory=` (`python -m picotron_lightning.memory.estimate --policies` compares them)."
    )
