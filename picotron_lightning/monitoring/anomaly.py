"""AnomalyDetector: find NaN/Inf, loss and grad-norm spikes, stragglers and collapsed experts, and act.

Every decision is taken from numbers all ranks share (one all-gather per optimizer step, plus the
gradient norm's all-reduce), so every rank takes the same action on the same step and no rank
is left waiting in a collective the others skipped.

**Skipping a step.** The check runs in ``on_before_optimizer_step``, which Lightning calls inside
``optimizer.step()`` after backward and before the update. To skip, the detector sets every
gradient to ``None``: PyTorch's optimizers (SGD, Adam, AdamW, ...) leave a parameter without a
gradient untouched *and do not advance its state* (Adam's moments and step count), so the
parameters and optimizer state end the step exactly as if the batch had never been seen.
Zeroing the gradients instead would still decay Adam's moments and move the weights. Under
16-bit AMP the gradient scaler has already recorded its inf check; with no gradients the
optimizer step is a no-op there too. The learning-rate scheduler and ``global_step`` still
advance. Optimizers that update parameters without a ``.grad`` are not supported by this action.

**Stragglers.** Synchronous collectives make every rank's full step time equal, so the detector
times only the stretch in which each rank works alone: from leaving the detector's all-gather of
the previous step (optimizer update, data loading, hooks) up to the model's first collective --
``on_before_backward`` for DDP-style replicas, whose forward does not communicate, and
``on_train_batch_start`` for sharded models (FSDP, TP), whose forward gathers weights. Each rank is
scored against the fastest rank and against its own history. A rank that is slow *inside* a
sharded forward is hidden by the gathers; data loading and host-side work are always seen.

Fabric::

    detector = AnomalyDetector(actions={"nonfinite": ["skip"]})
    detector.setup_fabric(fabric, model, alerts=alerts)
    for batch_idx, batch in enumerate(loader):
        detector.start_batch(batch_idx, epoch)
        loss = ...; detector.record_loss(loss); fabric.backward(loss)
        decision = detector.check(step)      # drops the gradients when the step must be skipped
        optimizer.step(); optimizer.zero_grad()
        detector.end_batch(step)
        if decision.stop: break
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from picotron_lightning.monitoring.alerts import AlertManager, find_alert_manager
from picotron_lightning.monitoring.context import RunContext, cached_grad_norm, local_grads_finite
from picotron_lightning.monitoring.moe_stats import moe_layers
from picotron_lightning.monitoring.tensorboard_output import ANOMALY, shared_output

KINDS = ("nonfinite", "loss_spike", "grad_spike", "straggler", "expert_collapse")
ACTIONS = ("log", "skip", "checkpoint", "stop")
DEFAULT_ACTIONS: dict[str, tuple[str, ...]] = {
    "nonfinite": ("log", "skip"),
    "loss_spike": ("log",),
    "grad_spike": ("log",),
    "straggler": ("log",),
    "expert_collapse": ("log",),
}
_SEVERITY = {"nonfinite": "error", "loss_spike": "warning", "grad_spike": "warning", "straggler": "warning",
             "expert_collapse": "warning"}


class RollingZScore:
    """z-score of a value against the last ``window`` accepted values, after ``warmup`` of them."""

    def __init__(self, window: int = 100, warmup: int = 20) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.warmup = warmup

    def score(self, x: float) -> float:
        if len(self.values) < max(self.warmup, 2):
            return 0.0
        n = len(self.values)
        mean = sum(self.values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / (n - 1))
        # A floor on std: a perfectly flat history would make any wiggle infinite.
        return (x - mean) / max(std, 1e-8 * max(abs(mean), 1.0))

    def add(self, x: float) -> None:
        if math.isfinite(x):
            self.values.append(x)


@dataclass
class Decision:
    """What the detector decided for one optimizer step (identical on every rank)."""

    anomalies: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip: bool = False
    checkpoint: bool = False
    stop: bool = False


class AnomalyDetector(Callback):
    """Detect anomalies agreed across ranks and act on them.

    Args:
        actions: per anomaly kind (``nonfinite``, ``loss_spike``, ``grad_spike``, ``straggler``,
            ``expert_collapse``) a list of actions: ``log`` (alert), ``skip`` (drop this
            optimizer step on all ranks), ``checkpoint`` (save one at the end of the step),
            ``stop`` (end training after the step). Missing kinds keep their defaults.
        window, warmup: history length and minimum history of the rolling z-scores.
        loss_z, grad_z: z-score above which the loss / gradient norm is a spike.
        straggler_ratio: a rank whose own work takes this many times the fastest rank's is a straggler.
        straggler_z: ... or whose time is this many standard deviations above its own history
            (and at least ``1.2x`` the fastest rank).
        straggler_min_s: ... and in either case at least this many seconds slower than the fastest
            (sub-millisecond differences are scheduling noise, however large their ratio).
        collapse_window, collapse_share: an expert receiving less than ``collapse_share`` of a
            uniform share of its layer's tokens over ``collapse_window`` steps has collapsed.
        skip_batches: ``(epoch, batch_idx)`` pairs, or the path of a recorded
            ``anomalous_batches.json``, whose optimizer steps are skipped (a resumed run uses
            this to avoid the batches an earlier run found bad; needs a deterministic data order).
        alerts: the AlertManager to report to (default: the one among the Trainer's callbacks).
        checkpoint_dir: where the ``checkpoint`` action saves (default: ``<log_dir>/anomaly_checkpoints``).
        log_every_n_steps: how often the z-scores and straggler ratio are written to the loggers.
    """

    def __init__(
        self,
        actions: Mapping[str, Iterable[str]] | None = None,
        *,
        window: int = 100,
        warmup: int = 20,
        loss_z: float = 6.0,
        grad_z: float = 6.0,
        straggler_ratio: float = 1.5,
        straggler_z: float = 6.0,
        straggler_min_s: float = 0.005,
        collapse_window: int = 50,
        collapse_share: float = 0.01,
        skip_batches: Iterable[tuple[int, int]] | str | None = None,
        alerts: AlertManager | None = None,
        checkpoint_dir: str | None = None,
        log_every_n_steps: int = 10,
    ) -> None:
        self.actions = {k: tuple(v) for k, v in DEFAULT_ACTIONS.items()}
        for kind, acts in (actions or {}).items():
            if kind not in KINDS:
                raise ValueError(f"Unknown anomaly kind {kind!r}; choose from {KINDS}.")
            acts = (acts,) if isinstance(acts, str) else tuple(acts)
            bad = set(acts) - set(ACTIONS)
            if bad:
                raise ValueError(f"Unknown actions {sorted(bad)} for {kind!r}; choose from {ACTIONS}.")
            self.actions[kind] = acts
        self.loss_z, self.grad_z = loss_z, grad_z
        self.straggler_ratio, self.straggler_z = straggler_ratio, straggler_z
        self.straggler_min_s = straggler_min_s
        self.collapse_window, self.collapse_share = collapse_window, collapse_share
        self.loss_stats = RollingZScore(window, warmup)
        self.grad_stats = RollingZScore(window, warmup)
        self.rank_time_stats: list[RollingZScore] = []
        self._window, self._warmup = window, warmup
        self.alerts = alerts
        self.checkpoint_dir = checkpoint_dir
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.skip_set: set[tuple[int, int]] = set()
        self._skip_source = skip_batches
        self.recorded: list[dict[str, Any]] = []  # anomalous steps and their batches
        self.skipped_steps = 0
        self.history: list[Decision] = []
        self.ctx = RunContext()
        self.module: nn.Module | None = None
        self._reset_step()
        self._released: float | None = None  # when this rank left the last all-gather
        self._forward_collectives: bool | None = None
        self._expert_tokens: torch.Tensor | None = None
        self._expert_steps = 0
        self._pending: Decision | None = None

    # ------------------------------------------------------------------------------ setup
    def attach(self, ctx: RunContext, module: nn.Module, alerts: AlertManager | None = None) -> None:
        """Bind to a run and its model; the Lightning hooks and :meth:`setup_fabric` call this."""
        self.ctx, self.module = ctx, module
        self.alerts = alerts or self.alerts
        if self.alerts is not None and self.alerts.ctx.trainer is None and self.alerts.ctx.fabric is None:
            self.alerts.attach(ctx)
        source = self._skip_source
        if isinstance(source, str):
            with open(source) as f:
                source = [(r["epoch"], b) for r in json.load(f) for b in r["batches"]]
        self.skip_set |= {(int(e), int(b)) for e, b in (source or ())}

    def setup_fabric(self, fabric: Any, module: nn.Module, alerts: AlertManager | None = None) -> None:
        """Use from a Fabric script: call once after ``fabric.setup(...)``."""
        self.attach(RunContext.from_fabric(fabric), module, alerts)

    def _reset_step(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._batches: list[int] = []
        self._epoch = 0
        self._compute_time: float | None = None
        self._t_start: float | None = None
        self._checked = False

    # ------------------------------------------------------------------------------ per step
    def start_batch(self, batch_idx: int, epoch: int = 0) -> None:
        """Call before the forward pass of every (micro-)batch."""
        now = time.perf_counter()
        if self._t_start is None and self._compute_time is None:
            self._t_start = self._released if self._released is not None else now
            if self._has_forward_collectives():
                # FSDP/TP forwards gather weights: time spent there is waiting for the others.
                self._compute_time = now - self._t_start
        self._batches.append(batch_idx)
        self._epoch = epoch

    def record_loss(self, loss: torch.Tensor) -> None:
        """Call with the loss before backward (the forward time ends here)."""
        if self._compute_time is None and self._t_start is not None:
            self._compute_time = time.perf_counter() - self._t_start
        self._losses.append(loss.detach().float().reshape(()))

    def check(self, step: int) -> Decision:
        """After backward, before the optimizer step: decide on every rank together and act.

        Issues two collectives (the gradient norm and one all-gather); every rank must call it.
        """
        assert self.module is not None, "call attach()/setup_fabric() first"
        ctx = self.ctx
        loss = torch.stack(self._losses).mean().item() if self._losses else float("nan")
        has_loss = 1.0 if self._losses else 0.0
        norm = float(cached_grad_norm(ctx, self.module, step))
        # A non-finite gradient anywhere makes the global norm non-finite; only then is it worth
        # a pass over this rank's gradients to say which ranks had them.
        local_bad_grads = 0.0 if math.isfinite(norm) or local_grads_finite(self.module) else 1.0
        loss_ok, norm_ok = math.isfinite(loss), math.isfinite(norm)
        row = ctx.collective_tensor([
            loss if loss_ok else 0.0, float(not loss_ok) * has_loss, local_bad_grads,
            self._compute_time or 0.0, norm if norm_ok else 0.0, float(not norm_ok), has_loss,
        ])
        table = ctx.all_gather(row).cpu()  # (world, 7), identical on every rank
        self._released = time.perf_counter()
        decision = Decision()
        bad_loss_ranks = [r for r in range(len(table)) if table[r, 1] > 0]
        bad_grad_ranks = [r for r in range(len(table)) if table[r, 2] > 0]
        norm0 = float("nan") if table[0, 5] > 0 else float(table[0, 4])  # rank 0's copy decides for all
        if bad_loss_ranks or bad_grad_ranks or not math.isfinite(norm0):
            decision.anomalies["nonfinite"] = {
                "loss_ranks": bad_loss_ranks, "grad_ranks": bad_grad_ranks, "grad_norm": norm0,
                "message": f"non-finite values: loss on ranks {bad_loss_ranks}, gradients on ranks "
                           f"{bad_grad_ranks}, global grad norm {norm0}"}
        else:
            with_loss = table[table[:, 6] > 0]
            global_loss = float(with_loss[:, 0].mean()) if len(with_loss) else float("nan")
            self._score("loss_spike", self.loss_stats, global_loss, self.loss_z, decision, "loss")
            self._score("grad_spike", self.grad_stats, norm0, self.grad_z, decision, "grad norm")
        self._stragglers(table[:, 3].tolist(), decision)
        self._checked = True
        self._act(decision, step)
        return decision

    def _score(self, kind: str, stats: RollingZScore, x: float, threshold: float, decision: Decision,
               what: str) -> None:
        if not math.isfinite(x):
            return
        z = stats.score(x)
        self._log({f"{ANOMALY}/{kind.split('_')[0]}_zscore": z}, force=z > threshold)
        if z > threshold:
            decision.anomalies[kind] = {"value": x, "zscore": z,
                                        "message": f"{what} {x:.4g} is {z:.1f} standard deviations above "
                                                   f"its rolling mean"}
        else:
            stats.add(x)  # spikes stay out of the history so they do not hide the next one

    def _stragglers(self, times: list[float], decision: Decision) -> None:
        if len(times) < 2:
            return
        while len(self.rank_time_stats) < len(times):
            self.rank_time_stats.append(RollingZScore(self._window, self._warmup))
        fastest = max(min(times), 1e-6)
        ratios = [t / fastest for t in times]
        slow = {}
        for r, (t, ratio) in enumerate(zip(times, ratios, strict=True)):
            z = self.rank_time_stats[r].score(t)
            slower = t - fastest >= self.straggler_min_s
            if slower and (ratio >= self.straggler_ratio or (z > self.straggler_z and ratio >= 1.2)):
                slow[r] = {"ratio": ratio, "zscore": z, "time_s": t}
            else:
                self.rank_time_stats[r].add(t)
        self._log({f"{ANOMALY}/straggler_ratio": max(ratios)})
        if slow:
            desc = ", ".join(f"rank {r} {v['ratio']:.2f}x the fastest" for r, v in slow.items())
            decision.anomalies["straggler"] = {"ranks": sorted(slow), "detail": slow,
                                               "message": f"straggler(s): {desc}"}

    def _act(self, decision: Decision, step: int) -> None:
        if (self._epoch, self._batches[-1] if self._batches else -1) in self.skip_set:
            decision.anomalies.setdefault("replayed_skip", {"message": "batch listed in skip_batches"})
            decision.skip = True
        for kind, info in decision.anomalies.items():
            acts = self.actions.get(kind, ("log",))
            decision.skip |= "skip" in acts
            decision.checkpoint |= "checkpoint" in acts
            decision.stop |= "stop" in acts
            if kind in KINDS:
                self.recorded.append({"step": step, "epoch": self._epoch, "batches": list(self._batches),
                                      "kind": kind, "actions": list(acts)})
            self._report(kind, info, step, acts)  # every anomaly is reported, whatever else is done
        if decision.skip:
            self.skipped_steps += 1
            self._drop_grads()
        if decision.stop:
            self.ctx.should_stop()
        if decision.anomalies:
            shared_output(self.ctx).scalars({f"{ANOMALY}/skipped_steps": self.skipped_steps}, step)
            self._save_record()
        self._pending = decision if decision.checkpoint else None
        self.history.append(decision)

    def _report(self, kind: str, info: dict[str, Any], step: int, acts: tuple[str, ...]) -> None:
        message = info.get("message", kind)
        taken = [a for a in acts if a != "log"]
        if taken:
            message += f"; action: {', '.join(taken)}"
        data = {k: v for k, v in info.items() if k != "message"}
        data["batches"] = list(self._batches)
        if self.alerts is not None:
            self.alerts.alert(kind, message, severity=_SEVERITY.get(kind, "info"), step=step,
                              key=f"{kind}@{step}", **data)
        elif self.ctx.is_global_zero:
            import logging

            logging.getLogger(__name__).warning("%s (step %d): %s", kind, step, message)

    def _has_forward_collectives(self) -> bool:
        """Whether the model's forward itself communicates (sharded parameters: FSDP, TP)."""
        if self._forward_collectives is None:
            params = list(self.module.parameters()) if self.module is not None else []
            self._forward_collectives = any(hasattr(p, "device_mesh") or hasattr(p, "_is_flat_param")
                                            or type(p).__name__ == "FlatParameter" for p in params)
        return self._forward_collectives

    def _drop_grads(self) -> None:
        assert self.module is not None
        for p in self.module.parameters():
            p.grad = None

    def _save_record(self) -> None:
        if not self.ctx.is_global_zero or not self.ctx.log_dir:
            return
        os.makedirs(self.ctx.log_dir, exist_ok=True)
        with open(os.path.join(self.ctx.log_dir, "anomalous_batches.json"), "w") as f:
            json.dump(self.recorded, f, indent=1)

    def end_batch(self, step: int, optimizer_stepped: bool = True) -> None:
        """Call after the optimizer step (and after micro-batches that do not step)."""
        if not optimizer_stepped:
            return
        self._experts(step)
        decision, self._pending = self._pending, None
        if decision is not None and decision.checkpoint:
            root = self.ctx.log_dir or os.getcwd()
            directory = self.checkpoint_dir or os.path.join(root, "anomaly_checkpoints")
            self.ctx.save_checkpoint(os.path.join(directory, f"anomaly-step{step}.ckpt"))
        self._reset_step()

    def _experts(self, step: int) -> None:
        """Accumulate each MoE layer's token counts; every ``collapse_window`` steps, check them."""
        if self.module is None or self.collapse_window <= 0:
            return
        counts = [m.moe_metrics().get("tokens_per_expert")  # type: ignore[operator]  # duck-typed method
                  for _, m in moe_layers(self.module)]
        counts = [torch.as_tensor(c).detach() for c in counts if c is not None]
        if not counts or len({c.numel() for c in counts}) != 1:
            return
        stacked = torch.stack([c.reshape(-1) for c in counts]).double()
        self._expert_tokens = stacked if self._expert_tokens is None else self._expert_tokens + stacked
        self._expert_steps += 1
        if self._expert_steps < self.collapse_window:
            return
        # The package's MoELayer already counts over the global batch (all data-parallel ranks),
        # so every rank sees the same counts and reaches the same verdict without a collective.
        total = self._expert_tokens.cpu()
        self._expert_tokens, self._expert_steps = None, 0
        share = total / total.sum(dim=1, keepdim=True).clamp_min(1e-12)
        uniform = 1.0 / total.size(1)
        starved = (share < self.collapse_share * uniform).nonzero().tolist()
        if starved:
            decision = Decision(anomalies={"expert_collapse": {
                "experts": starved,
                "message": "experts receiving almost no tokens over the last "
                           f"{self.collapse_window} steps (layer, expert): {starved}"}})
            self._act(decision, step)

    def _log(self, metrics: dict[str, float], force: bool = False) -> None:
        step = len(self.history)  # optimizer steps checked so far, the same on every rank
        if force or step % self.log_every_n_steps == 0:  # a spike is always shown
            shared_output(self.ctx).scalars(metrics, step)

    # ------------------------------------------------------------------------------ Lightning
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.attach(RunContext.from_trainer(trainer), pl_module, find_alert_manager(trainer.callbacks))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.ctx = RunContext.from_trainer(trainer)  # optimizers exist now
        shared_output(self.ctx).write_layout()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.start_batch(batch_idx, trainer.current_epoch)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        self.record_loss(loss * trainer.accumulate_grad_batches)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.check(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Under gradient accumulation only the last micro-batch of a window reaches `check`.
        self.end_batch(trainer.global_step, self._checked)

    def state_dict(self) -> dict[str, Any]:
        # The loss and gradient-norm histories go along, so spike detection after a resume judges the next step
        # against the same window as an uninterrupted run instead of warming up again. Step times do not: a
        # restarted group may run on other machines.
        return {"recorded": self.recorded, "skipped_steps": self.skipped_steps,
                "loss_history": list(self.loss_stats.values), "grad_norm_history": list(self.grad_stats.values)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recorded = list(state_dict.get("recorded", []))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        for stats, key in ((self.loss_stats, "loss_history"), (self.grad_stats, "grad_norm_history")):
            stats.values.clear()
            stats.values.extend(float(v) for v in state_dict.get(key, []))
        # Resuming: the batches an earlier run skipped are skipped again if they come around.
        self.skip_set |= {(int(r["epoch"]), int(b)) for r in self.recorded if "skip" in r.get("actions", ())
                          for b in r["batches"]}
