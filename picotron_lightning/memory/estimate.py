"""Per-rank peak memory of one training step, before launch: trace it on fake tensors, one rank at a time.

For each rank the estimator joins a *fake* process group of the full world size as that rank
(collectives return at once and move nothing), builds the model on fake tensors (no memory, no
compute), applies the same ``parallelize`` steps as the strategy, and runs two training steps the
way Lightning's automatic optimization does (training step, zero_grad, backward, optimizer step).
The second step is measured by :class:`~picotron_lightning.memory.tracker.LiveBytes`: the live
bytes of every storage, peak broken down into parameters, gradients, optimizer state,
activations and temporaries.

Where fake tensors cannot follow the model (data-dependent shapes, as MoE routing has) the
estimator says so and stops; ``allow_real_trace=True`` runs the same trace on real tensors in local
gloo processes, and ``in_process_group=True`` on the process group that exists, which is exact for
the memory of a model that fits in host memory but costs its compute. The traces themselves live in
:mod:`picotron_lightning.memory.trace`; this module holds the public calls and the command line.

Run ``python -m picotron_lightning.memory.estimate --help`` for the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from picotron_lightning.memory.policy import POLICIES, MemoryPolicy, PolicyEstimate, skip_reason
from picotron_lightning.memory.trace import (
    RankEstimate,
    StepFn,
    _fake_trace,
    _real_trace_worker,
    _trace_on_existing_group,
    fake_process_group,
    representative_ranks,
)
from picotron_lightning.topology import LayoutError, ParallelLayout

if TYPE_CHECKING:
    from picotron_lightning.memory.options import MemoryOptions
    from picotron_lightning.options import Picotron3DOptions

__all__ = ["RankEstimate", "estimate_memory", "estimate_policies", "fake_process_group", "format_table",
           "representative_ranks"]


def estimate_memory(
    build_module: Callable[[], nn.Module],
    batch: torch.Tensor,
    layout: ParallelLayout,
    *,
    options: Picotron3DOptions | None = None,
    checkpointing: str = "none",
    checkpoint_every: int = 1,
    memory: MemoryOptions | None = None,
    ranks: Sequence[int] | None = None,
    step: StepFn | None = None,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    allow_real_trace: bool = False,
    timeout: float = 600.0,
    count_flops: bool = False,
    in_process_group: bool = False,
) -> list[RankEstimate]:
    """Predict each rank's peak memory in one training step of ``layout``.

    Args:
        build_module: builds the (unparallelized) model; called once per rank under fake tensors
            (picklable, e.g. a ``functools.partial``, when the real trace may run).
        batch: one rank's micro-batch (a real tensor of the real shape; its values are not used).
        layout: a resolved layout.
        options: the strategy's :class:`~picotron_lightning.options.Picotron3DOptions` (data-parallel mode,
            tp options, pipeline schedule; its layout and memory sections are replaced by ``layout`` and
            ``checkpointing``); default: FSDP2 and the strategy's defaults.
        checkpointing, checkpoint_every: activation checkpointing (see :class:`MemoryOptions`).
        memory: the whole memory policy (checkpointing, activation offload, FSDP2 CPU offload); when given,
            ``checkpointing`` and ``checkpoint_every`` are ignored.
        ranks: which global ranks to estimate; default :func:`representative_ranks`.
        step: ``step(model, batch) -> loss`` for one micro-batch; default: the module's ``training_step``.
        build_optimizer: default: the module's ``configure_optimizers()`` or AdamW.
        allow_real_trace: when fake tensors cannot follow the layout (pipeline and tensor+data
            parallelism on the fake process group, data-dependent shapes such as MoE routing), run
            the step on real tensors in ``layout.world_size`` local gloo processes instead. Exact,
            but it needs every rank's share of the model in host memory and costs one real step.
        timeout: deadline of the real trace, in seconds.
        count_flops: also fill :attr:`RankEstimate.flops`, from one more step run after the measured one
            (under :class:`~picotron_lightning.memory.flops.FlopCount`), so counting never changes the peak.
        in_process_group: trace one real step on the process group that already exists (gloo, CPU tensors,
            world size ``layout.world_size``) instead of fake tensors or local processes. A collective call:
            every rank of the group calls it with the same arguments, and every rank gets every rank's
            estimate (``all_gather_object``), so all of them see the same numbers.
    """
    from picotron_lightning.options import Picotron3DOptions

    if not layout.is_resolved:
        raise ValueError(f"`layout` must be resolved (no 'auto'); got {layout.describe()}. Call layout.resolve(n).")
    base = options if options is not None else Picotron3DOptions()
    policy = memory if memory is not None else dataclasses.replace(
        base.memory, activation_checkpointing=checkpointing, checkpoint_every=checkpoint_every)
    config = dataclasses.replace(base, memory=dataclasses.replace(policy, memory_budget=None))
    wanted = list(ranks) if ranks is not None else representative_ranks(layout)
    if in_process_group:
        every_rank = _trace_on_existing_group(build_module, batch, layout, config, step, build_optimizer,
                                              count_flops=count_flops)
        return [every_rank[rank] for rank in wanted]
    try:
        return [_fake_trace(build_module, batch, layout, config, rank, step, build_optimizer, count_flops=count_flops)
                for rank in wanted]
    except LayoutError:
        raise  # a layout the strategy refuses too: no trace would help
    except Exception as error:  # noqa: BLE001 - reported, or the real trace runs instead
        if not allow_real_trace:
            raise RuntimeError(
                f"The fake-tensor trace of {layout.describe()} failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). Pass allow_real_trace=True (--real) to trace "
                "one real step in local gloo processes instead (needs each rank's model share in host memory)."
            ) from error
    from picotron_lightning.testing import run_ranks

    every = run_ranks(_real_trace_worker, layout.world_size, build_module, batch, layout, config, step,
                      build_optimizer, timeout=timeout, count_flops=count_flops)
    return [every[rank] for rank in wanted]


def estimate_policies(
    build_module: Callable[[], nn.Module],
    batch: torch.Tensor,
    layout: ParallelLayout,
    *,
    options: Picotron3DOptions | None = None,
    device_type: str = "cuda",
    policies: Sequence[MemoryPolicy] = POLICIES,
    estimate_skipped: bool = True,
    stop_at_budget: int | None = None,
    **kwargs: Any,
) -> list[PolicyEstimate]:
    """:func:`estimate_memory` for each memory policy, cheapest first, with its recompute FLOPs and bytes moved.

    ``device_type`` is the device the run will use: offload policies are marked skipped on ``"cpu"``
    (and still estimated, as for an accelerator, unless ``estimate_skipped=False``). Other keyword
    arguments go to :func:`estimate_memory`. ``stop_at_budget``: stop after the first applicable policy whose
    peak fits these bytes (the later ones could not be chosen; each estimate is one trace per rank).
    """
    from picotron_lightning.options import Picotron3DOptions

    base = options if options is not None else Picotron3DOptions()
    dp_mode = base.data_parallel.mode if layout.dp > 1 else "none"
    results: list[PolicyEstimate] = []
    baseline_flops: dict[int, int] = {}
    for policy in policies:
        skipped = skip_reason(policy, device_type, "fsdp" if dp_mode == "auto" else dp_mode)
        if skipped and not estimate_skipped:
            results.append(PolicyEstimate(policy, None, skipped=skipped))
            continue
        try:
            ranks = estimate_memory(build_module, batch, layout, options=base, memory=policy.applied_to(base.memory),
                                    count_flops=True, **kwargs)
        except Exception as error:  # noqa: BLE001 - a policy the layout cannot take is reported, not fatal
            if not skipped:
                raise
            results.append(PolicyEstimate(policy, None, skipped=f"{skipped}; not estimated: {error}"))
            continue
        for r in ranks:
            baseline_flops.setdefault(r.rank, r.flops)  # the first policy, "none", has no recompute
        results.append(PolicyEstimate(
            policy, max(r.peak for r in ranks), skipped=skipped, ranks=tuple(ranks),
            recompute_flops=max(max(0, r.flops - baseline_flops[r.rank]) for r in ranks),
            bytes_moved=max(r.bytes_moved for r in ranks)))
        if stop_at_budget is not None and not skipped and results[-1].peak is not None \
                and results[-1].peak <= stop_at_budget:
            break
    return results


# ---------------------------------------------------------------------- command line
def format_table(estimates: Sequence[RankEstimate], title: str = "") -> str:
    """One row per rank, MiB per kind; readable in a terminal."""
    columns = ("params", "grads", "optimizer", "activations", "temporaries")
    header = f"{'rank':>4} {'pp':>2} {'dp':>2} {'tp':>2} " + " ".join(f"{c:>11}" for c in columns)
    header += f" {'comm bufs':>11} {'offloaded':>11} {'peak':>11} {'CUDA active':>11} {'CUDA rsrvd':>11}  trace"
    lines = [title, header] if title else [header]
    for e in estimates:
        b = e.breakdown.as_dict()
        c = e.coordinates
        row = f"{e.rank:>4} {c['pp']:>2} {c['dp']:>2} {c['tp']:>2} " + " ".join(f"{_mib(b[k]):>11}" for k in columns)
        active, reserved = (e.cuda.active, e.cuda.reserved) if e.cuda is not None else (0, 0)
        trace = e.method + (f", MoE routing {e.routing}" if e.routing else "")
        lines.append(row + f" {_mib(e.comm_buffers):>11} {_mib(e.offloaded_state):>11} {_mib(e.peak):>11}"
                     f" {_mib(active + e.comm_buffers):>11} {_mib(reserved + e.comm_buffers):>11}  {trace}")
    lines.append("(MiB; peak = live tensor bytes at the step's peak + communication buffers - state offloaded to the "
                 "host; CUDA: the caching allocator's rounded blocks and the segments holding them, a lower bound)")
    return "\n".join(lines)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m picotron_lightning.memory.estimate --preset small --world-size 4 --tp 2 --micro-batch 8``."""
    from picotron_lightning.memory.routing import ROUTING_ASSUMPTIONS

    parser = argparse.ArgumentParser(prog="python -m picotron_lightning.memory.estimate",
                                     description="Per-rank peak memory of one training step of the reference Llama.")
    parser.add_argument("--preset", default="tiny", help="reference model preset (picotron_lightning.models.PRESETS)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size")
    parser.add_argument("--ep", type=int, default=1, help="expert_parallel_size (an MoE preset, e.g. tiny-moe)")
    parser.add_argument("--moe-routing", default="worst_case", choices=ROUTING_ASSUMPTIONS,
                        help="the MoE routing charged (memory.moe_routing): worst_case bounds any batch, measured "
                        "is the traced batch's own")
    parser.add_argument("--dp-mode", default="fsdp", choices=("fsdp", "ddp", "hsdp", "auto"))
    parser.add_argument("--hsdp-shard-size", type=int, default=None, help="with --dp-mode hsdp: ranks per shard "
                        "group (hsdp_shard_size; default: every data-parallel rank of one node, here all of them)")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per rank and step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--checkpointing", default="none", help="none, selective, full, or a comma-separated list")
    parser.add_argument("--all-ranks", action="store_true", help="every rank, not one per (stage, ep rank, tp rank)")
    parser.add_argument("--real", action="store_true", help="trace on real tensors in local gloo processes "
                        "where fake tensors cannot follow the layout")
    parser.add_argument("--policies", action="store_true", help="estimate every memory policy (checkpointing, "
                        "offload) and show recompute FLOPs and bytes moved")
    parser.add_argument("--budget", type=float, default=None, help="with --policies: per-rank budget in MiB; "
                        "shows the policy memory_budget would choose")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="the device the run will use "
                        "(offload policies are skipped on cpu)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except LayoutError as error:  # sizes that do not fit the model or each other: the message lists what works
        parser.error(str(error))


def _run(args: argparse.Namespace) -> int:
    import functools

    from picotron_lightning.memory.options import MemoryOptions
    from picotron_lightning.models import CausalLMModule, llama_config
    from picotron_lightning.options import Picotron3DOptions
    from picotron_lightning.parallel.data import DataParallelOptions

    overrides = {"num_layers": args.layers} if args.layers else None
    build = functools.partial(CausalLMModule, preset=args.preset, config=overrides, seed=0)
    layout = ParallelLayout("auto", args.tp, args.pp, args.ep).resolve(args.world_size)
    # Random token ids, not zeros: with the measured routing, one repeated token would route every
    # position alike, the least representative batch there is.
    batch = torch.randint(0, llama_config(args.preset).vocab_size, (args.micro_batch, args.seq_len + 1),
                          generator=torch.Generator().manual_seed(0))
    dp = DataParallelOptions(mode=args.dp_mode, hsdp_shard_size=args.hsdp_shard_size or "auto")
    options = Picotron3DOptions(data_parallel=dp,
                                memory=MemoryOptions(moe_routing=args.moe_routing))
    if args.policies:
        return _print_policies(build, batch, layout, options, args)
    for mode in args.checkpointing.split(","):
        estimates = estimate_memory(build, batch, layout, options=options, checkpointing=mode,
                                    ranks=range(layout.world_size) if args.all_ranks else None,
                                    allow_real_trace=args.real)
        print(format_table(estimates, f"{args.preset}, {layout.describe()}, {args.dp_mode}, checkpointing={mode}, "
                                      f"micro-batch {args.micro_batch} x {args.seq_len} tokens"))
        print()
    return 0


def _print_policies(build: Callable[[], nn.Module], batch: torch.Tensor, layout: ParallelLayout,
                    options: Picotron3DOptions, args: argparse.Namespace) -> int:
    from picotron_lightning.memory.policy import MemoryBudgetError, choose_policy, format_policy_table

    results = estimate_policies(build, batch, layout, options=options, device_type=args.device,
                                allow_real_trace=args.real)
    budget = None if args.budget is None else int(args.budget * 2**20)
    print(f"{args.preset}, {layout.describe()}, {args.dp_mode}, micro-batch {args.micro_batch} x {args.seq_len} "
          f"tokens, device {args.device}: every memory policy, cheapest first")
    print(format_policy_table(results, budget))
    if budget is not None:
        try:
            print(choose_policy(results, budget)[1])
        except MemoryBudgetError as error:
            print(f"no policy fits: {str(error).splitlines()[0]}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
