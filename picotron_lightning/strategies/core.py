"""What the Trainer and Fabric strategies share: arguments, layout, mesh, parallelization, norms.

Lightning has two strategy hierarchies (``lightning.pytorch`` and ``lightning.fabric``) with the
same ideas under different method names. Everything that is about *parallelism* lives here, once;
the two strategy classes only adapt it to their framework's hooks.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from picotron_lightning.parallel.data import DATA_PARALLEL_MODES, DataParallelConfig, set_gradient_sync
from picotron_lightning.parallel.grad_norm import clip_grad_norm_, global_grad_norm
from picotron_lightning.parallel.pp_schedule import PipelineOptions
from picotron_lightning.strategies.parallelize import ParallelConfig, ParallelModel, parallelize
from picotron_lightning.topology import LayoutError, ParallelLayout, SizeArg

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from picotron_lightning.parallel.pipeline import PipelineRuntime

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "16": torch.float16,
}


def _as_dtype(name: str, value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"`{name}={value!r}` is not a dtype; use one of {sorted(_DTYPES)} or a torch.dtype.")
    return _DTYPES[value]


class Picotron3DCore:
    """Parallelism shared by :class:`Picotron3DStrategy` and :class:`Picotron3DFabricStrategy`.

    Args:
        data_parallel_size: ranks that each hold a model replica (or shard of one); ``"auto"`` fills
            whatever the other sizes leave of the world size.
        tensor_parallel_size: ranks that split each layer Megatron-style (neighbouring ranks).
        pipeline_parallel_size: stages the layers are split into.
        expert_parallel_size: ranks (taken from the data-parallel ones) that split the experts of MoE layers.
        data_parallel_mode: ``"fsdp"`` (FSDP2 ``fully_shard``), ``"ddp"``, ``"hsdp"`` (replicate across
            groups of ``hsdp_shard_size`` ranks that shard), or ``"auto"``: replicate while parameters,
            gradients and optimizer state fit comfortably in one device's memory, shard otherwise.
        hsdp_shard_size: ranks that shard within one HSDP replica (default: the data-parallel ranks of a node).
        reshard_after_forward: FSDP frees gathered weights after forward (less memory, one more all-gather).
        reduce_dtype: dtype of gradient reduction (e.g. ``"fp32"`` to reduce bf16 gradients in fp32).
        param_dtype: dtype FSDP gathers parameters in for compute (``None`` keeps the stored dtype).
        process_group_backend: ``"gloo"`` or ``"nccl"``; default by device.
        timeout: timeout of every collective; a stuck rank fails the run after this long.
        activation_checkpointing: recompute each transformer block's activations in backward
            (less activation memory for about one more forward pass of compute).
        tp_plan: tensor-parallel plan, ``{"module.name.pattern": style}`` with styles ``"colwise"``,
            ``"rowwise"``, ``"embedding"``, ``"head"``, ``"norm"`` or a ``ParallelStyle``; ``*`` matches one
            name part. Default: the LightningModule's ``tensor_parallel_plan()`` hook, the Hugging Face
            model's own plan, the reference Llama's, or one detected from the blocks' data flow.
        sequence_parallel: split norms (and the residual stream) along the sequence between the tp ranks;
            ``"auto"`` turns it on for pre-norm blocks. Needs the sequence length divisible by tp.
        loss_parallel: keep the logits sharded over the vocabulary and compute ``F.cross_entropy`` on the
            shards (no gathered logits). Opt-in: the step must pass the logits straight to
            ``F.cross_entropy``/``F.nll_loss`` (see docs/tensor_parallel.md).
        pipeline_schedule: ``"1f1b"`` (default), ``"gpipe"``, ``"interleaved_1f1b"``, ``"zero_bubble"`` or
            ``"zbv"`` (see docs/pipeline_parallel.md).
        memory: :class:`~picotron_lightning.memory.MemoryOptions` (or a dict of its fields): checkpointing
            mode, garbage-collection and allocator control (see docs/memory.md).
        num_microbatches: microbatches each step's local batch is cut into under pipeline parallelism;
            ``None`` derives it from the batch (aiming at 4 x pipeline_parallel_size).
        virtual_stages: model chunks per pipeline rank (interleaved schedules; default 2 there, else 1).
        pipeline_split: ``"structural"`` (default) or ``"trace"`` (``torch.export`` split with
            ``torch.distributed.pipelining``; pipeline parallelism alone). Both keep parameter names.
    """

    def _init_core(
        self,
        data_parallel_size: SizeArg,
        tensor_parallel_size: int,
        pipeline_parallel_size: int,
        expert_parallel_size: int,
        data_parallel_mode: Literal["auto", "fsdp", "ddp", "hsdp"],
        hsdp_shard_size: SizeArg,
        reshard_after_forward: bool,
        reduce_dtype: str | torch.dtype | None,
        param_dtype: str | torch.dtype | None,
        process_group_backend: str | None,
        timeout: timedelta | None,
        *,
        tp_plan: dict[str, Any] | None = None,
        sequence_parallel: bool | Literal["auto"] = "auto",
        loss_parallel: bool = False,
        pipeline_schedule: str = "1f1b",
        num_microbatches: int | None = None,
        virtual_stages: int | None = None,
        pipeline_split: str = "structural",
        activation_checkpointing: bool = False,
        memory: Any = None,
    ) -> None:
        # Validate argument types now, at construction: the user sees the error before any launch.
        self._requested_layout = ParallelLayout(
            data_parallel_size, tensor_parallel_size, pipeline_parallel_size, expert_parallel_size
        )
        if data_parallel_mode not in DATA_PARALLEL_MODES:
            raise ValueError(
                f"`data_parallel_mode={data_parallel_mode!r}` is not supported; use one of {DATA_PARALLEL_MODES}."
            )
        if data_parallel_mode == "ddp" and pipeline_parallel_size != 1:
            # DDP's reducer expects one backward per forward; a pipeline schedule runs several
            # microbatches per step and DDP's bucket rebuild fails on them. FSDP2 handles this.
            raise ValueError(
                "data_parallel_mode='ddp' is not supported with pipeline_parallel_size > 1; use 'fsdp' or 'hsdp' "
                "('auto' picks fsdp under pipeline parallelism)."
            )
        if hsdp_shard_size != "auto" and (not isinstance(hsdp_shard_size, int) or hsdp_shard_size < 1):
            raise ValueError(f"`hsdp_shard_size` must be a positive integer or 'auto', got {hsdp_shard_size!r}.")
        self._hsdp_shard_size = hsdp_shard_size
        self._parallel_config = ParallelConfig(
            data_parallel=DataParallelConfig(
                mode=data_parallel_mode,
                reshard_after_forward=reshard_after_forward,
                param_dtype=_as_dtype("param_dtype", param_dtype),
                reduce_dtype=_as_dtype("reduce_dtype", reduce_dtype),
            )
        )
        if sequence_parallel not in (True, False, "auto"):
            raise ValueError(f"`sequence_parallel` must be True, False or 'auto', got {sequence_parallel!r}.")
        if tp_plan is not None and not isinstance(tp_plan, dict):
            raise ValueError(f"`tp_plan` must be a dict of module-name pattern -> style, got {type(tp_plan).__name__}.")
        self._parallel_config.tensor_parallel.update(
            plan=tp_plan, sequence_parallel=sequence_parallel, loss_parallel=bool(loss_parallel)
        )
        pipeline = PipelineOptions(pipeline_schedule, num_microbatches, virtual_stages, pipeline_split)  # validates
        self._parallel_config.pipeline.update(
            schedule=pipeline.schedule, num_microbatches=pipeline.num_microbatches,
            virtual_stages=pipeline.virtual_stages, split=pipeline.split,
        )
        if not isinstance(activation_checkpointing, bool):
            raise ValueError(f"`activation_checkpointing` must be True or False, got {activation_checkpointing!r}.")
        self._parallel_config.memory["activation_checkpointing"] = activation_checkpointing
        # memory: the `memory=` options (picotron_lightning.memory.MemoryOptions); validated here, at construction.
        from picotron_lightning.memory.options import MemoryOptions

        self._memory_options = MemoryOptions.from_arg(memory)
        if self._memory_options.activation_checkpointing != "none":
            if activation_checkpointing:
                raise ValueError("Pass either `activation_checkpointing=True` or `memory.activation_checkpointing`, "
                                 "not both.")
            self._parallel_config.memory.update(activation_checkpointing=self._memory_options.activation_checkpointing)
        self._parallel_config.memory["checkpoint_every"] = self._memory_options.checkpoint_every
        from picotron_lightning.memory.allocator import configure_expandable_segments

        configure_expandable_segments(self._memory_options.expandable_segments)  # before CUDA initialises
        self._gradient_sync_blocked = False
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._layout: ParallelLayout | None = None
        self._device_mesh: DeviceMesh | None = None
        self._parallel_model: ParallelModel | None = None

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
        _start_method: str
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
        # Check the sizes now, in the launching process, before any rank or process group exists.
        external = env.creates_processes_externally
        self._resolve_layout(env.world_size() if external else self.num_nodes * self.num_processes)
        if external:
            return
        if self._start_method == "spawn":
            self._launcher = self._spawn_launcher(self, start_method="spawn")
        else:
            self._launcher = self._subprocess_launcher(env, self.num_processes, self.num_nodes)

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
        env.set_world_size(self.num_nodes * self.num_processes)
        rank = self.global_rank
        rank_zero_only.rank = pl_rank_zero_only.rank = utils_rank_zero_only.rank = rank  # type: ignore[attr-defined]
        self._resolve_layout(self.world_size)
        self._check_pipeline_model(module)  # more stages than blocks fails here, not in a collective
        device = self.root_device
        self._process_group_backend = self._process_group_backend or _get_default_process_group_backend_for_device(
            device
        )
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if device.type != "cpu":
            kwargs["device_id"] = device
        _init_dist_connection(env, self._process_group_backend, **kwargs)
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
        return self._layout or self._requested_layout

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
    def _pipeline(self) -> PipelineRuntime | None:
        """This rank's pipeline stages and their schedules (None unless pipeline_parallel_size > 1)."""
        return self._parallel_model.extras.get("pipeline") if self._parallel_model else None

    @property
    def pipeline_bubble(self) -> float | None:
        """Idle fraction of this rank in the latest training step's pipeline schedule; None without pp."""
        return self._pipeline.bubble if self._pipeline is not None else None

    def _check_pipeline_model(self, module: nn.Module | None) -> None:
        """Refuse a model that cannot be split into the pipeline stages asked for; no collective involved."""
        if module is None or self.layout.pp == 1:
            return
        from picotron_lightning.parallel.pipeline import check_pipeline_model

        check_pipeline_model(module, self.layout.pp, PipelineOptions(**self._parallel_config.pipeline))

    def _resolve_layout(self, world_size: int) -> ParallelLayout:
        """Check the sizes against the world size; raises before any process group exists."""
        self._layout = self._requested_layout.resolve(world_size)
        if self._parallel_config.data_parallel.mode == "hsdp":
            self._hsdp_sizes(self._layout, local_processes=getattr(self, "num_processes", world_size))
        return self._layout

    def _hsdp_sizes(self, layout: ParallelLayout, local_processes: int) -> tuple[int, int]:
        shard = self._hsdp_shard_size
        if shard == "auto":
            shard = math.gcd(layout.dp, max(1, local_processes // (layout.tp * layout.pp)))
        if layout.dp % shard:
            raise LayoutError(
                f"hsdp_shard_size={shard} must divide data_parallel_size={layout.dp}; sizes that would work: "
                f"{[d for d in range(1, layout.dp + 1) if layout.dp % d == 0]}."
            )
        return layout.dp // shard, shard

    def _build_mesh(self, device: torch.device, local_processes: int) -> DeviceMesh:
        from torch.distributed.device_mesh import init_device_mesh

        layout = self.layout
        if self._parallel_config.data_parallel.mode != "hsdp":
            mesh = layout.build_device_mesh(device.type)
        else:
            replicate, shard = self._hsdp_sizes(layout, local_processes)
            names = ("pp", "dp_replicate", "dp_shard", "tp")
            mesh = init_device_mesh(device.type, (layout.pp, replicate, shard, layout.tp), mesh_dim_names=names)
            mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self._device_mesh = mesh
        return mesh

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
        self._adopt_precision_policy(precision, device)
        self._parallel_model = parallelize(
            module, self.device_mesh, self.layout, self._parallel_config, device, local_processes
        )
        return self._parallel_model.module

    def _adopt_precision_policy(self, precision: Any, device: torch.device) -> None:
        """Take FSDP2's param/reduce dtypes from a precision plugin that states them (AdaptivePrecision).

        The precision plugin owns dtypes; the strategy only passes them on to ``fully_shard``, so the
        two never disagree. Dtypes given to the strategy explicitly win.
        """
        policy_fn = getattr(precision, "fsdp_mixed_precision_policy", None)
        if policy_fn is None:
            return
        policy = policy_fn(device)
        if policy is None:
            return
        dp = self._parallel_config.data_parallel
        self._parallel_config.data_parallel = dataclasses.replace(
            dp,
            param_dtype=dp.param_dtype if dp.param_dtype is not None else policy.param_dtype,
            reduce_dtype=dp.reduce_dtype if dp.reduce_dtype is not None else policy.reduce_dtype,
        )

    @contextmanager
    def loss_parallel(self):  # noqa: ANN201
        """Where losses on vocabulary-sharded logits are computed (and backpropagated) with ``loss_parallel=True``.

        The Trainer strategy enters it around every step and backward itself; a Fabric script wraps its
        loss computation in it (``fabric.backward`` enters it on its own). A no-op otherwise.
        """
        tp_options = self._parallel_config.tensor_parallel
        if not (tp_options.get("loss_parallel") and self.layout.tp > 1):
            yield
            return
        from picotron_lightning.parallel.tensor import loss_parallel_context

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
        from picotron_lightning.parallel.expert import reduce_expert_gradients

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
