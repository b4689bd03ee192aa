"""Measuring one block's cost per parallel style on this CPU machine (``plan --calibrate``), cached.

For each style (dp, tp, data-parallel mode, activation checkpointing) the probe starts ``processes`` local
gloo ranks (all of them busy at once, as the planned run will be: a style of fewer ranks than the probe runs
in parallel groups of the mesh), builds the user's model with its stack of blocks cut or extended to 2 and
to 4 blocks, applies the product's own ``parallelize`` (tensor parallelism, FSDP2 or DDP exactly as a run
would) and times, after warm-up, the forward (``training_step``), the backward and the optimizer step at 1
and at ``samples`` samples per micro-batch. Per phase: block = (t(4) - t(2)) / 2, outside the blocks = t(2)
- 2 block, each a line through the two sample counts (``calibration.Linear``). The four configurations
(2 or 4 blocks, 1 or ``samples`` samples) are built at once and timed in alternating rounds; each phase's
number is the minimum over the rounds of the slowest rank's time. FSDP styles with dp > 1 are timed a
second time with FSDP2 gathering once and reducing once per step (as a pipeline stage runs its
microbatches), which prices what a pass costs beyond that (``StyleCost.block_sync``).

Nothing is fitted to layouts' step times: the composition (``calibration.compose_step``) only adds what
the probe measured. Results are cached as JSON per machine, torch version, model shape, sequence length,
process count and style under ``$PICOTRON_PLANNER_CACHE`` (default ``~/.cache/picotron_lightning/planner``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from picotron_lightning.planner.calibration import BlockCalibration, Linear, Style, StyleCost
from picotron_lightning.planner.model_spec import ModelSpec

BLOCK_COUNTS = (2, 4)
PROBE_VERSION = 2
"""Bumped whenever what the probe measures changes, so older cached measurements are not read as new ones."""


def cache_dir() -> Path:
    """Where measured calibrations are kept (``$PICOTRON_PLANNER_CACHE`` or ``~/.cache/...``)."""
    return Path(os.environ.get("PICOTRON_PLANNER_CACHE", Path.home() / ".cache" / "picotron_lightning" / "planner"))


def _machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"host": platform.node(), "cpu": model, "cores": cores, "torch": torch.__version__}


def cache_key(spec: ModelSpec, processes: int, style: Style, samples: int) -> str:
    """A digest of everything the measurement depends on (machine, torch, model shape, run shape, style)."""
    shape = {"name": spec.name, "params": spec.total_params, "block_flops": list(spec.block_flops),
             "outer_flops": spec.outer_flops, "seq": spec.seq_len}
    text = json.dumps({"machine": _machine(), "model": shape, "processes": processes, "style": list(style),
                       "samples": samples, "blocks": BLOCK_COUNTS, "probe": PROBE_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def style_cache_path(spec: ModelSpec, processes: int, style: Style, samples: int) -> Path:
    """The file that holds (or will hold) one style's measured costs."""
    return cache_dir() / f"{cache_key(spec, processes, style, samples)}.json"


def rates_cache_path(processes: int) -> Path:
    """The file that holds (or will hold) the rates probed on ``processes`` local ranks."""
    text = json.dumps({"machine": _machine(), "processes": processes, "rates": "measure_rates"}, sort_keys=True)
    return cache_dir() / f"rates-{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"


def _cost_from_json(data: dict[str, Any]) -> StyleCost:
    lines = {k: Linear(**v) for k, v in data.items() if isinstance(v, dict)}
    return StyleCost(lines["block_forward"], lines["block_backward"], lines["outer_forward"], lines["outer_backward"],
                     data["block_optimizer"], data["outer_optimizer"], data["block_sync"], data["outer_sync"])


def calibrate_cpu(factory: Callable[[], nn.Module], spec: ModelSpec, processes: int, styles: Sequence[Style],
                  samples: int = 4, refresh: bool = False, timeout: float = 900.0) -> BlockCalibration:
    """Measure (or read from the cache) every style's costs with ``processes`` local ranks busy at once.

    ``factory`` builds the model (a LightningModule with ``training_step``, or a model whose forward takes
    a batch of token ids and returns a loss); ``samples`` is the larger micro-batch measured (1 the other).
    """
    from picotron_lightning.testing import run_ranks

    if samples < 2:
        raise ValueError(f"`samples` must be at least 2 (the probe fits a line through 1 and it), got {samples}.")
    for dp, tp, _, _ in styles:
        if processes % (dp * tp):
            raise ValueError(f"style dp={dp} x tp={tp} does not divide the probe's {processes} processes.")
    found: dict[Style, StyleCost] = {}
    missing = []
    for style in dict.fromkeys(styles):
        path = style_cache_path(spec, processes, style, samples)
        if path.exists() and not refresh:
            found[style] = _cost_from_json(json.loads(path.read_text())["cost"])
        else:
            missing.append(style)
    if missing:
        measured = run_ranks(_calibrate_worker, processes, factory, spec.seq_len, missing, samples,
                             timeout=timeout)[0]
        cache_dir().mkdir(parents=True, exist_ok=True)
        for style, cost in zip(missing, measured, strict=True):
            found[style] = cost
            path = style_cache_path(spec, processes, style, samples)
            path.write_text(json.dumps({"machine": _machine(), "style": list(style), "processes": processes,
                                        "samples": samples, "cost": asdict(cost)}, indent=1))
    return BlockCalibration(processes, spec.seq_len, tuple((s, found[s]) for s in dict.fromkeys(styles)))


def cached_rates(processes: int, refresh: bool = False, timeout: float = 300.0) -> dict[str, float]:
    """``probe.measure_rates`` on ``processes`` local ranks (its gloo link prices the pipeline's sends), cached
    per machine and process count like the block costs, so a calibrated plan from the cache starts no ranks."""
    from picotron_lightning.planner.probe import _probe_worker
    from picotron_lightning.testing import run_ranks

    path = rates_cache_path(processes)
    if path.exists() and not refresh:
        return dict(json.loads(path.read_text()))
    rates: dict[str, float] = run_ranks(_probe_worker, processes, 512, 256, 704, timeout=timeout)[0]
    cache_dir().mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rates, indent=1))
    return rates


def _resize_blocks(module: nn.Module, count: int) -> None:
    """Cut the model's (first) stack of blocks to ``count`` blocks, or extend it with copies of its first."""
    from picotron_lightning.structure import find_block_stacks

    stacks = find_block_stacks(module)
    if not stacks:
        raise ValueError("the block probe found no stack of repeated blocks in the model; plan without --calibrate.")
    container = stacks[0].container
    while len(container) > count:
        del container[len(container) - 1]
    while len(container) < count:
        container.append(copy.deepcopy(container[0]))


def _vocab_size(module: nn.Module) -> int:
    embedding = next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        raise ValueError("the block probe feeds token ids and found no nn.Embedding in the model.")
    return embedding.num_embeddings


class _PhaseTimer:
    """One model's training pass on this rank, timed per phase: forward, backward, optimizer step."""

    def __init__(self, parallel: Any, module: nn.Module) -> None:
        from lightning.pytorch.strategies.strategy import _ForwardRedirection

        from picotron_lightning.memory.trace import _optimizer

        self.parallel, self.module = parallel, module
        self.optimizer = _optimizer(module, None)
        self.redirect = _ForwardRedirection()

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if hasattr(self.module, "training_step"):
            out: Any = self.redirect(self.parallel.module, self.module, "training_step", batch, 0)  # type: ignore[arg-type]
            return out["loss"] if isinstance(out, dict) else out
        return self.parallel.module(batch)

    def once(self, batch: torch.Tensor, step: bool = True) -> list[float]:
        """Seconds of forward, backward and (``step``) the optimizer step; all ranks start at a barrier."""
        import torch.distributed as dist

        dist.barrier()
        t0 = time.perf_counter()
        loss = self._forward(batch)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if step:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2]


def _fsdp_units(module: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _accumulating(units: list[Any], on: bool) -> None:
    """FSDP2 as inside a pipeline step or an accumulation: gathered once, gradients reduced once (``on``)."""
    for unit in units:
        unit.set_reshard_after_forward(not on)
        unit.set_reshard_after_backward(not on)
        unit.set_requires_gradient_sync(not on)
    if not on:
        for unit in units:
            unit.reshard()


def _timed_rounds(timers: dict[tuple[int, int], tuple[_PhaseTimer, torch.Tensor]], warmup: int, repeats: int,
                  step: bool = True) -> dict[tuple[int, int], list[float]]:
    """Per (blocks, samples): each phase's minimum over ``repeats`` of the slowest rank's time.

    Odd rounds visit the configurations in reverse (A-B-B-A), so a drift of the shared machine's load falls
    on all of them alike; the minimum drops the load spikes (which only ever add time), so the
    differences the costs are derived from (4 blocks minus 2, ``samples`` minus 1) are not a spike's size.
    """
    import torch.distributed as dist

    keys = list(timers)
    for key in keys:
        for _ in range(warmup):
            timers[key][0].once(timers[key][1], step)
    best: dict[tuple[int, int], list[float]] = {key: [float("inf")] * 3 for key in keys}
    for r in range(repeats):
        for key in keys if r % 2 == 0 else reversed(keys):
            timer, batch = timers[key]
            local = torch.tensor(timer.once(batch, step), dtype=torch.float64)
            dist.all_reduce(local, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            best[key] = [min(b, t) for b, t in zip(best[key], local.tolist(), strict=True)]
    return best


def _measure_style(rank: int, world: int, factory: Callable[[], nn.Module], seq: int, style: Style,
                   samples: int, warmup: int = 2, repeats: int = 6) -> StyleCost:
    from torch.distributed.device_mesh import init_device_mesh

    from picotron_lightning.memory.options import MemoryOptions
    from picotron_lightning.options import Picotron3DOptions
    from picotron_lightning.parallel.data import DataParallelOptions
    from picotron_lightning.parallel.parallelize import parallelize
    from picotron_lightning.topology import ParallelLayout

    dp, tp, mode, checkpointing = style
    group = dp * tp
    # Every group of `group` ranks runs the style at once, so all processes are busy as in the planned run.
    mesh = init_device_mesh("cpu", (world // group, 1, dp, tp), mesh_dim_names=("probe", "pp", "dp", "tp"))
    mesh = mesh["pp", "dp", "tp"]
    layout = ParallelLayout(dp, tp, 1, 1).resolve(group)
    dp_options = DataParallelOptions(mode="ddp" if mode == "ddp" else "fsdp")  # dp=1: no data parallelism
    options = Picotron3DOptions(layout=layout, data_parallel=dp_options,
                                memory=MemoryOptions(activation_checkpointing=checkpointing))  # type: ignore[arg-type]
    replica = rank // tp  # tp ranks of one group see the same samples
    counts = (1, samples)
    timers: dict[tuple[int, int], tuple[_PhaseTimer, torch.Tensor]] = {}
    for blocks in BLOCK_COUNTS:  # both models live at once, so their runs can alternate
        torch.manual_seed(0)
        module = factory()
        _resize_blocks(module, blocks)
        timer = _PhaseTimer(parallelize(module, mesh, layout, options, torch.device("cpu"), world), module)
        generator = torch.Generator().manual_seed(100 + replica)
        for n in counts:  # one model (and optimizer) per block count, one batch per sample count
            timers[(blocks, n)] = (timer, torch.randint(0, _vocab_size(module), (n, seq + 1), generator=generator))
    times = _timed_rounds(timers, warmup, repeats)
    low, high = BLOCK_COUNTS

    def split(t: dict[tuple[int, int], list[float]]) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
        per_block = {n: [(h - lo) / (high - low) for h, lo in zip(t[(high, n)], t[(low, n)], strict=True)]
                     for n in counts}
        outer = {n: [max(a - low * b, 0.0) for a, b in zip(t[(low, n)], per_block[n], strict=True)] for n in counts}
        return per_block, outer

    per_block, outer = split(times)

    def line(values: dict[int, list[float]], phase: int) -> Linear:
        return Linear.through(counts, (values[1][phase], values[samples][phase]))

    block_opt = max(statistics.fmean(per_block[n][2] for n in counts), 0.0)
    outer_opt = max(statistics.fmean(outer[n][2] for n in counts), 0.0)
    block_sync = outer_sync = 0.0
    if mode == "fsdp" and dp > 1:
        # The same passes with FSDP2 gathering once and reducing once per step, as a pipeline stage runs
        # its microbatches: what a pass costs beyond that is paid once per step, not per microbatch.
        units = {blocks: _fsdp_units(timers[(blocks, 1)][0].module) for blocks in BLOCK_COUNTS}
        for blocks in BLOCK_COUNTS:
            _accumulating(units[blocks], True)
        quiet_block, quiet_outer = split(_timed_rounds(timers, warmup, repeats, step=False))
        for blocks in BLOCK_COUNTS:
            _accumulating(units[blocks], False)

        def passes(values: dict[int, list[float]]) -> float:
            return statistics.fmean(values[n][0] + values[n][1] for n in counts)

        block_sync = max(passes(per_block) - passes(quiet_block), 0.0)
        outer_sync = max(passes(outer) - passes(quiet_outer), 0.0)
    return StyleCost(line(per_block, 0), line(per_block, 1), line(outer, 0), line(outer, 1), block_opt, outer_opt,
                     block_sync, outer_sync)


def _calibrate_worker(rank: int, world: int, factory: Callable[[], nn.Module], seq: int, styles: list[Style],
                      samples: int) -> list[StyleCost]:
    import warnings

    import torch.distributed as dist

    from picotron_lightning.testing import init_gloo

    warnings.simplefilter("ignore")  # training_step's self.log without a Trainer
    init_gloo(rank, world)
    try:
        return [_measure_style(rank, world, factory, seq, style, samples) for style in styles]
    finally:
        dist.destroy_process_group()
