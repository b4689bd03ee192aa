"""Expert parallelism: spread each MoE layer's experts over the ``ep`` ranks of a data-parallel group.

Layout (see ``topology.py``): the ``dp`` ranks of one ``(pp, tp)`` coordinate form ``dp / ep``
replicas of ``ep`` consecutive ranks. Inside a replica, rank ``i`` of the ``ep`` group keeps
experts ``[i E/ep, (i+1) E/ep)`` and tokens travel to them by all-to-all. Routers, shared experts
and everything else stay dense (replicated over ``dp``).

Contract with the strategy (``parallel/parallelize.py``), in this order:

1. ``validate_expert_parallel(model, ep)`` before building any process group: refuses an ``ep``
   that does not divide some layer's expert count, naming the layer and the sizes that work.
2. ``convert_moe_layers(model, expert_mesh, layout)`` after tensor parallelism, before
   memory policies and data parallelism. Call it whenever the model has MoE layers, even with
   ``ep == 1``: it also wires the data-parallel groups over which routing statistics (auxiliary
   loss fractions, bias-balancing counts, logged metrics) are all-reduced. Parameters keep their
   identity (only ``.data`` is sliced), so an optimizer built before or after stays valid.
3. Data parallelism must leave ``expert_parameters(model)`` out (FSDP2:
   ``fully_shard(..., ignored_params=set(expert_parameters(model)))``; DDP:
   ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model,
   expert_parameter_names(model))``). With ``ep == 1`` the list is empty: experts are ordinary
   dense parameters.
4. After the last backward of a step, before clipping and ``optimizer.step()``:
   ``reduce_expert_gradients(model, expert_mesh)`` averages expert gradients over
   ``ep_replicate``. It is a no-op when ``dp == ep``.

Gradient scale. One process on the global batch of ``dp`` equal shards has, for every weight,
``grad = (1/dp) * sum_r d(loss_r)``. Dense weights get that from data-parallel averaging. An
expert on one rank already receives the tokens (hence the summed gradient) of its ``ep`` group;
a hook installed here divides its gradient by ``ep`` as it is produced, and averaging over the
``dp/ep`` replicas supplies the rest: ``(1/ep) * (1/(dp/ep)) = 1/dp``.

Expert parameters also carry ``_picotron_distinct_pieces = ep`` so
:func:`~picotron_lightning.parallel.grad_norm.global_grad_norm` counts each expert once.

Hugging Face blocks (transformers >= 5: ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``,
and any block shaped like them) are found by structure: a router child holding an
``(E, hidden)`` weight and an experts child whose parameters are ``(E, ...)`` stacks, called as
``experts(hidden_states, top_k_index, top_k_weights)``. The experts child is replaced by
:class:`ExpertParallelExperts`; the model's own routing code runs unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from picotron_lightning.moe.communication import ExpertCommunication
from picotron_lightning.moe.grouped import grouped_matmul
from picotron_lightning.moe.layer import MoELayer, sort_by_expert
from picotron_lightning.parallel.collectives import mean_all_reduce_
from picotron_lightning.parallel.grad_norm import DISTINCT_PIECES_ATTR
from picotron_lightning.topology import LayoutError, ParallelLayout

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "ExpertParallelExperts",
    "convert_moe_layers",
    "expert_parameter_names",
    "expert_parameters",
    "find_moe_layers",
    "is_expert_parameter",
    "reduce_expert_gradients",
    "set_aux_loss_scale",
    "validate_expert_parallel",
]

EXPERT_PARAM_ATTR = "_picotron_expert_parallel"


# ---------------------------------------------------------------------------- discovery
def _router_experts(module: nn.Module) -> tuple[int, int] | None:
    """``(num_experts, hidden)`` if ``module`` is an HF-style router: one ``(E, hidden)`` weight."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Embedding):
        return None
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 2 and len(list(module.parameters())) <= 2:
        return weight.shape[0], weight.shape[1]
    return None


def _stacked_experts(module: nn.Module) -> int | None:
    """The leading dimension shared by all of ``module``'s own parameters, if they are expert stacks.

    Expert stacks are matrices stacked along dim 0: at least one 3-D parameter, none below 2-D
    (biases are ``(E, out)``), and no child holding parameters of its own.
    """
    params = list(module.parameters(recurse=False))
    if not params or any(list(c.parameters()) for c in module.children()):
        return None
    if not any(p.dim() == 3 for p in params) or not all(p.dim() >= 2 for p in params):
        return None
    leading = {p.shape[0] for p in params}
    return leading.pop() if len(leading) == 1 else None


def _expert_list(module: nn.Module) -> int | None:
    """Length of a ``ModuleList`` of identical small MLPs (old-style HF experts), else None."""
    if not isinstance(module, nn.ModuleList) or len(module) < 2:
        return None
    kinds = {type(m) for m in module}
    if len(kinds) != 1:
        return None
    first = module[0]
    linears = [m for m in first.modules() if isinstance(m, nn.Linear)]
    others = [m for m in first.modules()
              if m is not first and not isinstance(m, nn.Linear) and list(m.parameters())]
    return len(module) if 2 <= len(linears) <= 3 and not others else None


def _hf_moe_parts(block: nn.Module) -> tuple[str, str, int, int] | None:
    """``(router name, experts name, E, hidden)`` when ``block`` looks like an HF sparse MoE block."""
    routers, experts = {}, {}
    for name, child in block.named_children():
        if isinstance(child, (MoELayer, ExpertParallelExperts)):
            return None
        r = _router_experts(child)
        if r is not None:
            routers[name] = r
        e = _stacked_experts(child)
        if e is not None:
            experts[name] = e
        elif _expert_list(child) is not None:
            experts[name] = -len(cast(nn.ModuleList, child))  # old-style list of expert modules
    for ename, count in experts.items():
        for rname, (num, hidden) in routers.items():
            if rname != ename and abs(count) == num and num > 1:
                return rname, ename, count, hidden
    return None


def find_moe_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every MoE layer inside ``module``: package ``MoELayer``s and HF-style sparse MoE blocks."""
    found = []
    for name, m in module.named_modules():
        if isinstance(m, MoELayer) or _hf_moe_parts(m) is not None:
            found.append((name, m))
    return found


def _num_experts(layer: nn.Module) -> int:
    if isinstance(layer, MoELayer):
        return layer.num_experts
    parts = _hf_moe_parts(layer)
    assert parts is not None
    return abs(parts[2])


def validate_expert_parallel(module: nn.Module, expert_parallel_size: int) -> None:
    """Raise :class:`LayoutError` if ``expert_parallel_size`` cannot split every MoE layer's experts.

    Pure inspection, no collectives: call it before any process group exists.
    """
    ep = expert_parallel_size
    layers = find_moe_layers(module)
    if ep > 1 and not layers:
        raise LayoutError(
            f"expert_parallel_size={ep} but the model has no MoE layer (neither"
            " picotron_lightning.moe.MoELayer nor a block with a router and stacked experts);"
            " use expert_parallel_size=1.")
    for name, layer in layers:
        experts = _num_experts(layer)
        if experts % ep:
            working = [d for d in range(1, experts + 1) if experts % d == 0]
            raise LayoutError(
                f"expert_parallel_size={ep} does not divide num_experts={experts} of MoE layer '{name}'."
                f" Sizes that would work: expert_parallel_size in {working} (and dividing"
                " data_parallel_size).")


# ---------------------------------------------------------------------------- conversion
def _mark_expert_param(param: nn.Parameter, ep: int) -> None:
    if getattr(param, EXPERT_PARAM_ATTR, False):
        return
    setattr(param, EXPERT_PARAM_ATTR, True)
    setattr(param, DISTINCT_PIECES_ATTR, ep)
    # The local expert saw the tokens of all ep ranks, i.e. the sum of ep replicas' gradients;
    # dividing here makes it the data-parallel average (see module docstring).
    param.register_hook(lambda grad: grad / ep)


def _slice_experts(module: nn.Module, start: int, stop: int, ep: int) -> None:
    with torch.no_grad():
        for param in module.parameters(recurse=False):
            # .data keeps the Parameter object: optimizers and hooks holding it stay valid.
            param.data = param.data[start:stop].clone()
            _mark_expert_param(param, ep)


def _convert_moe_layer(layer: MoELayer, ep_group: dist.ProcessGroup, ep: int) -> None:
    if layer.communication is not None:
        return  # already converted
    comm = ExpertCommunication(ep_group, layer.num_experts)
    local = comm.local_experts
    _slice_experts(layer.experts, local.start, local.stop, ep)
    layer.experts.num_experts = comm.num_local
    layer.communication = comm


class ExpertParallelExperts(nn.Module):
    """Expert-parallel replacement for an HF stacked-experts module (same call and parameter names).

    Holds this rank's slice of every ``(E, ...)`` parameter. Expects the HF layout: a fused
    ``gate_up_proj`` of shape ``(E, 2 ffn, hidden)`` (``(E, hidden, 2 ffn)`` when
    ``is_transposed``), gate and up concatenated (interleaved when ``is_concatenated`` is False),
    and ``down_proj`` of shape ``(E, hidden, ffn)`` (transposed likewise).
    """

    def __init__(self, original: nn.Module, num_experts: int, hidden: int, ep_group: dist.ProcessGroup,
                 ep: int) -> None:
        super().__init__()
        names = dict(original.named_parameters(recurse=False))
        if set(names) != {"gate_up_proj", "down_proj"}:
            raise LayoutError(
                f"Expert parallelism supports HF experts with parameters gate_up_proj and down_proj; "
                f"{type(original).__name__} has {sorted(names)}. Use picotron_lightning.moe.MoELayer or "
                "expert_parallel_size=1.")
        self.comm = ExpertCommunication(ep_group, num_experts)
        self.num_experts = num_experts
        self.hidden = hidden
        self.transposed = bool(getattr(original, "is_transposed", False))
        self.concatenated = bool(getattr(original, "is_concatenated", True))
        self.act_fn = getattr(original, "act_fn", F.silu)
        self.gate_up_proj = names["gate_up_proj"]
        self.down_proj = names["down_proj"]
        local = self.comm.local_experts
        _slice_experts(self, local.start, local.stop, ep)

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w1, w2 = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        if not self.transposed:  # stored as (out, in) like nn.Linear; grouped_matmul wants (in, out)
            w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
        return w1, w2

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.is_meta:  # shape-only dry run: the exchange sizes depend on data
            return torch.empty_like(hidden_states)
        x = hidden_states.reshape(-1, self.hidden)
        k = top_k_index.shape[-1]
        index = top_k_index.reshape(-1, k)
        # HF routers may mark unused slots with index == num_experts; route them nowhere.
        valid = index < self.num_experts
        with torch.no_grad():
            routed = torch.where(valid, index, self.num_experts)
            order, counts, _, _ = sort_by_expert(routed, self.num_experts + 1)
            order = order[: int(counts[:-1].sum())]
            counts = counts[:-1]
        token_of = order // k
        local_rows, local_counts, handle = self.comm.dispatch(x.index_select(0, token_of), counts)
        w1, w2 = self._weights(local_rows.dtype)
        h = grouped_matmul(local_rows, w1, local_counts)
        if self.concatenated:
            gate, up = h.chunk(2, dim=-1)
        else:
            gate, up = h[..., 0::2], h[..., 1::2]
        out_local = grouped_matmul(self.act_fn(gate) * up, w2, local_counts)
        rows = self.comm.combine(out_local, handle)
        gate_w = top_k_weights.reshape(-1, k).reshape(-1).index_select(0, order)
        weighted = (rows * gate_w.unsqueeze(-1).to(rows.dtype)).to(x.dtype)
        out = torch.zeros_like(x).index_add(0, token_of, weighted)
        return out.view_as(hidden_states)


def _takes_routing_args(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return len([p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                          p.VAR_POSITIONAL)]) >= 3 or any(
        p.kind == p.VAR_POSITIONAL for p in params.values())


def _convert_hf_block(name: str, block: nn.Module, ep_group: dist.ProcessGroup, ep: int) -> None:
    parts = _hf_moe_parts(block)
    assert parts is not None
    _, experts_name, count, hidden = parts
    experts = getattr(block, experts_name)
    if count < 0 or not _takes_routing_args(experts):
        raise LayoutError(
            f"MoE block '{name}' keeps its experts as a list of modules ({type(experts).__name__})"
            " looped over inside the block's forward, which expert parallelism cannot intercept."
            " Use transformers>=5 (stacked experts), picotron_lightning.moe.MoELayer, or"
            " expert_parallel_size=1.")
    setattr(block, experts_name, ExpertParallelExperts(experts, count, hidden, ep_group, ep))


def convert_moe_layers(module: nn.Module, expert_mesh: DeviceMesh,
                          layout: ParallelLayout) -> None:
    """Convert every MoE layer of ``module`` in place to expert-parallel form over ``expert_mesh``.

    ``expert_mesh`` is ``layout.build_expert_mesh(device)`` (dims ``pp, ep_replicate, ep, tp``).
    Each ``ep`` rank keeps ``E / ep`` experts per layer; routing statistics are wired to be
    reduced over the data-parallel ranks (``ep`` x ``ep_replicate``). Idempotent.
    """
    ep = layout.ep
    validate_expert_parallel(module, ep)
    ep_group = expert_mesh.get_group("ep")
    replicate_group = expert_mesh.get_group("ep_replicate")
    if dist.get_world_size(ep_group) != ep:
        raise LayoutError(f"expert mesh 'ep' dimension has size {dist.get_world_size(ep_group)}, layout says "
                          f"expert_parallel_size={ep}; build the mesh with layout.build_expert_mesh().")
    for name, layer in find_moe_layers(module):
        if isinstance(layer, MoELayer):
            layer.balancer.stat_groups = (ep_group, replicate_group)
            if ep > 1:
                _convert_moe_layer(layer, ep_group, ep)
        elif ep > 1:
            _convert_hf_block(name, layer, ep_group, ep)


# ---------------------------------------------------------------------------- gradients
def is_expert_parameter(param: torch.Tensor) -> bool:
    """True for parameters that expert parallelism split across the ``ep`` ranks."""
    return bool(getattr(param, EXPERT_PARAM_ATTR, False))


def _named_expert_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in module.named_parameters():
        if is_expert_parameter(p):
            yield name, p


def expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters data parallelism must not wrap: they differ across ``ep`` ranks."""
    return [p for _, p in _named_expert_parameters(module)]


def expert_parameter_names(module: nn.Module) -> list[str]:
    """Qualified names of :func:`expert_parameters` (for DDP's ignore list)."""
    return [n for n, _ in _named_expert_parameters(module)]


@torch.no_grad()
def reduce_expert_gradients(module: nn.Module, expert_mesh: DeviceMesh) -> None:
    """Average expert gradients over the ``ep_replicate`` ranks (copies of the same experts).

    Call once per optimizer step, after the last backward. One coalesced all-reduce; nothing when
    there is a single replica or no expert parameters.
    """
    grads = [p.grad for p in expert_parameters(module) if p.grad is not None]
    mean_all_reduce_(grads, expert_mesh.get_group("ep_replicate"))


def set_aux_loss_scale(module: nn.Module, scale: float) -> None:
    """Scale of the injected auxiliary-loss gradients of every MoE layer in ``module``.

    Set it to what the training loss is multiplied by before ``backward``: ``1 / accumulate_grad_batches``
    under gradient accumulation, times the loss scale under fp16 loss scaling.
    """
    for m in module.modules():
        if isinstance(m, MoELayer):
            m.balancer.aux_loss_scale = float(scale)
