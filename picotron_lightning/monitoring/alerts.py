"""AlertManager: alerts with severity, deduplication and rate limiting, sent to several sinks.

Detectors call :meth:`AlertManager.alert` on *every* rank with the same, already agreed
decision; only rank 0 emits (unless ``all_ranks=True``), so one anomaly is one alert in each sink
however many ranks saw it. Sinks: Python ``logging``, a TensorBoard text panel, a JSONL file in the
log directory, and any callables the user passes (for example a function posting to a chat
webhook). A summary goes to every sink at the end of fit.

Fabric::

    alerts = AlertManager(callables=[post_to_chat])
    alerts.setup_fabric(fabric)
    alerts.alert("custom", "something happened", severity="warning", step=step)
    ...
    alerts.finish()          # writes the summary, closes the file
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning.pytorch.callbacks import Callback

from picotron_lightning.monitoring.context import RunContext
from picotron_lightning.monitoring.tensorboard_output import ALERT_TEXT, shared_output

log = logging.getLogger("picotron_lightning.monitoring.alerts")

SEVERITIES = ("info", "warning", "error", "critical")
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}
SINKS = ("logging", "tensorboard", "jsonl")


@dataclass
class Alert:
    """One alert. ``key`` identifies "the same alert" for deduplication (defaults to ``kind``)."""

    kind: str
    message: str
    severity: str = "warning"
    step: int | None = None
    key: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, sort_keys=True)


class AlertManager(Callback):
    """Route alerts to logging, TensorBoard, a JSONL file and user callables.

    Args:
        sinks: built-in sinks to use, any of ``"logging"``, ``"tensorboard"``, ``"jsonl"``.
        callables: functions called with each emitted :class:`Alert` (errors in them are logged,
            never raised: a broken webhook must not stop training).
        min_severity: alerts below this severity are counted but not sent.
        dedup_steps: an alert whose ``key`` was emitted less than this many steps ago is
            suppressed (counted in the summary).
        rate_limit: at most this many alerts per ``rate_window_s`` seconds; ``critical`` alerts
            bypass the limit.
        jsonl_name: file name of the JSONL sink inside the log directory.
        all_ranks: emit on every rank instead of rank 0 only.
    """

    def __init__(
        self,
        sinks: Iterable[str] = SINKS,
        callables: Iterable[Callable[[Alert], Any]] = (),
        min_severity: str = "info",
        dedup_steps: int = 100,
        rate_limit: int = 20,
        rate_window_s: float = 60.0,
        jsonl_name: str = "alerts.jsonl",
        all_ranks: bool = False,
    ) -> None:
        self.sinks = tuple(sinks)
        unknown = set(self.sinks) - set(SINKS)
        if unknown:
            raise ValueError(f"Unknown alert sinks {sorted(unknown)}; choose from {SINKS}.")
        if min_severity not in SEVERITIES:
            raise ValueError(f"`min_severity` must be one of {SEVERITIES}, got {min_severity!r}.")
        self.callables = list(callables)
        self.min_severity = min_severity
        self.dedup_steps = dedup_steps
        self.rate_limit = rate_limit
        self.rate_window_s = rate_window_s
        self.jsonl_name = jsonl_name
        self.all_ranks = all_ranks
        self.ctx = RunContext()
        self.emitted: list[Alert] = []
        self.counts: Counter[str] = Counter()  # every alert raised, by kind
        self.suppressed: Counter[str] = Counter()  # raised but not sent (dedup, rate, severity)
        self._last_step_by_key: dict[str, int] = {}
        self._recent_times: list[float] = []
        self._jsonl_path: str | None = None
        self._finished = False

    # ------------------------------------------------------------------------------ setup
    def attach(self, ctx: RunContext) -> None:
        """Bind to a run; the Lightning hooks and :meth:`setup_fabric` call this."""
        self.ctx = ctx
        self._finished = False
        if self._emits and "jsonl" in self.sinks:
            directory = ctx.log_dir or os.getcwd()
            os.makedirs(directory, exist_ok=True)
            self._jsonl_path = os.path.join(directory, self.jsonl_name)

    def setup_fabric(self, fabric: Any) -> None:
        """Use from a Fabric script: call once after ``fabric.launch()``."""
        self.attach(RunContext.from_fabric(fabric))

    @property
    def _emits(self) -> bool:
        return self.all_ranks or self.ctx.is_global_zero

    @property
    def jsonl_path(self) -> str | None:
        """Where the JSONL sink writes (``None`` on ranks that do not emit)."""
        return self._jsonl_path

    # ------------------------------------------------------------------------------ alerts
    def alert(
        self,
        kind: str,
        message: str,
        severity: str = "warning",
        step: int | None = None,
        key: str | None = None,
        **data: Any,
    ) -> Alert | None:
        """Raise an alert; return it if it was sent, ``None`` if suppressed or on a silent rank."""
        if severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {SEVERITIES}, got {severity!r}.")
        item = Alert(kind, message, severity, step, key or kind, data)
        self.counts[kind] += 1
        if not self._admit(item):
            self.suppressed[kind] += 1
            return None
        if not self._emits:
            return None
        self.emitted.append(item)
        self._send(item)
        return item

    def _admit(self, item: Alert) -> bool:
        if SEVERITIES.index(item.severity) < SEVERITIES.index(self.min_severity):
            return False
        step = item.step if item.step is not None else -1
        last = self._last_step_by_key.get(item.key)
        if last is not None and step - last < self.dedup_steps:
            return False
        if item.severity != "critical":
            now = time.monotonic()
            self._recent_times = [t for t in self._recent_times if now - t < self.rate_window_s]
            if len(self._recent_times) >= self.rate_limit:
                return False
            self._recent_times.append(now)
        self._last_step_by_key[item.key] = step
        return True

    def _send(self, item: Alert) -> None:
        where = f" (step {item.step})" if item.step is not None else ""
        line = f"[{item.severity.upper()}] {item.kind}{where}: {item.message}"
        if "logging" in self.sinks:
            log.log(_LEVELS[item.severity], line)
        if "tensorboard" in self.sinks:
            shared_output(self.ctx).text(f"{ALERT_TEXT}/{item.kind}", line, item.step or 0)
        if "jsonl" in self.sinks and self._jsonl_path:
            with open(self._jsonl_path, "a") as f:
                f.write(item.to_json() + "\n")
        for fn in self.callables:
            try:
                fn(item)
            except Exception:  # noqa: BLE001 - a failing user sink must not stop training
                log.exception("Alert callable %r failed", fn)

    # ------------------------------------------------------------------------------ summary
    def summary(self) -> dict[str, Any]:
        """Counts of raised, sent and suppressed alerts by kind."""
        return {
            "raised": dict(self.counts),
            "sent": dict(Counter(a.kind for a in self.emitted)),
            "suppressed": dict(self.suppressed),
            "by_severity": dict(Counter(a.severity for a in self.emitted)),
        }

    def finish(self, step: int | None = None) -> dict[str, Any]:
        """Send the end-of-run summary to every sink (once) and flush; return the summary."""
        summary = self.summary()
        if self._finished or not self._emits:
            return summary
        self._finished = True
        text = "no alerts" if not self.counts else ", ".join(
            f"{k}: {n} raised, {n - self.suppressed.get(k, 0)} sent" for k, n in sorted(self.counts.items())
        )
        if "logging" in self.sinks:
            log.info("Alert summary: %s", text)
        if "tensorboard" in self.sinks:
            out = shared_output(self.ctx)
            out.text(f"{ALERT_TEXT}/summary", f"Alert summary: {text}", step or 0)
            out.flush()
        if "jsonl" in self.sinks and self._jsonl_path:
            with open(self._jsonl_path, "a") as f:
                f.write(json.dumps({"summary": summary, "step": step}, sort_keys=True) + "\n")
        for fn in self.callables:
            summarize = getattr(fn, "summary", None)
            if callable(summarize):
                summarize(summary)
        return summary

    # ------------------------------------------------------------------------------ Lightning
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.attach(RunContext.from_trainer(trainer))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.finish(trainer.global_step)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.finish(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "suppressed": dict(self.suppressed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counts = Counter(state_dict.get("counts", {}))
        self.suppressed = Counter(state_dict.get("suppressed", {}))


def find_alert_manager(callbacks: Iterable[Any]) -> AlertManager | None:
    """The run's AlertManager among a Trainer's callbacks, if any."""
    for cb in callbacks:
        if isinstance(cb, AlertManager):
            return cb
    return None
