"""Issue 16's table: skipped steps and final loss on a model whose blocks overflow in fp16.

    python benchmarks/precision_overflow.py --table            # every row, each in a fresh process
    python benchmarks/precision_overflow.py --run adaptive --devices 2 --where mlp --json out.json

The model (``tests/precision/overflow_gpt.py``) is an unseen 4-block GPT whose MLP output is
multiplied by a large constant and layer-normalised: fine in fp32, a few elements per step
beyond the fp16 range. 30 steps, batch 8 (global), byte corpus, CPU. Rows:

* ``fp32``: Lightning "32-true".
* ``amp``: Lightning's fp16 AMP (``MixedPrecision("16-mixed")`` with torch's GradScaler).
* ``adaptive``: ``AdaptivePrecision(mode="fp16")`` with its defaults (in-forward repair, siblings).
* ``no-siblings``: the same with ``promote_siblings=False``.
* ``no-repair``: ``repair_forward=False, retry_unsampled=False, promote_siblings=False``: the
  behaviour before issue 16 (skip the step, promote afterwards), except that step 0 is sampled.

``--devices 2`` runs ``Trainer(devices=2, strategy="picotron3d")`` started by Lightning's own
launcher (dp=2, FSDP2); the loss of a step is the mean over both ranks. "final loss" is the mean
of the last 5 step losses; "vs fp32" compares it with the fp32 row of the same ``--where``.
Every run is its own process with a clean environment, as a user would start it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "precision"))  # the shared model of issue 16

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK")


def run(args: argparse.Namespace) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.plugins.precision import MixedPrecision
    from overflow_gpt import OverflowGPTModule
    from torch.utils.data import DataLoader

    from picotron_lightning.data import ByteCorpus, stdlib_bytes
    from picotron_lightning.precision import AdaptivePrecision

    torch.manual_seed(0)
    module = OverflowGPTModule(where=args.where, gain=args.gain)
    plugin = None
    kwargs: dict = {}
    if args.run == "fp32":
        kwargs["precision"] = "32-true"
    elif args.run == "amp":
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu")]
    else:
        plugin = AdaptivePrecision(mode="fp16", analysis_interval=0, max_consecutive_skips=args.steps + 1,
                                   repair_forward=args.run != "no-repair",
                                   retry_unsampled=args.run != "no-repair",
                                   promote_siblings=args.run == "adaptive")
        kwargs["plugins"] = [plugin]
    strategy = "picotron3d" if args.devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, **kwargs)
    data = ByteCorpus(stdlib_bytes(200_000), 32)
    trainer.fit(module, DataLoader(data, batch_size=args.batch // args.devices, shuffle=False))
    losses = trainer.strategy.reduce(torch.tensor(module.losses), reduce_op="mean").tolist()
    out = {"losses": losses, "final": sum(losses[-5:]) / 5, "skipped": [], "promotions": {}}
    if args.run == "amp":
        scaler = trainer.precision_plugin.scaler
        out["skipped_count"] = sum(loss != loss for loss in module.losses)  # GradScaler skips NaN steps silently
        out["scale"] = float(scaler.get_scale())
    if plugin is not None:
        state = plugin.state_dict()
        out["skipped"] = [(s["step"], s["reason"]) for s in state["scaler"]["skipped"]]
        out["skipped_count"] = len(out["skipped"])
        out["retried"] = state["retried"]
        out["promotions"] = {p["module"]: (p["step"], p["reason"]) for p in state["promotions"]["promotions"]
                             if p["source"] == "dynamic"}
    return out


def clean_env() -> dict[str, str]:
    """The environment of a user's shell: no launcher variables, this checkout importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("MASTER_", "TORCHELASTIC_", "SLURM_", "PL_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def table(args: argparse.Namespace) -> None:
    rows = [("fp32", 1), ("amp", 1), ("no-repair", 1), ("no-siblings", 1), ("adaptive", 1),
            ("fp32", 2), ("no-repair", 2), ("adaptive", 2), ("adaptive", 2)]
    print(f"steps={args.steps} batch={args.batch} gain={args.gain:g}")
    print("| where | run | devices | steps skipped | steps retried | promoted (step) | final loss | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for where in ("block", "mlp"):
        fp32: dict[int, float] = {}
        for name, devices in rows:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "out.json"
                cmd = [sys.executable, __file__, "--run", name, "--devices", str(devices), "--where", where,
                       "--steps", str(args.steps), "--batch", str(args.batch), "--gain", str(args.gain),
                       "--json", str(path)]
                subprocess.run(cmd, env=clean_env(), check=True, timeout=900, capture_output=True)
                out = json.loads(path.read_text())
            if name == "fp32":
                fp32[devices] = out["final"]
            # Against fp32 with the same device count: with devices=2 Lightning's sampler shuffles.
            ref = fp32.get(devices)
            rel = f"{(out['final'] - ref) / ref:+.2%}" if ref and name != "fp32" else "-"
            promoted = ", ".join(f"{n.removeprefix('model.')} ({s})" for n, (s, _) in out["promotions"].items())
            print(f"| {where} | {name} | {devices} | {out.get('skipped_count', 0)} | {len(out.get('retried', []))} "
                  f"| {promoted or '-'} | {out['final']:.4f} | {rel} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--run", choices=["fp32", "amp", "adaptive", "no-siblings", "no-repair"], default="adaptive")
    parser.add_argument("--where", choices=["block", "mlp"], default="block")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--gain", type=float, default=2.6e4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.table:
        table(args)
        return
    out = run(args)
    if args.json and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        Path(args.json).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
