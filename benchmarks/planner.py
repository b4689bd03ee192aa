"""Does the planner order layouts the way they really run? Predicted vs measured step time on CPU gloo ranks.

For each world size (2 and 4 processes) one run of real ranks parallelizes the same model in several
layouts (the strategy's own ``parallelize``, each layout on its own DeviceMesh over the same processes),
then times training steps in A-B-B-A rounds (all layouts in order, then in reverse, repeated), so slow
drifts of the shared machine's load fall on every layout alike. A step's time is the slowest rank's,
from a barrier to a barrier; each layout's number is the median of its steps after warm-up.

The prediction is the planner's: ``plan_layout`` with the layout's sizes, mode, checkpointing and
microbatches fixed (the planner fills the communication settings, which the run then uses), scored
with the CPU constants measured in the same run (``probe_cpu`` below: per-process matmul FLOP/s with
all ranks computing at once, gloo all-reduce bandwidth and latency over the ranks) and, for comparison,
with the fixed table the strategy uses. Prints per world size the table, Spearman's rank correlation
of predicted and measured step times, and the probe.

    python benchmarks/planner.py [--preset small --layers 4 --seq 128 --global-batch 8 --rounds 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

import torch

# (name, dp, tp, pp, data-parallel mode, checkpointing, microbatches)
LAYOUTS: dict[int, list[tuple[str, int, int, int, str, str, int]]] = {
    2: [
        ("dp2 ddp", 2, 1, 1, "ddp", "none", 1),
        ("dp2 fsdp", 2, 1, 1, "fsdp", "none", 1),
        ("dp2 ddp full-ckpt", 2, 1, 1, "ddp", "full", 1),
        ("tp2", 1, 2, 1, "fsdp", "none", 1),
        ("pp2 M=2", 1, 1, 2, "fsdp", "none", 2),
        ("pp2 M=8", 1, 1, 2, "fsdp", "none", 8),
    ],
    4: [
        ("dp4 ddp", 4, 1, 1, "ddp", "none", 1),
        ("dp4 fsdp", 4, 1, 1, "fsdp", "none", 1),
        ("dp4 ddp full-ckpt", 4, 1, 1, "ddp", "full", 1),
        ("dp2 x tp2", 2, 2, 1, "fsdp", "none", 1),
        ("dp2 x pp2 M=4", 2, 1, 2, "fsdp", "none", 4),
        ("tp2 x pp2 M=2", 1, 2, 2, "fsdp", "none", 2),
    ],
}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


def probe_cpu(rows: int, width: int, ffn: int, nbytes: int = 4 << 20, repeats: int = 5) -> dict[str, float]:
    """On every rank at once: fp32 matmul FLOP/s of one block-sized linear, and gloo's all-reduce bus
    bandwidth and latency over all ranks (min over repeats; the mean FLOP/s over ranks)."""
    import torch.distributed as dist

    from picotron_lightning.planner.hardware import link_from_all_reduce_times, time_all_reduces

    world = dist.get_world_size()
    x, w = torch.randn(rows, width), torch.randn(width, ffn)
    x @ w
    rates = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(4):
            x @ w
        rates.append(4 * 2 * rows * width * ffn / (time.perf_counter() - start))
    rate = torch.tensor([max(rates)], dtype=torch.float64)
    dist.all_reduce(rate)

    link = link_from_all_reduce_times(world, nbytes, *time_all_reduces(nbytes, repeats))
    return {"flops": float(rate.item()) / world, "bandwidth": link.bandwidth, "latency": link.latency}


def _bench_worker(rank: int, world: int, preset: str, config: dict, seq: int, global_batch: int,
                  runs: list[dict[str, Any]], warmup: int, rounds: int, steps: int) -> dict[str, Any]:
    import warnings

    import torch.distributed as dist

    from picotron_lightning.memory.trace import _optimizer, _step_runner
    from picotron_lightning.models import CausalLMModule
    from picotron_lightning.parallel.parallelize import parallelize
    from picotron_lightning.testing import init_gloo

    warnings.simplefilter("ignore")
    init_gloo(rank, world)
    cfg = CausalLMModule(preset, config).config
    probe = probe_cpu(global_batch * seq // world, cfg.hidden_size, cfg.ffn_size)
    prepared = []
    for run in runs:
        layout, options = run["layout"], run["options"]
        mesh = layout.build_device_mesh("cpu")
        module = CausalLMModule(preset, config)
        parallel = parallelize(module, mesh, layout, options, torch.device("cpu"), world)
        step = _step_runner(parallel, module, _optimizer(module, None), None)
        coords = layout.coordinates(rank)
        local = global_batch // layout.dp
        generator = torch.Generator().manual_seed(1000 + coords.dp)
        batch = torch.randint(0, module.config.vocab_size, (local, seq + 1), generator=generator)
        prepared.append((step, batch))
    for step, batch in prepared:
        for _ in range(warmup):
            step(batch)
    times: list[list[float]] = [[] for _ in prepared]
    for r in range(rounds):
        order = list(range(len(prepared)))
        for i in order if r % 2 == 0 else reversed(order):  # A-B-...-B-A
            step, batch = prepared[i]
            for _ in range(steps):
                dist.barrier()
                start = time.perf_counter()
                step(batch)
                dist.barrier()
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times[i].append(float(elapsed.item()))
    return {"times": times, "probe": probe}


def _plan(spec: Any, world: int, row: tuple, global_batch: int, device: Any) -> Any:
    from picotron_lightning.planner import Constraints, plan_layout

    _, dp, tp, pp, mode, ckpt, micro = row
    constraints = Constraints(dp=dp, tp=tp, pp=pp, ep=1, dp_mode=mode, checkpointing=ckpt,
                              schedule="1f1b", num_microbatches=micro)
    result = plan_layout(spec, devices=world, devices_per_node=world, device=device, global_batch=global_batch,
                         constraints=constraints, precision="fp32")
    return result.best


def bench_world(world: int, args: argparse.Namespace) -> dict[str, Any]:
    from picotron_lightning.memory.options import MemoryOptions
    from picotron_lightning.models import CausalLMModule
    from picotron_lightning.options import Picotron3DOptions
    from picotron_lightning.parallel.data import DataParallelOptions
    from picotron_lightning.parallel.pipeline_parallel import PipelineOptions
    from picotron_lightning.planner import build_on_meta, describe_model, device_spec
    from picotron_lightning.planner.cost_model import step_time
    from picotron_lightning.planner.hardware import DeviceSpec, Link
    from picotron_lightning.testing import run_ranks
    from picotron_lightning.topology import ParallelLayout

    config = {"num_layers": args.layers}
    spec = describe_model(build_on_meta(lambda: CausalLMModule(args.preset, config)), args.seq, args.preset)
    table = device_spec("cpu")
    rows = LAYOUTS[world]
    planned = [_plan(spec, world, row, args.global_batch, table) for row in rows]
    runs = []
    for plan in planned:
        c, s = plan.candidate, plan.settings
        dp_options = DataParallelOptions(mode=c.dp_mode)
        if s.reshard_after_forward is not None:
            dp_options = dataclasses.replace(dp_options, reshard_after_forward=s.reshard_after_forward)
        options = Picotron3DOptions(
            layout=ParallelLayout(c.dp, c.tp, c.pp, 1).resolve(world), data_parallel=dp_options,
            pipeline=PipelineOptions(schedule=c.schedule, num_microbatches=c.num_microbatches) if c.pp > 1
            else PipelineOptions(), memory=MemoryOptions(activation_checkpointing=c.checkpointing))
        runs.append({"layout": options.layout, "options": options})
    start = time.perf_counter()
    out = run_ranks(_bench_worker, world, args.preset, config, args.seq, args.global_batch, runs, args.warmup,
                    args.rounds, args.steps, timeout=args.timeout)[0]
    wall = time.perf_counter() - start
    probe = out["probe"]
    link = Link("gloo on CPU (probed)", probe["bandwidth"], probe["latency"])
    probed = DeviceSpec("cpu (probed)", {"fp32": probe["flops"]}, table.memory_bytes, link, link, efficiency=1.0)
    measured = [statistics.median(t) for t in out["times"]]
    fastest = [min(t) for t in out["times"]]
    spread = [(max(t) - min(t)) / statistics.median(t) for t in out["times"]]
    predicted, fixed = [], []
    for plan in planned:
        reshard = plan.settings.reshard_after_forward is not False
        predicted.append(step_time(spec, plan.candidate, probed, world, reshard_after_forward=reshard))
        fixed.append(plan.time)
    return {"rows": rows, "planned": planned, "measured": measured, "fastest": fastest, "spread": spread,
            "predicted": predicted, "fixed": fixed, "probe": probe, "wall": wall,
            "steps": [len(t) for t in out["times"]]}


def report(world: int, res: dict[str, Any]) -> str:
    p = res["probe"]
    lines = [f"world {world}: probe {p['flops'] / 1e9:.1f} GFLOP/s per process, gloo bus bandwidth "
             f"{p['bandwidth'] / 1e9:.2f} GB/s, latency {p['latency'] * 1e6:.0f} us; run {res['wall']:.0f} s",
             "| layout (planner's settings) | measured ms (median) | min ms | spread | predicted ms (probed) "
             "| compute | exposed comm | bubble | predicted ms (fixed table) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, plan, m, low, s, t, f in zip(res["rows"], res["planned"], res["measured"], res["fastest"],
                                          res["spread"], res["predicted"], res["fixed"], strict=True):
        exposed = sum(t.exposed.values())
        lines.append(f"| {row[0]}: {plan.candidate.describe()} {plan.settings.describe()} | {m * 1e3:.0f} | "
                     f"{low * 1e3:.0f} | "
                     f"{s * 100:.0f}% | {t.total * 1e3:.0f} | {t.compute * 1e3:.0f} | {exposed * 1e3:.0f} | "
                     f"{t.bubble * 1e3:.0f} | {f.total * 1e3:.0f} |")
    rho = spearman([t.total for t in res["predicted"]], res["measured"])
    rho_fixed = spearman([t.total for t in res["fixed"]], res["measured"])
    rho_min = spearman([t.total for t in res["predicted"]], res["fastest"])
    lines.append(f"Spearman(predicted with probe, measured median) = {rho:.2f}; with the fixed table = "
                 f"{rho_fixed:.2f}; probe vs measured min = {rho_min:.2f} ({res['steps'][0]} timed steps per layout)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6, help="A-B-B-A: even counts visit each layout symmetrically")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per layout per round")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], choices=sorted(LAYOUTS))
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    for world in args.worlds:
        print(report(world, bench_world(world, args)), flush=True)


if __name__ == "__main__":
    main()
