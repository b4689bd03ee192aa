"""Automatic resume restores the precision plugin's and the AnomalyDetector's state, not only model and optimizer.

``docs/fault_tolerance.md`` says the strategy pre-loads the newest complete checkpoint through Lightning's own
loading path, so ``AdaptivePrecision``'s state (loss scale, scaler counters, skipped steps, promotions, step)
and callback state (``AnomalyDetector``'s skipped steps and recorded anomalies) come back as with
``fit(ckpt_path=...)``. Here that is checked the way users start: ``python train_resume.py`` (Lightning's own
launcher, 2 CPU ranks, gloo), stopped after the step-4 checkpoint by ``max_steps``, then started again with
``resume="auto"``.

The run is in fp16 with a loss scale (2**24) that makes the first step's gradients overflow: the plugin skips
that step and backs the scale off, the detector sees the non-finite gradients and counts a skipped step, and
the scale grows again after 3 clean steps. So the state at the step-4 checkpoint differs from a fresh one in
the scale, the scaler's counters and skip history, the engine's step and the detector's counter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from picotron_lightning.testing import run_script

SCRIPTS = Path(__file__).parent / "scripts"

pytestmark = pytest.mark.slow

SPEC: dict[str, Any] = {
    "strategy": {"resume": "auto"}, "model": {"kind": "llama", "config": {"num_layers": 2}},
    "steps": 6, "micro_batch": 2, "samples": 24, "checkpoint_every": 2, "devices": 2,  # 6 steps an epoch
    "precision": {"mode": "fp16", "scaler": {"init_scale": 2.0**24, "backoff_factor": 2.0**-10, "hysteresis": 1,
                                             "growth_interval": 3}},
    "anomaly": {},  # default actions: non-finite values -> log and skip
}
STOP_AT = 4


def start(out: Path, **changes: Any) -> dict[str, Any]:
    """``python train_resume.py SPEC OUT`` as a user types it; the entries of ``attempts.json``."""
    out.mkdir(exist_ok=True)
    (out / "spec.json").write_text(json.dumps({**SPEC, **changes}))
    run_script(SCRIPTS / "train_resume.py", out / "spec.json", out, timeout=600, cwd=out)
    return json.loads((out / "attempts.json").read_text())


def differences(got: Any, want: Any, path: str = "") -> list[str]:
    """Where two JSON values differ, as ``path: got != want`` lines (empty when equal)."""
    if isinstance(got, dict) and isinstance(want, dict):
        return [d for k in sorted(set(got) | set(want)) for d in differences(got.get(k), want.get(k), f"{path}/{k}")]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def test_resume_auto_restores_precision_plugin_and_anomaly_detector_state(tmp_path):
    uninterrupted = start(tmp_path / "uninterrupted")["0"]
    first = start(tmp_path / "run", steps=STOP_AT)["0"]  # stops after its step-4 checkpoint
    second = start(tmp_path / "run", attempt=1)["1"]     # the user starts the same script again

    fresh = first["states"]["at_start"]
    saved = first["states"]["saved"][str(STOP_AT)]
    # The checkpoint holds state that a fresh start would not have: otherwise the comparison below proves nothing.
    assert saved["anomaly"]["skipped_steps"] >= 1 and fresh["anomaly"]["skipped_steps"] == 0, (saved, fresh)
    assert saved["precision"]["scaler"]["overflow_steps"] >= 1, saved["precision"]
    assert saved["precision"]["scaler"]["scale"] != fresh["precision"]["scaler"]["scale"], (saved, fresh)
    assert saved["precision"]["step"] == STOP_AT and fresh["precision"]["step"] == 0, (saved, fresh)
    # The spike detector's windows: a resume without them would warm up again instead of judging step 5.
    assert saved["anomaly"]["loss_history"] and not fresh["anomaly"]["loss_history"], (saved, fresh)
    # What was saved is what the uninterrupted run had after the same step.
    assert not differences(saved, uninterrupted["states"]["after_step"][str(STOP_AT)])

    assert first["resumed_from"] is None
    assert second["resumed_from"] and second["resumed_from"].endswith(f"step={STOP_AT}.ckpt"), second["resumed_from"]
    restored = second["states"]["at_start"]
    assert not differences(restored, saved), "state at the start of the resumed run != the checkpoint's:\n" + \
        "\n".join(differences(restored, saved))

    # Training continues as if never stopped: the same losses, and the same state after the last step.
    losses = {**first["losses"], **second["losses"]}
    assert sorted(second["losses"], key=int) == [str(s) for s in range(STOP_AT + 1, SPEC["steps"] + 1)]
    for step, want in uninterrupted["losses"].items():
        assert abs(losses[step] - want) <= 1e-6 * abs(want), (step, losses[step], want)
    last = str(SPEC["steps"])
    assert not differences(second["states"]["after_step"][last], uninterrupted["states"]["after_step"][last]), \
        "\n".join(differences(second["states"]["after_step"][last], uninterrupted["states"]["after_step"][last]))
