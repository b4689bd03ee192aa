"""What the Trainer and Fabric strategies share: arguments, layout, mesh, parallelization, norms.

Lightning has two strategy hierarchies (``lightning.pytorch`` and ``lightning.fabric``) with the
same ideas under different method names. Everything that is about *parallelism* lives here, once;
the two strategy classes only adapt it to their framework's hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from picotron_lightning.fault_tolerance.launcher_store import restart_scoped_store
from picotron_lightning.memory.offload import ActivationOffload
from picotron_lightning.memory.policy import PolicyEstimate
from picotron_lightning.options import Picotron3DOptions
from picotron_lightning.parallel import ParallelModel, PipelineRuntime, parallelize
from picotron_lightning.parallel.data import DataParallelOptions, set_gradient_sync
from picotron_lightning.parallel.expert import reduce_expert_gradients
from picotron_lightning.parallel.grad_norm import clip_grad_norm_, global_grad_norm
from picotron_lightning.parallel.pipeline_parallel import check_pipeline_model, check_traceable_layout
from picotron_lightning.parallel.pipeline_parallel.traced_sharding import check_traced_sharding
from picotron_lightning.parallel.tensor_parallel import loss_parallel_context
from picotron_lightning.strategies.library_warnings import show_library_warnings_once
from picotron_lightning.strategies.memory_policy import MemoryPolicyMixin
from picotron_lightning.topology import ParallelLayout

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

class Picotron3DCore(MemoryPolicyMixin):
    """Parallelism shared by :class:`Picotron3DStrategy` and :class:`Picotron3DFabricStrategy`.

    The strategies' flat keyword arguments become one :class:`~picotron_lightning.options.Picotron3DOptions`
    (validated once, at construction); each field's docstring there says what it does.
    """

    def _init_core(self, options: Picotron3DOptions) -> None:
        from picotron_lightning.memory.allocator import configure_expandable_segments

        self._options = options
        configure_expandable_segments(options.memory.expandable_segments)  # before CUDA initialises
        self._process_group_backend = options.process.process_group_backend  # resolved by device at setup
        self._gradient_sync_blocked = False
        self._layout: ParallelLayout | None = None
        self._device_mesh: DeviceMesh | None = None
        self._parallel_model: ParallelModel | None = None
        self._activation_offload: ActivationOffload | None = None
        self.memory_policy: PolicyEstimate | None = None
        """The policy ``memory_budget`` chose (with every rank's estimate), or None without a budget."""
        self.memory_policy_reason = ""
        """Why that policy: its estimated peak, its cost, and why each cheaper one did not fit."""
        self._budget_module: nn.Module | None = None  # the module the budget estimates, until the choice is made
        self._real_trace_reason = ""  # why the fake trace could not choose (then the process group's trace does)
        self._plan: Any = None  # the planner's PlanResult when sizes were "auto"

    @property
    def options(self) -> Picotron3DOptions:
        """The strategy's options, one section per concern."""
        return self._options

    @property
    def _start_method(self) -> str:
        return self._options.process.start_method

    # ------------------------------------------------------------------ devices, launch, processes
    # Provided by Lightning's ParallelStrategy (Trainer or Fabric flavour) that each strategy also derives from.
    if TYPE_CHECKING:
        parallel_devices: list[torch.device] | None
        cluster_environment: Any
        local_rank: int
        node_rank: int
        global_rank: int
        world_size: int
        num_nodes: int
        _launcher: Any
        _subprocess_launcher: Any
        _spawn_launcher: Any

    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        # Tells Lightning to insert its DistributedSampler (with the kwargs below).
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # By data-parallel rank: every tensor/pipeline rank of one replica sees the same samples.
        return self._data_parallel_coordinates()

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    def _configure_launcher(self) -> None:
        env = self.cluster_environment
        assert env is not None
        # Check the sizes now, before any rank or process group exists: in the launching process and,
        # identically, in every rank Lightning's launcher (or torchrun, srun, ...) started.
        self._resolve_layout(self._world_size_from_environment())
        if env.creates_processes_externally:
            return
        if self._start_method == "spawn":
            self._launcher = self._spawn_launcher(self, start_method="spawn")
        else:
            self._launcher = self._subprocess_launcher(env, self.num_processes, self.num_nodes)

    def _world_size_from_environment(self) -> int:
        """The world size this process belongs to, the same before launch and in every started rank.

        Lightning's strategies *assign* the world size (``num_nodes x devices``) to environments that
        take it (Lightning's own launcher; its ranks report 1 until told) and *read* it from those that
        know it (torchrun, SLURM, MPI, ...), whose ``set_world_size`` is ignored. Doing the same here,
        at the first moment the layout is checked, makes the launching process and each started rank
        resolve the same layout from what they really are.
        """
        env = self.cluster_environment
        assert env is not None
        env.set_world_size(self.num_nodes * self.num_processes)
        return env.world_size()

    def _setup_processes(self, module: nn.Module | None) -> None:
        """Ranks, layout check, process group (with the collective timeout) and mesh, in that order."""
        from lightning.fabric.utilities.distributed import (
            _get_default_process_group_backend_for_device,
            _init_dist_connection,
        )
        from lightning.fabric.utilities.rank_zero import rank_zero_only
        from lightning.fabric.utilities.seed import reset_seed
        from lightning.pytorch.utilities.rank_zero import rank_zero_only as pl_rank_zero_only
        from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

        reset_seed()
        env = self.cluster_environment
        assert env is not None
        env.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
        rank = self.global_rank
        rank_zero_only.rank = pl_rank_zero_only.rank = utils_rank_zero_only.rank = rank  # type: ignore[attr-defined]
        self._plan_auto_sizes(module, self._world_size_from_environment())
        self._resolve_layout(self._world_size_from_environment())
        show_library_warnings_once(rank)
        self._check_pipeline_model(module)  # more stages than blocks fails here, not in a collective
        self._check_compilable(module)
        self._apply_memory_budget(module)  # fake process group: before the real one exists
        device = self.root_device
        self._process_group_backend = self._process_group_backend or _get_default_process_group_backend_for_device(
            device
        )
        kwargs: dict[str, Any] = {"timeout": self._options.process.timeout}
        if device.type != "cpu":
            kwargs["device_id"] = device
        # torchrun keeps one store across restarts: a restarted group must not read the keys of the last start.
        store = restart_scoped_store(self._options.process.timeout)
        if store is not None:
            kwargs["store"] = store
        _init_dist_connection(env, self._process_group_backend, **kwargs)
        self._agree_on_memory_policy()  # every rank applies rank 0's choice
        self._build_mesh(device, self.num_processes)

    def _barrier(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    def _broadcast(self, obj: Any, src: int = 0) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    # ------------------------------------------------------------------ layout and mesh
    @property
    def layout(self) -> ParallelLayout:
        """The resolved layout (all sizes integers); the requested one before launch."""
        return self._layout or self._options.layout

    @property
    def device_mesh(self) -> DeviceMesh:
        """The ``(pp, dp, tp)`` mesh (``dp`` is a flattened ``dp_replicate x dp_shard`` under HSDP)."""
        if self._device_mesh is None:
            raise RuntimeError("The device mesh exists only after the processes have been set up.")
        return self._device_mesh

    @property
    def data_parallel_mode(self) -> str | None:
        """The mode actually applied (``"auto"`` resolved), or None before setup."""
        return self._parallel_model.data_parallel_mode if self._parallel_model else None

    @property
    def plan(self) -> Any:
        """The planner's ranked result (``PlanResult``) when sizes were ``"auto"``; None otherwise."""
        return self._plan

    @property
    def parallel_model(self) -> ParallelModel | None:
        """What parallelization produced (pipeline runtime, tensor plan, expert mesh...); None before setup."""
        return self._parallel_model

    @property
    def _pipeline(self) -> PipelineRuntime | None:
        """This rank's pipeline stages and their schedules (None unless pipeline_parallel_size > 1)."""
        return self._parallel_model.pipeline if self._parallel_model else None

    @property
    def pipeline_bubble(self) -> float | None:
        """Idle fraction of this rank in the latest training step's pipeline schedule; None without pp."""
        return self._pipeline.bubble if self._pipeline is not None else None

    def _check_pipeline_model(self, module: nn.Module | None) -> None:
        """Refuse a model that cannot be split into the pipeline stages asked for; no collective involved."""
        if module is None or self.layout.pp == 1:
            return
        check_pipeline_model(module, self.layout.pp, self._options.pipeline)
        if self._options.pipeline.split == "trace":
            check_traceable_layout(module, self.layout, self._options.tensor_parallel)
            check_traced_sharding(self.layout, self._options.data_parallel.mode, self._options.pipeline.schedule)

    def _check_compilable(self, module: nn.Module | None) -> None:
        """Refuse ``compile=`` for a model it cannot handle (MoE, no block stack); no collective involved."""
        if module is None or not self._options.compile.enabled:
            return
        from picotron_lightning.parallel.compile import check_compilable
        from picotron_lightning.parallel.expert import find_moe_layers

        traced = self.layout.pp > 1 and self._options.pipeline.split == "trace"
        check_compilable(module, self._options.compile, moe=bool(find_moe_layers(module)), traced_pipeline=traced)

    def _plan_auto_sizes(self, module: nn.Module | None, world_size: int) -> None:
        """Sizes left to ``"auto"`` (tensor, pipeline, expert): the planner chooses them from the model.

        Every rank plans the same layout (arithmetic on the model's shapes and fixed tables); the options
        are replaced by the planned ones before anything reads them.
        """
        if not self._options.layout.needs_plan:
            return
        from picotron_lightning.planner.strategy_plan import plan_strategy_options

        if module is None:
            raise ValueError("tensor/pipeline/expert_parallel_size='auto' needs the model to plan from; pass integers "
                             "(`python -m picotron_lightning.plan` suggests them).")
        self._options, self._plan = plan_strategy_options(self._options, module, world_size, self.num_processes,
                                                          self.root_device)

    def _resolve_layout(self, world_size: int) -> ParallelLayout:
        """Check the sizes against the world size; raises before any process group exists."""
        if self._options.layout.needs_plan:  # before launch: planned in each rank, from the model
            from picotron_lightning.planner.ranking import check_inputs
            from picotron_lightning.planner.search import Constraints

            layout = self._options.layout

            def fixed(value: Any) -> int | None:
                return None if value == "auto" else int(value)

            constraints = Constraints(dp=fixed(layout.data_parallel_size), tp=fixed(layout.tensor_parallel_size),
                                      pp=fixed(layout.pipeline_parallel_size), ep=fixed(layout.expert_parallel_size))
            check_inputs(world_size, max(getattr(self, "num_processes", world_size), 1), 1, constraints)
            return layout
        self._layout = self._options.layout.resolve(world_size)
        self._hsdp_shard_size(self._layout, getattr(self, "num_processes", world_size))
        return self._layout

    def _hsdp_shard_size(self, layout: ParallelLayout, local_processes: int) -> int | None:
        """Ranks per HSDP shard group (checked against the layout), or None unless data_parallel_mode='hsdp'."""
        if self._options.data_parallel.mode != "hsdp":
            return None
        return layout.hsdp_shard_size(self._options.data_parallel.hsdp_shard_size, local_processes)

    def _build_mesh(self, device: torch.device, local_processes: int) -> DeviceMesh:
        self._device_mesh = self.layout.build_device_mesh(
            device.type, hsdp_shard_size=self._hsdp_shard_size(self.layout, local_processes)
        )
        return self._device_mesh

    def _data_parallel_coordinates(self) -> dict[str, int]:
        mesh = self.device_mesh
        return {"num_replicas": mesh["dp"].size(), "rank": mesh["dp"].get_local_rank()}

    # ------------------------------------------------------------------ parallelization
    def _parallelize(
        self, module: nn.Module, device: torch.device, local_processes: int, precision: Any = None
    ) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
            raise TypeError(
                "The model already contains FSDP1 (`FullyShardedDataParallel`) wrappers; picotron3d applies "
                "data parallelism itself. Remove the wrapping from the model."
            )
        options = dataclasses.replace(self._options, data_parallel=self._data_parallel_options(precision, device))
        self._parallel_model = parallelize(module, self.device_mesh, self.layout, options, device, local_processes)
        if options.memory.activation_offload:
            self._activation_offload = ActivationOffload(device)
        return self._parallel_model.module

    def _data_parallel_options(self, precision: Any, device: torch.device) -> DataParallelOptions:
        """The data-parallel options, with FSDP2's param/reduce dtypes from a precision plugin that states them.

        The precision plugin owns dtypes (AdaptivePrecision); the strategy only passes them on to
        ``fully_shard``, so the two never disagree. Dtypes given to the strategy explicitly win.
        """
        dp = self._options.data_parallel
        policy_fn = getattr(precision, "fsdp_mixed_precision_policy", None)
        policy = policy_fn(device) if policy_fn is not None else None
        if policy is None:
            return dp
        return dataclasses.replace(
            dp,
            param_dtype=dp.param_dtype if dp.param_dtype is not None else policy.param_dtype,
            reduce_dtype=dp.reduce_dtype if dp.reduce_dtype is not None else policy.reduce_dtype,
        )

    @contextmanager
    def _step_context(self):  # noqa: ANN202
        """Every per-step context, entered around each step and its backward in one place (loss parallel, offload)."""
        offload = self._activation_offload
        with self.loss_parallel(), offload if offload is not None else contextlib.nullcontext():
            yield

    @contextmanager
    def loss_parallel(self):  # noqa: ANN201
        """Where losses on vocabulary-sharded logits are computed (and backpropagated) with ``loss_parallel=True``.

        The Trainer strategy enters it around every step and backward itself; a Fabric script wraps its
        loss computation in it (``fabric.backward`` enters it on its own). A no-op otherwise.
        """
        if not (self._options.tensor_parallel.loss_parallel and self.layout.tp > 1):
            yield
            return
        with loss_parallel_context():
            yield

    @contextmanager
    def _no_gradient_sync(self, module: nn.Module):  # noqa: ANN202
        """Accumulate gradients locally: no reduction until the context exits."""
        from torch.nn.parallel import DistributedDataParallel

        self._gradient_sync_blocked = True
        try:
            if isinstance(module, DistributedDataParallel):
                with module.no_sync():
                    yield
                return
            set_gradient_sync(module, False)
            try:
                yield
            finally:
                set_gradient_sync(module, True)
        finally:
            self._gradient_sync_blocked = False

    def _reduce_expert_gradients(self, module: nn.Module) -> None:
        """After the last backward of a step: average expert gradients over their replicas."""
        expert_mesh = self._parallel_model.expert_mesh if self._parallel_model else None
        if expert_mesh is None or self._gradient_sync_blocked:
            return
        reduce_expert_gradients(module, expert_mesh)

    def _ranks_per_stage(self) -> int:
        return self.layout.world_size // self.layout.pp

    def global_grad_norm(self, module: nn.Module | None = None, norm_type: float = 2.0) -> torch.Tensor:
        """Norm of all gradients over shards, replicas and stages; the same on every rank."""
        module = module if module is not None else self._norm_module()
        return global_grad_norm(module.parameters(), norm_type, ranks_per_stage=self._ranks_per_stage())

    def _clip_grad_norm(self, parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        return clip_grad_norm_(parameters, max_norm, norm_type, ranks_per_stage=self._ranks_per_stage())

    def _norm_module(self) -> nn.Module:  # overridden by each strategy
        raise NotImplementedError

