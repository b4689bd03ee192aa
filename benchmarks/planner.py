"""Does the planner order layouts the way they really run? Predicted vs measured step time on CPU gloo ranks.

For each world size (2 and 4 processes) one run of real ranks parallelizes the same model in several
layouts (the strategy's own ``parallelize``, each layout on its own DeviceMesh over the same processes),
then times training steps in A-B-B-A rounds (all layouts in order, then in reverse, repeated), so slow
drifts of the shared machine's load fall on every layout alike. A step's time is the slowest rank's,
from a barrier to a barrier; each layout's number is the median of its steps after warm-up.

The prediction is the planner's: ``plan_layout`` with the layout's sizes, mode, checkpointing and
microbatches fixed (the planner fills the communication settings, which the run then uses), scored
with the block calibration measured by the same ranks in the same run (``planner/block_probe.py``: one
block's forward, backward and optimizer step per parallel style the layouts use, pp=1, the product's own
``parallelize``; measured before and after the timed rounds and averaged, so drift falls on both), composed
into each layout's step by ``cost_model.step_time``; for comparison also with the per-op rates probed in the
same run (``planner/probe.py``'s ``measure_rates``) and with the fixed table the strategy uses.
Prints per world size the table, Spearman's rank correlation of predicted and measured step times, and the probe.

    python benchmarks/planner.py [--preset small --layers 4 --seq 128 --global-batch 8 --rounds 8 --steps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
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


def _bench_worker(rank: int, world: int, preset: str, config: dict, seq: int, global_batch: int,
                  runs: list[dict[str, Any]], warmup: int, rounds: int, steps: int, styles: list[Any], samples: int,
                  calibration_passes: int) -> dict[str, Any]:
    import warnings

    import torch.distributed as dist

    from picotron_lightning.memory.trace import _optimizer, _step_runner
    from picotron_lightning.models import CausalLMModule
    from picotron_lightning.parallel.parallelize import parallelize
    from picotron_lightning.testing import init_gloo

    warnings.simplefilter("ignore")
    init_gloo(rank, world)
    from picotron_lightning.planner.block_probe import _measure_style
    from picotron_lightning.planner.probe import measure_rates

    cfg = CausalLMModule(preset, config).config
    probe = measure_rates(global_batch * seq // world, cfg.hidden_size, cfg.ffn_size)
    factory = functools.partial(CausalLMModule, preset, config)
    calibrations = [[_measure_style(rank, world, factory, seq, style, samples) for style in styles]]
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
    for _ in range(calibration_passes - 1):
        calibrations.append([_measure_style(rank, world, factory, seq, style, samples) for style in styles])
    return {"times": times, "probe": probe, "calibrations": calibrations}


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
    from picotron_lightning.planner.calibration import BlockCalibration, style_of
    from picotron_lightning.planner.cost_model import step_time
    from picotron_lightning.planner.probe import probed_spec
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
    styles = list(dict.fromkeys(s for plan in planned if (s := style_of(plan.candidate)) is not None))
    samples = min(max(2, *(plan.candidate.micro_batch_size for plan in planned)), 8)
    start = time.perf_counter()
    out = run_ranks(_bench_worker, world, args.preset, config, args.seq, args.global_batch, runs, args.warmup,
                    args.rounds, args.steps, styles, samples, args.calibration_passes, timeout=args.timeout)[0]
    wall = time.perf_counter() - start
    probe = out["probe"]
    probed = probed_spec(probe, table)
    calibration = BlockCalibration(world, args.seq, tuple(zip(styles, map(_mean_cost, zip(*out["calibrations"],
                                                                                             strict=True)),
                                                              strict=True)))
    calibrated = dataclasses.replace(probed, calibration=calibration, rates_processes=world)
    measured = [statistics.median(t) for t in out["times"]]
    fastest = [min(t) for t in out["times"]]
    quartiles = [statistics.quantiles(t, n=4) for t in out["times"]]
    # The minimum of each A-B-B-A block of rounds (2 rounds x steps): how much the minimum itself moves.
    block = 2 * args.steps
    block_minima = [[min(t[i:i + block]) for i in range(0, len(t), block)] for t in out["times"]]
    spread = [(q[2] - q[0]) / m for q, m in zip(quartiles, measured, strict=True)]
    predicted, rated, fixed = [], [], []
    for plan in planned:
        reshard = plan.settings.reshard_after_forward is not False
        predicted.append(step_time(spec, plan.candidate, calibrated, world, reshard_after_forward=reshard))
        rated.append(step_time(spec, plan.candidate, probed, world, reshard_after_forward=reshard))
        fixed.append(plan.time)
    return {"rows": rows, "planned": planned, "measured": measured, "fastest": fastest, "spread": spread,
            "predicted": predicted, "rated": rated, "fixed": fixed, "probe": probe, "wall": wall,
            "quartiles": quartiles, "calibration": calibration,
            "block_minima": block_minima,
            "steps": [len(t) for t in out["times"]], "times": out["times"], "steps_per_round": args.steps}


def _mean_cost(costs: tuple[Any, ...]) -> Any:
    """The mean of a style's calibrations (before and after the timed rounds), field by field."""
    from picotron_lightning.planner.calibration import Linear, StyleCost

    def mean(values: list[float]) -> float:
        return statistics.fmean(values)

    lines = {name: Linear(mean([getattr(c, name).fixed for c in costs]), mean([getattr(c, name).per_sample
                                                                                for c in costs]))
             for name in ("block_forward", "block_backward", "outer_forward", "outer_backward")}
    return StyleCost(**lines, block_optimizer=mean([c.block_optimizer for c in costs]),
                     outer_optimizer=mean([c.outer_optimizer for c in costs]),
                     block_sync=mean([c.block_sync for c in costs]), outer_sync=mean([c.outer_sync for c in costs]))


def resolved_pairs(low: list[float], high: list[float], measured: list[float]) -> list[bool]:
    """For neighbours in measured order: is the faster one's upper end below the slower one's lower end?"""
    order = sorted(range(len(measured)), key=lambda i: measured[i])
    return [high[a] < low[b] for a, b in zip(order, order[1:], strict=False)]


def sign_test_threshold(rounds: int, alpha: float = 0.05) -> int:
    """The fewest rounds out of ``rounds`` a layout must win for a one-sided sign test at ``alpha``."""
    for wins in range(rounds + 1):
        tail = sum(math.comb(rounds, k) for k in range(wins, rounds + 1)) / 2 ** rounds
        if tail <= alpha:
            return wins
    return rounds + 1


def round_wins(times: list[list[float]], measured: list[float], steps: int) -> list[tuple[int, int]]:
    """For neighbours in measured order: in how many rounds the faster one's median step beat the slower one's.

    The rounds pair the layouts in time (each round visits every layout once, A-B-B-A), so a drift of the
    machine's load between rounds falls on both of a pair; a layout that wins nearly every round is
    faster beyond the noise even where single steps' spreads overlap.
    """
    per_round = [[statistics.median(t[i:i + steps]) for i in range(0, len(t), steps)] for t in times]
    order = sorted(range(len(measured)), key=lambda i: measured[i])
    return [(sum(x < y for x, y in zip(per_round[a], per_round[b], strict=True)), len(per_round[a]))
            for a, b in zip(order, order[1:], strict=False)]


def report(world: int, res: dict[str, Any]) -> str:
    p = res["probe"]
    lines = [f"world {world}: probe {p['flops'] / 1e9:.1f} GFLOP/s per process, op {p['op_seconds'] * 1e6:.1f} us, "
             f"DTensor op {p['dtensor_op_seconds'] * 1e6:.1f} us, copy {p['copy_bandwidth'] / 1e9:.2f} GB/s, gloo "
             f"{p['bandwidth'] / 1e9:.2f} GB/s, {p['latency'] * 1e6:.0f} us; run {res['wall']:.0f} s, "
             f"{res['steps'][0]} timed steps per layout",
             "block calibration (ms, style dp/tp/mode/ckpt: block forward + backward at 1 sample and per further "
             "sample, "
             "outside the blocks the same, optimizer per block / outside, FSDP2's per-pass gathers and reductions "
             "per block / outside where measured): " + "; ".join(
                 f"{dp}/{tp}/{mode}/{ckpt}: {(c.block_forward.fixed + c.block_backward.fixed) * 1e3:.1f} + "
                 f"{(c.block_forward.per_sample + c.block_backward.per_sample) * 1e3:.1f}/sample, outer "
                 f"{(c.outer_forward.fixed + c.outer_backward.fixed) * 1e3:.1f} + "
                 f"{(c.outer_forward.per_sample + c.outer_backward.per_sample) * 1e3:.1f}/sample, opt "
                 f"{c.block_optimizer * 1e3:.1f}/{c.outer_optimizer * 1e3:.1f}"
                 + (f", FSDP2 gather/reduce per pass {c.block_sync * 1e3:.1f}/{c.outer_sync * 1e3:.1f}"
                    if c.block_sync or c.outer_sync else "")
                 for (dp, tp, mode, ckpt), c in res["calibration"].styles),
             "| layout (planner's settings) | measured ms (median) | IQR / median | min ms | block minima ms "
             "| predicted ms (blocks) | compute | exposed comm | bubble | optimizer "
             "| predicted ms (per-op rates) | predicted ms (fixed table) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, plan, m, low, s, t, r, f, bm in zip(res["rows"], res["planned"], res["measured"], res["fastest"],
                                                 res["spread"], res["predicted"], res["rated"], res["fixed"],
                                                 res["block_minima"], strict=True):
        exposed = sum(t.exposed.values())
        o = t.overhead
        lines.append(f"| {row[0]}: {plan.candidate.describe()} {plan.settings.describe()} | {m * 1e3:.0f} | "
                     f"{s * 100:.0f}% | {low * 1e3:.0f} | {min(bm) * 1e3:.0f}-{max(bm) * 1e3:.0f} | "
                     f"{t.total * 1e3:.0f} | {t.compute * 1e3:.0f} | "
                     f"{exposed * 1e3:.0f} | {t.bubble * 1e3:.0f} | {o['optimizer'] * 1e3:.0f} | "
                     f"{r.total * 1e3:.0f} | {f.total * 1e3:.0f} |")
    rho = spearman([t.total for t in res["predicted"]], res["measured"])
    rho_rated = spearman([t.total for t in res["rated"]], res["measured"])
    rho_fixed = spearman([t.total for t in res["fixed"]], res["measured"])
    rho_min = spearman([t.total for t in res["predicted"]], res["fastest"])
    rho_min_fixed = spearman([t.total for t in res["fixed"]], res["fastest"])
    by_median = resolved_pairs([q[0] for q in res["quartiles"]], [q[2] for q in res["quartiles"]], res["measured"])
    by_min = resolved_pairs([min(b) for b in res["block_minima"]], [max(b) for b in res["block_minima"]],
                            res["fastest"])
    lines.append(f"Spearman(predicted from blocks, measured median) = {rho:.2f} (per-op rates {rho_rated:.2f}, "
                 f"fixed table {rho_fixed:.2f}); "
                 f"neighbours in median order whose interquartile ranges do not overlap: {sum(by_median)} of "
                 f"{len(by_median)}")
    lines.append(f"Spearman(predicted from blocks, measured minimum) = {rho_min:.2f} "
                 f"(fixed table {rho_min_fixed:.2f}); "
                 f"neighbours in minimum order whose A-B-B-A block minima do not overlap: {sum(by_min)} of "
                 f"{len(by_min)}")
    wins = round_wins(res["times"], res["measured"], res["steps_per_round"])
    rounds = wins[0][1] if wins else 0
    needed = sign_test_threshold(rounds)
    lines.append(f"Neighbours in median order where the faster won at least {needed} of {rounds} rounds (one-sided "
                 f"sign test, p <= 0.05): {sum(w >= needed for w, _ in wins)} of {len(wins)} (wins: "
                 + ", ".join(f"{w}/{n}" for w, n in wins) + ")")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8, help="A-B-B-A: even counts visit each layout symmetrically")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layout per round")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], choices=sorted(LAYOUTS))
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--calibration-passes", type=int, default=2,
                        help="block calibrations per run: 1 before the timed rounds, 2 also after (averaged)")
    parser.add_argument("--save", default="", help="write each world's step times and predictions to SAVE-worldN.json")
    args = parser.parse_args()
    for world in args.worlds:
        result = bench_world(world, args)
        print(report(world, result), flush=True)
        if args.save:
            with open(f"{args.save}-world{world}.json", "w") as f:
                json.dump({"layouts": [row[0] for row in result["rows"]], "times": result["times"],
                           "predicted": [t.total for t in result["predicted"]]}, f)


if __name__ == "__main__":
    main()
