"""``python -m picotron_lightning.plan``: print the planner's ranked layouts for a model and a cluster.

Example::

    python -m picotron_lightning.plan --model picotron_lightning.models:CausalLMModule \\
        --model-args '{"preset": "1b"}' --devices 64 --devices-per-node 8 --device "NVIDIA H100 80GB HBM3"

The model is built on the meta device (no memory), so 70B-parameter models plan in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import sys
from collections.abc import Callable, Sequence

from torch import nn

from picotron_lightning.planner import (
    Constraints,
    PlanError,
    PlanResult,
    build_on_meta,
    describe_model,
    device_spec,
    plan_layout,
)
from picotron_lightning.planner.block_probe import (
    cache_dir,
    cached_rates,
    calibrate_cpu,
    rates_cache_path,
    style_cache_path,
)
from picotron_lightning.planner.calibration import style_of
from picotron_lightning.planner.hardware import GiB
from picotron_lightning.planner.probe import probe_cpu, probed_spec


def load_model_factory(target: str, model_args: dict) -> Callable[[], nn.Module]:
    """``pkg.module:Class`` (or a function) -> a factory that builds it with ``model_args``."""
    if ":" not in target:
        raise PlanError(f"--model {target!r} must look like 'pkg.module:Class'.")
    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise PlanError(f"--model {target!r} cannot be imported: {error}.") from error
    return functools.partial(obj, **model_args)  # picklable: the calibration builds it in spawned ranks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m picotron_lightning.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pkg.module:Class (an nn.Module or LightningModule)")
    parser.add_argument("--model-args", default="{}", help="JSON keyword arguments for the model's constructor")
    parser.add_argument("--devices", type=int, required=True, help="total devices (world size)")
    parser.add_argument("--devices-per-node", type=int, default=8)
    parser.add_argument("--device", default="NVIDIA H100 80GB HBM3", help="device name, or 'cpu'")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=None, help="samples per optimizer step (default: devices)")
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="per-rank budget (default 90%% of device)")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "tf32", "bf16"))
    for size in ("dp", "tp", "pp", "ep"):
        parser.add_argument(f"--{size}", type=int, default=None, help=f"fix the {size} size")
    parser.add_argument("--dp-mode", choices=("ddp", "fsdp", "hsdp"), default=None)
    parser.add_argument("--checkpointing", choices=("none", "selective", "full"), default=None)
    parser.add_argument("--top", type=int, default=15, help="rows of the ranked table (0: all)")
    parser.add_argument("--no-rejected", action="store_true", help="do not list rejected candidates")
    parser.add_argument("--probe", action="store_true",
                        help="cpu: measure the cost model's rates (matmul FLOP/s, host time per op and per DTensor "
                             "op, copy bandwidth, gloo link) with one local process per device of a node, all busy")
    parser.add_argument("--calibrate", action="store_true",
                        help="cpu: time one block's forward, backward and optimizer step per parallel style of the "
                             "candidates (the product's own tensor parallelism, FSDP2, DDP) on one local gloo process "
                             "per device of a node, all busy, and rank layouts by steps composed from those times; "
                             "cached per machine and model shape (see docs/planner.md)")
    parser.add_argument("--recalibrate", action="store_true", help="with --calibrate: measure again, ignore the cache")
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.table(top=args.top or None, show_rejected=not args.no_rejected))
    if result.device.calibration is not None:
        print(calibration_note(result, args.styles_read, args.rates_read))
    return 0


def calibration_note(result: PlanResult, styles_read: int, rates_read: bool) -> str:
    """What a calibrated ranking rests on: the measured styles, how many came from the cache, and where it is."""
    calibration = result.device.calibration
    assert calibration is not None
    styles = len(calibration.styles)
    started = "no ranks started" if styles_read == styles and rates_read else "local ranks started to measure"
    return (f"ranked by calibrated step times: block costs of {styles} parallel style{'s' * (styles != 1)} on "
            f"{calibration.processes} local processes, {styles_read} of them read from the cache, gloo link "
            f"{'read from the cache' if rates_read else 'measured'} ({started}); cache: {cache_dir()}")


def run(args: argparse.Namespace) -> PlanResult:
    device = device_spec(args.device)  # an unknown name fails here, before the model is built
    if args.calibrate and device.name != "cpu":
        raise PlanError(f"--calibrate measures a CPU machine; --device is {args.device!r}. Use --device cpu, or plan "
                        "a GPU from its table without --calibrate.")
    processes = max(2, min(args.devices, args.devices_per_node))
    args.styles_read = 0  # for the calibration note: what came from the cache rather than from ranks started now
    args.rates_read = rates_cache_path(processes).exists() and not args.recalibrate
    if args.calibrate:
        device = probed_spec(cached_rates(processes, refresh=args.recalibrate), device)
    elif args.probe and device.name == "cpu":
        device = probe_cpu(processes)
    try:
        model_args = json.loads(args.model_args)
    except json.JSONDecodeError as error:
        raise PlanError(f"--model-args is not JSON: {error}.") from error
    factory = load_model_factory(args.model, model_args)
    spec = describe_model(build_on_meta(factory), args.seq_len, name=args.model.rpartition(":")[2])
    budget = int(args.memory_budget_gib * GiB) if args.memory_budget_gib else None
    constraints = Constraints(dp=args.dp, tp=args.tp, pp=args.pp, ep=args.ep, dp_mode=args.dp_mode,
                              checkpointing=args.checkpointing)
    plan = functools.partial(plan_layout, spec, devices=args.devices, devices_per_node=args.devices_per_node,
                             global_batch=args.global_batch or args.devices, memory_budget=budget,
                             constraints=constraints, precision=args.precision)
    result = plan(device=device)
    if not args.calibrate:
        return result
    # The styles of the layouts that fit, measured with one process per device of a node (all busy).
    styles = [s for p in result.ranked if (s := style_of(p.candidate)) and processes % (s[0] * s[1]) == 0]
    samples = min(max(2, *(p.candidate.micro_batch_size for p in result.ranked)), 8)
    styles = list(dict.fromkeys(styles))
    if not args.recalibrate:
        args.styles_read = sum(style_cache_path(spec, processes, s, samples).exists() for s in styles)
    calibration = calibrate_cpu(factory, spec, processes, styles, samples, refresh=args.recalibrate)
    device = dataclasses.replace(device, calibration=calibration, rates_processes=processes)
    return plan(device=device)


if __name__ == "__main__":
    sys.exit(main())
